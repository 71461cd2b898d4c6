//! One cluster as the leader sees it: the mirrored tasks, the live workers and the
//! assignments, read from ZooKeeper once when leadership starts and then kept in step
//! with every write the leader makes. Each reconcile computes what ZooKeeper should hold
//! and writes only the difference: no change, no write.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cloudtask_catalogue::{Cluster, Task};
use cloudtask_coord::layout::{self, ClusterNode, CommandNode, TaskNode, WorkerNode};
use cloudtask_coord::{CoordError, NodeKind, Op, Result, Session};
use cloudtask_core::ids::{ClusterId, TaskId, WorkerId};
use cloudtask_core::limits::RunLimits;
use cloudtask_core::task::TaskState;

use crate::balance::{self, Placement};
use crate::ring::{Member, Ring};

/// Writes per ZooKeeper multi, and payload bytes: a batch stays far below ZooKeeper's
/// `jute.maxbuffer` (1 MiB by default), which a thousand mirrored specs could exceed.
const BATCH: usize = 1_000;
const BATCH_BYTES: usize = 256 << 10;

/// How much of a request an op takes (its path and data; the framing is small).
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Create { path, data, .. } | Op::Set { path, data, .. } => path.len() + data.len() + 16,
        Op::Delete { path, .. } | Op::Check { path, .. } => path.len() + 16,
    }
}

/// How the worker set changed since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WorkerChanges {
    pub joined: Vec<WorkerNode>,
    /// Gone with a departure marker: a clean leave.
    pub left: Vec<WorkerNode>,
    /// Gone without one: the session died.
    pub failed: Vec<WorkerNode>,
}

pub struct ClusterState {
    pub cluster: Cluster,
    tasks: BTreeMap<TaskId, TaskNode>,
    /// task → worker whose assignment folder holds it.
    assignments: HashMap<TaskId, WorkerId>,
    /// Assignment folders present (live workers' and departed ones' not yet removed).
    assignment_dirs: BTreeSet<WorkerId>,
    workers: BTreeMap<WorkerId, WorkerNode>,
    /// Tasks with a manual run queued or going: assigned even while paused.
    manual: HashSet<TaskId>,
}

/// Leader fencing: every batch checks that our election node still exists, so a leader
/// that lost its session can never write. Also counts the znode writes made.
#[derive(Clone)]
pub struct Fence {
    pub election_node: String,
    pub writes: Arc<AtomicU64>,
}

async fn apply(session: &dyn Session, fence: &Fence, ops: Vec<Op>) -> Result<()> {
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let mut batch = vec![Op::Check {
            path: fence.election_node.clone(),
            version: 0,
        }];
        let mut bytes = 0;
        while let Some(op) = ops.peek() {
            let size = op_bytes(op);
            if batch.len() > BATCH || (batch.len() > 1 && bytes + size > BATCH_BYTES) {
                break;
            }
            bytes += size;
            batch.push(ops.next().expect("peeked"));
        }
        let written = batch.len() as u64 - 1;
        session.multi(batch).await?;
        fence.writes.fetch_add(written, Ordering::Relaxed);
    }
    Ok(())
}

/// A task as its workers see it: no env values (see [`TaskNode::mirror`]), and its
/// cluster's default limits filling the ones it leaves unset (so a change of the
/// defaults reaches every task, through the mirror).
fn task_node(task: &Task, defaults: RunLimits) -> TaskNode {
    let mut node = TaskNode::mirror(
        task.tenant_id,
        task.name.clone(),
        task.version,
        task.state == TaskState::Paused,
        &task.spec,
    );
    node.limits = task.spec.limits.or(defaults);
    node
}

impl ClusterState {
    pub fn id(&self) -> ClusterId {
        self.cluster.id
    }

    pub fn workers(&self) -> &BTreeMap<WorkerId, WorkerNode> {
        &self.workers
    }

    /// The tasks with a manual run queued or going, which [`ClusterState::allocate`] gives a
    /// worker even while they are paused: pausing stops the schedule, not the operator.
    /// (The worker fires nothing of a paused task; it runs the runs it is handed, and
    /// keeps the task, with its runs, until they end.)
    pub fn hold_for_manual_runs(&mut self, tasks: HashSet<TaskId>) {
        self.manual = tasks;
    }

    /// task → worker, as written.
    pub fn assignments(&self) -> &HashMap<TaskId, WorkerId> {
        &self.assignments
    }

    /// Writes a command for one worker (run a queued run, stop a run), fenced like every
    /// write of the leader.
    pub async fn send_command(
        &self,
        session: &dyn Session,
        fence: &Fence,
        worker: &WorkerId,
        command: &CommandNode,
    ) -> Result<()> {
        session
            .ensure_path(&layout::commands(self.id(), worker))
            .await?;
        apply(
            session,
            fence,
            vec![Op::Create {
                path: layout::command_prefix(self.id(), worker),
                data: layout::encode(command),
                kind: NodeKind::PersistentSequential,
            }],
        )
        .await
    }

    /// Reads the cluster's state from ZooKeeper, creating its folders when missing. The
    /// cluster node's payload is written last, after the workers were read: whoever sees
    /// it knows that a worker registering from then on is a join the leader hears of.
    pub async fn load(session: &dyn Session, cluster: Cluster) -> Result<ClusterState> {
        let id = cluster.id;
        let root = layout::cluster(id);
        let payload = layout::encode(&ClusterNode {
            tenant: cluster.tenant_id,
            name: cluster.name.clone(),
        });
        for dir in [
            layout::tasks(id),
            layout::workers(id),
            layout::assignments(id),
            layout::departures(id),
            layout::commands_root(id),
        ] {
            session.ensure_path(&dir).await?;
        }
        let mut tasks = BTreeMap::new();
        for name in session.children(&layout::tasks(id)).await? {
            let Ok(task_id) = name.parse::<TaskId>() else {
                continue;
            };
            let path = layout::task(id, task_id);
            if let Some(node) = session.get(&path).await? {
                tasks.insert(task_id, layout::decode(&path, &node.data)?);
            }
        }
        let mut assignments = HashMap::new();
        let mut assignment_dirs = BTreeSet::new();
        for worker in session.children(&layout::assignments(id)).await? {
            let Ok(worker) = worker.parse::<WorkerId>() else {
                continue;
            };
            for name in session
                .children(&layout::worker_assignments(id, &worker))
                .await?
            {
                if let Ok(task_id) = name.parse::<TaskId>() {
                    // A task under two folders (never written by us) is repaired by the
                    // next allocation: keep one, the other is seen as stale.
                    assignments.entry(task_id).or_insert_with(|| worker.clone());
                }
            }
            assignment_dirs.insert(worker);
        }
        let mut state = ClusterState {
            cluster,
            tasks,
            assignments,
            assignment_dirs,
            workers: BTreeMap::new(),
            manual: HashSet::new(),
        };
        state.workers = state.read_workers(session).await?;
        if session
            .get(&root)
            .await?
            .is_none_or(|node| node.data != payload)
        {
            session.set(&root, &payload, None).await?;
        }
        Ok(state)
    }

    async fn read_workers(&self, session: &dyn Session) -> Result<BTreeMap<WorkerId, WorkerNode>> {
        let mut workers = BTreeMap::new();
        for name in session.children(&layout::workers(self.id())).await? {
            let Ok(name) = name.parse::<WorkerId>() else {
                tracing::warn!(%name, "ignoring a worker node that names no worker");
                continue;
            };
            let path = layout::worker(self.id(), &name);
            if let Some(node) = session.get(&path).await? {
                match layout::decode::<WorkerNode>(&path, &node.data) {
                    Ok(worker) => {
                        workers.insert(name, worker);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a worker with a bad payload"),
                }
            }
        }
        Ok(workers)
    }

    /// Re-reads the live workers and tells joins, clean leaves and failures apart.
    pub async fn refresh_workers(&mut self, session: &dyn Session) -> Result<WorkerChanges> {
        let now = self.read_workers(session).await?;
        let mut changes = WorkerChanges::default();
        for (name, worker) in &self.workers {
            if now
                .get(name)
                .is_some_and(|w| w.started_at == worker.started_at)
            {
                continue;
            }
            let marker = layout::departure(self.id(), name);
            let left_cleanly = session.get(&marker).await?.is_some();
            if left_cleanly {
                match session.delete(&marker, None).await {
                    Ok(()) | Err(CoordError::NoNode(_)) => {}
                    Err(e) => return Err(e),
                }
                changes.left.push(worker.clone());
            } else {
                changes.failed.push(worker.clone());
            }
        }
        for (name, worker) in &now {
            if self
                .workers
                .get(name)
                .is_some_and(|w| w.started_at == worker.started_at)
            {
                continue;
            }
            changes.joined.push(worker.clone());
        }
        self.workers = now;
        Ok(changes)
    }

    /// Makes the mirrored tasks equal to the catalogue's.
    pub async fn mirror(
        &mut self,
        session: &dyn Session,
        fence: &Fence,
        catalogue_tasks: &[Task],
    ) -> Result<()> {
        let id = self.id();
        let desired: BTreeMap<TaskId, TaskNode> = catalogue_tasks
            .iter()
            .map(|t| (t.id, task_node(t, self.cluster.default_limits)))
            .collect();
        let mut ops = Vec::new();
        for (task_id, node) in &desired {
            match self.tasks.get(task_id) {
                Some(current) if current == node => {}
                Some(_) => ops.push(Op::Set {
                    path: layout::task(id, *task_id),
                    data: layout::encode(node),
                    version: None,
                }),
                None => ops.push(Op::Create {
                    path: layout::task(id, *task_id),
                    data: layout::encode(node),
                    kind: NodeKind::Persistent,
                }),
            }
        }
        for task_id in self.tasks.keys().filter(|t| !desired.contains_key(t)) {
            if let Some(worker) = self.assignments.remove(task_id) {
                ops.push(Op::Delete {
                    path: layout::assignment(id, &worker, *task_id),
                    version: None,
                });
            }
            ops.push(Op::Delete {
                path: layout::task(id, *task_id),
                version: None,
            });
        }
        apply(session, fence, ops).await?;
        self.tasks = desired;
        Ok(())
    }

    /// Writes the assignments the balanced ring gives for the live workers, touching only
    /// tasks whose owner changes. Paused tasks (but those with a manual run queued or
    /// going) and tasks no live worker can take are left unassigned. (One function: the plan, the znode operations that carry it out and the
    /// state they leave are one transaction of thought, and written in one batch.)
    pub async fn allocate(&mut self, session: &dyn Session, fence: &Fence) -> Result<usize> {
        let id = self.id();
        let ring = Ring::new(self.workers.values().map(|w| Member {
            id: w.name.to_string(),
            capacity: w.capacity,
            labels: w.labels.clone(),
        }));
        let active: Vec<(TaskId, String, BTreeSet<String>)> = self
            .tasks
            .iter()
            .filter(|(task_id, node)| !node.paused || self.manual.contains(task_id))
            .map(|(task_id, node)| {
                (
                    *task_id,
                    task_id.to_string(),
                    layout::required_labels(&node.spec),
                )
            })
            .collect();
        let placements: Vec<Placement<'_>> = active
            .iter()
            .map(|(task_id, key, labels)| Placement {
                key,
                labels,
                current: self.assignments.get(task_id).map(WorkerId::as_str),
            })
            .collect();
        let owners = balance::plan(&ring, &placements);
        let mut next = HashMap::with_capacity(active.len());
        for ((task_id, _, _), owner) in active.iter().zip(owners) {
            // Owners come from the ring, whose members are the live workers.
            if let Some((owner, _)) = owner.and_then(|o| self.workers.get_key_value(o)) {
                next.insert(*task_id, owner.clone());
            }
        }
        let mut ops = Vec::new();
        let mut new_dirs = BTreeSet::new();
        let mut moved = 0;
        for task_id in self.tasks.keys() {
            let current = self.assignments.get(task_id);
            let owner = next.get(task_id);
            if current == owner {
                continue;
            }
            moved += 1;
            if let Some(old) = current {
                ops.push(Op::Delete {
                    path: layout::assignment(id, old, *task_id),
                    version: None,
                });
            }
            if let Some(new) = owner {
                // A worker's folder is created in the batch before its first assignment.
                if !self.assignment_dirs.contains(new) && new_dirs.insert(new.clone()) {
                    ops.push(Op::Create {
                        path: layout::worker_assignments(id, new),
                        data: Vec::new(),
                        kind: NodeKind::Persistent,
                    });
                }
                ops.push(Op::Create {
                    path: layout::assignment(id, new, *task_id),
                    data: Vec::new(),
                    kind: NodeKind::Persistent,
                });
            }
        }
        apply(session, fence, ops).await?;
        self.assignments = next;
        self.assignment_dirs.extend(new_dirs);
        // Folders of workers that are gone and now hold nothing.
        let holding: BTreeSet<&WorkerId> = self.assignments.values().collect();
        let stale: Vec<WorkerId> = self
            .assignment_dirs
            .iter()
            .filter(|d| !self.workers.contains_key(*d) && !holding.contains(d))
            .cloned()
            .collect();
        for dir in stale {
            match session
                .delete(&layout::worker_assignments(id, &dir), None)
                .await
            {
                Ok(()) | Err(CoordError::NoNode(_)) => {
                    self.assignment_dirs.remove(&dir);
                }
                Err(CoordError::NotEmpty(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }
}
