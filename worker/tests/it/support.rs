//! Shared helpers: bounded waits, a worker under test, a scheduler-like observer.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::{CoordError, Coordinator, Node, NodeKind, Session};
use cloudtask_core::ids::{ClusterId, TaskId};
use cloudtask_worker::{Assignments, Membership, MembershipStatus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// Session timeout for tests on real ZooKeeper (its minimum is 2 × tickTime = 4 s).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

pub fn worker_node(name: &str) -> WorkerNode {
    WorkerNode {
        name: name.parse().unwrap(),
        hostname: "test-host".into(),
        version: "0.0.0-test".into(),
        capacity: 2,
        labels: ["gpu".to_string()].into(),
        started_at: chrono::Utc::now(),
        containment: String::new(),
    }
}

/// A membership running in the background, with its outputs.
pub struct Worker {
    pub assignments: watch::Receiver<Assignments>,
    pub status: watch::Receiver<MembershipStatus>,
    pub shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    pub fn start(membership: Membership) -> Worker {
        let (tx, assignments) = watch::channel(Assignments::default());
        let status = membership.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(membership.run(tx, shutdown.clone()));
        Worker {
            assignments,
            status,
            shutdown,
            task,
        }
    }

    /// Waits until the published assignments are exactly `tasks` under `epoch`.
    pub async fn expect_assignments(&mut self, epoch: u64, tasks: &[TaskId]) {
        let want = Assignments {
            epoch,
            tasks: tasks.iter().copied().collect(),
        };
        let what = format!(
            "assignments {want:?} (last seen {:?})",
            *self.assignments.borrow()
        );
        within(&what, self.assignments.wait_for(|a| *a == want))
            .await
            .expect("membership dropped its channel");
    }

    pub async fn expect_status(&mut self, want: MembershipStatus) {
        let what = format!("status {want:?} (last seen {:?})", *self.status.borrow());
        within(&what, self.status.wait_for(|s| *s == want))
            .await
            .expect("membership dropped its status");
    }

    /// Cancels and waits for the run to end.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.finished().await
    }

    pub async fn finished(self) -> anyhow::Result<()> {
        within("the membership to return", self.task)
            .await
            .expect("membership task panicked")
    }
}

/// Waits until the node at `path` satisfies `ready`, watching it rather than polling.
pub async fn wait_node(
    session: &dyn Session,
    path: &str,
    what: &str,
    ready: impl Fn(Option<&Node>) -> bool,
) -> Option<Node> {
    within(what, async {
        loop {
            let (node, watch) = session.get_and_watch(path).await.expect("get_and_watch");
            if ready(node.as_ref()) {
                return node;
            }
            watch.fired().await;
        }
    })
    .await
}

pub async fn registered_node(session: &dyn Session, cluster: ClusterId, name: &str) -> WorkerNode {
    let path = layout::worker(cluster, &name.parse().unwrap());
    let node = wait_node(session, &path, &format!("{path} to exist"), |n| n.is_some())
        .await
        .expect("present");
    layout::decode(&path, &node.data).expect("worker payload")
}

/// Writes assignment children as the scheduler does (creating the worker's folder with
/// the first one).
pub async fn assign(session: &dyn Session, cluster: ClusterId, worker: &str, tasks: &[TaskId]) {
    let worker = &worker.parse().unwrap();
    session
        .ensure_path(&layout::worker_assignments(cluster, worker))
        .await
        .expect("assignment folder");
    for task in tasks {
        session
            .create(
                &layout::assignment(cluster, worker, *task),
                &layout::encode(&layout::AssignmentNode { version: 1 }),
                NodeKind::Persistent,
            )
            .await
            .expect("assignment");
    }
}

pub async fn unassign(session: &dyn Session, cluster: ClusterId, worker: &str, task: TaskId) {
    session
        .delete(
            &layout::assignment(cluster, &worker.parse().unwrap(), task),
            None,
        )
        .await
        .expect("unassign");
}

pub fn tasks(n: usize) -> Vec<TaskId> {
    let set: BTreeSet<TaskId> = (0..n).map(|_| TaskId::new()).collect();
    set.into_iter().collect()
}

pub async fn absent(session: &dyn Session, path: &str) -> bool {
    match session.get(path).await {
        Ok(node) => node.is_none(),
        Err(CoordError::NoNode(_)) => true,
        Err(e) => panic!("reading {path}: {e}"),
    }
}

pub async fn connect(coordinator: &Arc<dyn Coordinator>) -> Arc<dyn Session> {
    within("a coordination session", coordinator.connect())
        .await
        .expect("connect")
}

pub use cloudtask_testkit::Proxy;
