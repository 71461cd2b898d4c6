//! Allocation benchmark on real ZooKeeper (`cargo bench -p cloudtask-scheduler`), on an
//! open (world-writable) tree and on one with ACLs as deployed, side by side, each figure
//! beside a baseline measured in the same run:
//!
//! 1. Full allocation of 100,000 tasks over 20 workers, and the mirroring of their specs
//!    before it (time, znode writes), against writing the same number of bare (empty)
//!    znodes in the same batch size, with the ACL the tree gives those nodes: ZooKeeper's
//!    floor.
//! 2. Failover at 10,000 tasks over 10 workers: from a worker's node vanishing to the new
//!    assignments being written, against the time ZooKeeper takes to tell a watcher that
//!    the node vanished at all.
//! 3. The bare creates with each ACL a tree sets: world-writable (the open tree's), the
//!    owner alone (one grant), the owner and the cluster's workers (two grants); and the
//!    client's own work for 100,000 paths' ACLs. A create carries its ACL, in the request
//!    and in ZooKeeper's transaction log, so an ACL costs what its bytes cost.
//!
//! ZooKeeper's fsync and a shared machine make absolute times swing between runs by a
//! factor of two, so the two trees are compared within one process, on a ZooKeeper server
//! of the run's own (1 GB heap; the suite's shared server carries other tests' trees and
//! traffic, in a heap this run's millions of writes would crowd): several rounds, each
//! running both trees (one after the other, each on a fresh chroot, the tree that goes
//! first alternating from round to round) and the bare creates, which go a batch of each
//! ACL in turn. What a measurement wrote is deleted after it (not timed), so the server's
//! tree, and the snapshots it writes, stay the same size throughout. The tables give
//! medians over the rounds (min–max); a ratio is taken within each round, then its median
//! over them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use cloudtask_catalogue::{Cluster, Task};
use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Access, Coordinator, Credential, NodeKind, Op, Session, WatchEvent};
use cloudtask_core::ids::{ClusterId, TaskId, TenantId, WorkerId};
use cloudtask_core::task::{TaskSpec, TaskState};
use cloudtask_scheduler::{ClusterState, Fence};
use cloudtask_testkit::PrivateZooKeeper;

const ROUNDS: usize = 7;
const TASKS: usize = 100_000;
const WORKERS: usize = 20;
const FAILOVER_TASKS: usize = 10_000;
const FAILOVER_WORKERS: usize = 10;
/// Workers killed one after the other, per tree and round.
const KILLS: usize = 3;
/// As the scheduler's batches (`cluster.rs`).
const BATCH: usize = 1_000;

fn tasks(cluster: &Cluster, n: usize) -> Vec<Task> {
    let now = Utc::now();
    (0..n)
        .map(|i| Task {
            id: TaskId::new(),
            tenant_id: cluster.tenant_id,
            cluster_id: cluster.id,
            name: format!("task-{i}"),
            description: String::new(),
            state: TaskState::Active,
            version: 1,
            spec: TaskSpec::new("* * * * *", "true"),
            created_at: now,
            updated_at: now,
        })
        .collect()
}

fn new_cluster() -> Cluster {
    Cluster {
        id: ClusterId::new(),
        tenant_id: TenantId::new(),
        name: "bench".parse().unwrap(),
        token_rotated_at: Utc::now(),
        created_at: Utc::now(),
        default_limits: Default::default(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tree {
    Open,
    Acl,
}

impl Tree {
    fn access(self) -> Access {
        match self {
            Tree::Open => Access::open(),
            Tree::Acl => Access::owner(Credential::generate("bench")),
        }
    }
}

/// On a fresh chroot of `server`.
fn coordinator(server: &PrivateZooKeeper, access: Access) -> ZkCoordinator {
    let chroot = format!("/bench_{}", uuid::Uuid::new_v4().simple());
    ZkCoordinator::new(server.connect_string(&chroot), Duration::from_secs(10)).with(access)
}

async fn worker(coordinator: &ZkCoordinator, cluster: ClusterId, name: &str) -> Arc<dyn Session> {
    let session = coordinator.connect().await.unwrap();
    let node = WorkerNode {
        name: name.parse().unwrap(),
        hostname: "bench".into(),
        version: "0".into(),
        capacity: 1,
        labels: BTreeSet::new(),
        started_at: Utc::now(),
        containment: String::new(),
    };
    session
        .create(
            &layout::worker(cluster, &name.parse().unwrap()),
            &layout::encode(&node),
            NodeKind::Ephemeral,
        )
        .await
        .unwrap();
    session
}

async fn setup(coordinator: &ZkCoordinator, leader: &dyn Session) -> (Cluster, Fence) {
    let cluster = new_cluster();
    // The cluster's workers named in the ACLs of every node written, as the leader does.
    coordinator
        .access()
        .admit_cluster(cluster.id, cluster.token_rotated_at);
    leader.ensure_path(layout::ELECTION).await.unwrap();
    let node = leader
        .create(
            layout::ELECTION_PREFIX,
            b"bench",
            NodeKind::EphemeralSequential,
        )
        .await
        .unwrap();
    (
        cluster,
        Fence {
            election_node: node,
            writes: Arc::new(AtomicU64::new(0)),
        },
    )
}

/// Deletes `paths` in batches (not timed): what a measurement wrote.
async fn remove(session: &dyn Session, paths: impl IntoIterator<Item = String>) {
    let ops: Vec<Op> = paths
        .into_iter()
        .map(|path| Op::Delete {
            path,
            version: None,
        })
        .collect();
    for chunk in ops.chunks(BATCH) {
        session.multi(chunk.to_vec()).await.unwrap();
    }
}

/// One tree's cluster in a round: its leader, workers, tasks and the leader's state.
struct Side {
    leader: Arc<dyn Session>,
    fence: Fence,
    state: ClusterState,
    tasks: Vec<Task>,
    workers: Vec<Arc<dyn Session>>,
}

impl Side {
    /// A new cluster of `tasks` tasks (none mirrored yet) and `workers` live workers.
    async fn new(
        coordinator: &ZkCoordinator,
        leader: &Arc<dyn Session>,
        tasks_count: usize,
        workers: impl Iterator<Item = String>,
    ) -> Side {
        let (cluster, fence) = setup(coordinator, leader.as_ref()).await;
        let all = tasks(&cluster, tasks_count);
        let mut state = ClusterState::load(leader.as_ref(), cluster.clone())
            .await
            .unwrap();
        let mut sessions = Vec::new();
        for name in workers {
            sessions.push(worker(coordinator, cluster.id, &name).await);
        }
        state.refresh_workers(leader.as_ref()).await.unwrap();
        Side {
            leader: leader.clone(),
            fence,
            state,
            tasks: all,
            workers: sessions,
        }
    }

    /// Deletes the cluster's assignments and tasks, and ends its workers' sessions.
    async fn remove(self) {
        let id = self.state.id();
        let mut paths: Vec<String> = self
            .state
            .assignments()
            .iter()
            .map(|(task, worker)| layout::assignment(id, worker, *task))
            .collect();
        paths.extend(self.tasks.iter().map(|t| layout::task(id, t.id)));
        remove(self.leader.as_ref(), paths).await;
        for session in self.workers {
            session.close().await;
        }
    }
}

/// One tree's figures in one round.
#[derive(Default)]
struct TreeRun {
    mirror: Duration,
    allocate: Duration,
    noop: Duration,
    mirror_writes: u64,
    allocate_writes: u64,
    failover: Vec<Duration>,
    notification: Vec<Duration>,
    failover_writes: u64,
    victim_tasks: usize,
}

/// One tree's figures in a round, on a fresh chroot: allocation, then failover. (One tree
/// at a time: with both trees' 400,000 znodes at once, the server's garbage collection
/// rather than its writes became the measurement.)
async fn tree_run(server: &PrivateZooKeeper, tree: Tree) -> TreeRun {
    let coordinator = coordinator(server, tree.access());
    let leader = coordinator.connect().await.unwrap();
    let mut run = TreeRun::default();

    // 1. Full allocation.
    let names = (0..WORKERS).map(|i| format!("w{i:02}"));
    let mut side = Side::new(&coordinator, &leader, TASKS, names).await;
    let started = Instant::now();
    side.state
        .mirror(leader.as_ref(), &side.fence, &side.tasks)
        .await
        .unwrap();
    run.mirror = started.elapsed();
    run.mirror_writes = side.fence.writes.swap(0, Ordering::Relaxed);
    let started = Instant::now();
    let moved = side
        .state
        .allocate(leader.as_ref(), &side.fence)
        .await
        .unwrap();
    run.allocate = started.elapsed();
    run.allocate_writes = side.fence.writes.swap(0, Ordering::Relaxed);
    assert_eq!(moved, TASKS);
    let started = Instant::now();
    let again = side
        .state
        .allocate(leader.as_ref(), &side.fence)
        .await
        .unwrap();
    run.noop = started.elapsed();
    assert_eq!(
        (again, side.fence.writes.load(Ordering::Relaxed)),
        (0, 0),
        "no change, no write"
    );
    side.remove().await;

    // 2. Failover: workers killed one after the other.
    let names = (0..FAILOVER_WORKERS).map(|i| format!("w{i}"));
    let mut side = Side::new(&coordinator, &leader, FAILOVER_TASKS, names).await;
    side.state
        .mirror(leader.as_ref(), &side.fence, &side.tasks)
        .await
        .unwrap();
    side.state
        .allocate(leader.as_ref(), &side.fence)
        .await
        .unwrap();
    let victim: WorkerId = "w3".parse().unwrap();
    run.victim_tasks = side
        .state
        .assignments()
        .values()
        .filter(|w| **w == victim)
        .count();
    side.fence.writes.store(0, Ordering::Relaxed);
    for kill in 0..KILLS {
        let index = 3 + kill;
        let (_, watch) = leader
            .children_and_watch(&layout::workers(side.state.id()))
            .await
            .unwrap();
        let t0 = Instant::now();
        side.workers[index].close().await;
        assert_eq!(watch.fired().await, WatchEvent::ChildrenChanged);
        let heard = t0.elapsed();
        side.state.refresh_workers(leader.as_ref()).await.unwrap();
        side.state
            .allocate(leader.as_ref(), &side.fence)
            .await
            .unwrap();
        run.failover.push(t0.elapsed());
        run.notification.push(heard);
        let name = format!("w{index}");
        assert!(
            !side
                .state
                .assignments()
                .values()
                .any(|w| w.as_str() == name)
        );
    }
    run.failover_writes = side.fence.writes.load(Ordering::Relaxed);
    side.remove().await;
    leader.close().await;
    run
}

/// The ACL bare creates are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grants {
    /// World-writable: the open tree's.
    World,
    /// The owner alone (one grant).
    Owner,
    /// The owner and the cluster's workers (two grants).
    OwnerAndCluster,
}

impl Grants {
    /// The ACL a tree with ACLs gives a cluster's node at `path`.
    fn on_acl_tree(path: impl Fn(ClusterId) -> String) -> Grants {
        let access = Tree::Acl.access();
        let cluster = new_cluster();
        access.admit_cluster(cluster.id, cluster.token_rotated_at);
        match access.acl_for(&path(cluster.id)).len() {
            1 => Grants::Owner,
            _ => Grants::OwnerAndCluster,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Grants::World => "world",
            Grants::Owner => "owner alone",
            Grants::OwnerAndCluster => "owner + cluster",
        }
    }
}

const GRANTS: [Grants; 3] = [Grants::World, Grants::Owner, Grants::OwnerAndCluster];

/// 100k bare creates (empty, persistent) with each ACL of [`GRANTS`], in the allocation's
/// batch size, at paths shaped like tasks (`/clusters/<c>/tasks/<task>`), each ACL on a
/// fresh chroot: one batch of each in turn (which goes first changing from batch to
/// batch), so that the ACLs meet the same load; each batch deleted once timed.
async fn bare_creates(server: &PrivateZooKeeper) -> [Duration; 3] {
    let mut sessions = Vec::new();
    let mut paths = Vec::new();
    for grants in GRANTS {
        let access = match grants {
            Grants::World => Access::open(),
            Grants::Owner | Grants::OwnerAndCluster => Access::owner(Credential::generate("bench")),
        };
        let cluster = new_cluster();
        if grants == Grants::OwnerAndCluster {
            // Named in the ACL of the cluster's tasks; not admitted, the owner is alone.
            access.admit_cluster(cluster.id, cluster.token_rotated_at);
        }
        let session = coordinator(server, access).connect().await.unwrap();
        session
            .ensure_path(&layout::tasks(cluster.id))
            .await
            .unwrap();
        paths.push(
            (0..TASKS)
                .map(|_| layout::task(cluster.id, TaskId::new()))
                .collect::<Vec<String>>(),
        );
        sessions.push(session);
    }
    let mut times = [Duration::ZERO; 3];
    for batch in 0..TASKS.div_ceil(BATCH) {
        for turn in 0..GRANTS.len() {
            let which = (batch + turn) % GRANTS.len();
            let ops: Vec<Op> = paths[which]
                .iter()
                .skip(batch * BATCH)
                .take(BATCH)
                .map(|path| Op::Create {
                    path: path.clone(),
                    data: Vec::new(),
                    kind: NodeKind::Persistent,
                })
                .collect();
            let started = Instant::now();
            sessions[which].multi(ops).await.unwrap();
            times[which] += started.elapsed();
        }
        for (session, paths) in sessions.iter().zip(&paths) {
            let written = paths.iter().skip(batch * BATCH).take(BATCH).cloned();
            remove(session.as_ref(), written).await;
        }
    }
    for session in sessions {
        session.close().await;
    }
    times
}

/// The client's own work for the ACLs of 100k paths ([`Access::acl_for`]).
fn acl_for_time(tree: Tree, path: impl Fn(ClusterId) -> String) -> Duration {
    let access = tree.access();
    let cluster = new_cluster();
    access.admit_cluster(cluster.id, cluster.token_rotated_at);
    let paths: Vec<String> = (0..TASKS).map(|_| path(cluster.id)).collect();
    let started = Instant::now();
    let grants: usize = paths.iter().map(|p| access.acl_for(p).len()).sum();
    let elapsed = started.elapsed();
    assert!(grants >= TASKS);
    elapsed
}

/// One round's figures.
struct Round {
    open: TreeRun,
    acl: TreeRun,
    /// Bare creates, by [`Grants`] (in its order).
    bare: [Duration; 3],
}

impl Round {
    fn bare(&self, grants: Grants) -> f64 {
        ms(self.bare[grants as usize])
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `median (min–max)`, with `digits` decimals.
fn spread(values: Vec<f64>, digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let median = median_of(values);
    format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` runs benches without `--bench`.
    }
    let begun = Instant::now();
    let server = PrivateZooKeeper::start_with_heap("1g").await;
    println!(
        "{ROUNDS} rounds; per round and tree: mirror + allocate {TASKS} tasks over {WORKERS} \
         workers, {KILLS} failovers at {FAILOVER_TASKS} tasks over {FAILOVER_WORKERS} \
         workers; and {TASKS} bare creates per ACL"
    );
    println!();
    println!(
        "| round | order | allocate open / ACLs ms | mirror open / ACLs ms | bare creates world / owner / owner+cluster ms |"
    );
    println!("|---|---|---:|---:|---:|");
    // The ACLs the tree with ACLs gives the nodes allocation and mirroring write.
    let assignment = |c: ClusterId| layout::assignment(c, &"w00".parse().unwrap(), TaskId::new());
    let task = |c: ClusterId| layout::task(c, TaskId::new());
    let assignments_acl = Grants::on_acl_tree(assignment);
    let tasks_acl = Grants::on_acl_tree(task);
    // Untimed: the first run in a process, on a fresh server, is up to 1.9× slower.
    tree_run(&server, Tree::Open).await;
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        // Even rounds: open tree first, bare creates last; odd rounds: the reverse.
        let (open, acl, bare) = if round % 2 == 0 {
            let open = tree_run(&server, Tree::Open).await;
            let acl = tree_run(&server, Tree::Acl).await;
            (open, acl, bare_creates(&server).await)
        } else {
            let bare = bare_creates(&server).await;
            let acl = tree_run(&server, Tree::Acl).await;
            (tree_run(&server, Tree::Open).await, acl, bare)
        };
        let figures = Round { open, acl, bare };
        println!(
            "| {} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} / {:.0} |",
            round + 1,
            if round % 2 == 1 {
                "ACLs first"
            } else {
                "open first"
            },
            ms(figures.open.allocate),
            ms(figures.acl.allocate),
            ms(figures.open.mirror),
            ms(figures.acl.mirror),
            figures.bare(Grants::World),
            figures.bare(Grants::Owner),
            figures.bare(Grants::OwnerAndCluster),
        );
        rounds.push(figures);
    }

    // Per-round figures, and ratios taken within each round.
    let each = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<f64>>();
    let median_failover = |run: &TreeRun| median_of(run.failover.iter().map(|d| ms(*d)).collect());
    let median_notification =
        |run: &TreeRun| median_of(run.notification.iter().map(|d| ms(*d)).collect());
    let all_of = |f: &dyn Fn(&Round) -> &Vec<Duration>| {
        rounds
            .iter()
            .flat_map(|r| f(r).iter().map(|d| ms(*d)))
            .collect::<Vec<f64>>()
    };
    let writes = |open: u64, acl: u64| {
        if open == acl {
            open.to_string()
        } else {
            format!("{open} / {acl}")
        }
    };
    let last = rounds.last().unwrap();

    println!();
    println!(
        "| measurement (median of {ROUNDS} rounds, min–max) | open tree ms | with ACLs ms | ACL ÷ open | znode writes |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| allocate {TASKS} tasks over {WORKERS} workers (assignments' ACL: {}) | {} | {} | {} | {} |",
        assignments_acl.label(),
        spread(each(&|r| ms(r.open.allocate)), 0),
        spread(each(&|r| ms(r.acl.allocate)), 0),
        spread(each(&|r| ms(r.acl.allocate) / ms(r.open.allocate)), 2),
        writes(last.open.allocate_writes, last.acl.allocate_writes),
    );
    println!(
        "| mirror {TASKS} task specs (tasks' ACL: {}) | {} | {} | {} | {} |",
        tasks_acl.label(),
        spread(each(&|r| ms(r.open.mirror)), 0),
        spread(each(&|r| ms(r.acl.mirror)), 0),
        spread(each(&|r| ms(r.acl.mirror) / ms(r.open.mirror)), 2),
        writes(last.open.mirror_writes, last.acl.mirror_writes),
    );
    println!(
        "| re-allocate with nothing changed | {} | {} | {} | 0 |",
        spread(each(&|r| ms(r.open.noop)), 1),
        spread(each(&|r| ms(r.acl.noop)), 1),
        spread(each(&|r| ms(r.acl.noop) / ms(r.open.noop)), 2),
    );
    println!(
        "| failover at {FAILOVER_TASKS} tasks / {FAILOVER_WORKERS} workers ({} kills per tree, ~{} tasks each) | {} | {} | {} | {} per round |",
        ROUNDS * KILLS,
        last.open.victim_tasks,
        spread(all_of(&|r| &r.open.failover), 1),
        spread(all_of(&|r| &r.acl.failover), 1),
        spread(
            each(&|r| median_failover(&r.acl) / median_failover(&r.open)),
            2
        ),
        writes(last.open.failover_writes, last.acl.failover_writes),
    );
    println!(
        "| ZooKeeper's notification of the vanished worker | {} | {} | {} | — |",
        spread(all_of(&|r| &r.open.notification), 1),
        spread(all_of(&|r| &r.acl.notification), 1),
        spread(
            each(&|r| median_notification(&r.acl) / median_notification(&r.open)),
            2
        ),
    );
    for grants in [Grants::Owner, Grants::OwnerAndCluster] {
        println!(
            "| {TASKS} bare creates (empty; world / {}) | {} | {} | {} | {TASKS} |",
            grants.label(),
            spread(each(&|r| r.bare(Grants::World)), 0),
            spread(each(&|r| r.bare(grants)), 0),
            spread(each(&|r| r.bare(grants) / r.bare(Grants::World)), 2),
        );
    }
    for (label, path) in [
        ("assignment", &assignment as &dyn Fn(ClusterId) -> String),
        ("task", &task),
    ] {
        println!(
            "| the client's `acl_for` for {TASKS} {label} paths (CPU, once) | {:.1} | {:.1} | — | — |",
            ms(acl_for_time(Tree::Open, path)),
            ms(acl_for_time(Tree::Acl, path)),
        );
    }

    println!();
    println!(
        "| figure ÷ its baseline (median of {ROUNDS} rounds, min–max) | open tree | with ACLs |"
    );
    println!("|---|---:|---:|");
    println!(
        "| allocate ÷ {TASKS} bare creates with the assignments' ACL | {} | {} |",
        spread(each(&|r| ms(r.open.allocate) / r.bare(Grants::World)), 2),
        spread(each(&|r| ms(r.acl.allocate) / r.bare(assignments_acl)), 2),
    );
    println!(
        "| mirror ÷ {TASKS} bare creates with the tasks' ACL | {} | {} |",
        spread(each(&|r| ms(r.open.mirror) / r.bare(Grants::World)), 2),
        spread(each(&|r| ms(r.acl.mirror) / r.bare(tasks_acl)), 2),
    );
    println!(
        "| failover ÷ ZooKeeper's notification | {} | {} |",
        spread(
            each(&|r| median_failover(&r.open) / median_notification(&r.open)),
            2
        ),
        spread(
            each(&|r| median_failover(&r.acl) / median_notification(&r.acl)),
            2
        ),
    );
    println!();
    println!("total {:.0} s", begun.elapsed().as_secs_f64());
}
