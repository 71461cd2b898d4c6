//! Allocation benchmark on real ZooKeeper (`cargo bench -p cloudtask-scheduler`), each
//! figure beside a baseline measured in the same run:
//!
//! 1. Full allocation of 100,000 tasks over 20 workers (time, znode writes), against
//!    writing the same number of bare znodes in the same batch size: ZooKeeper's floor.
//! 2. Failover at 10,000 tasks over 10 workers: from a worker's node vanishing to the new
//!    assignments being written, against the time ZooKeeper takes to tell a watcher that
//!    the node vanished at all.
//!
//! The tree has ACLs as deployed; `CLOUDTASK_BENCH_OPEN_TREE=1` runs it world-writable.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use cloudtask_catalogue::{Cluster, Task};
use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Access, Coordinator, Credential, NodeKind, Op, Session, WatchEvent};
use cloudtask_core::ids::{ClusterId, TaskId, TenantId};
use cloudtask_core::task::{TaskSpec, TaskState};
use cloudtask_scheduler::{ClusterState, Fence};

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
    let cluster = Cluster {
        id: ClusterId::new(),
        tenant_id: TenantId::new(),
        name: "bench".parse().unwrap(),
        token_rotated_at: Utc::now(),
        created_at: Utc::now(),
        default_limits: Default::default(),
    };
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

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` runs benches without `--bench`.
    }
    // With ACLs, as deployed (the platform's identity); `CLOUDTASK_BENCH_OPEN_TREE=1`
    // measures a world-writable tree instead, for comparison.
    let access = match std::env::var("CLOUDTASK_BENCH_OPEN_TREE") {
        Ok(_) => Access::open(),
        Err(_) => Access::owner(Credential::generate("bench")),
    };
    println!(
        "tree: {}",
        if access.is_open() {
            "open"
        } else {
            "with ACLs"
        }
    );
    let coordinator = ZkCoordinator::new(
        cloudtask_testkit::fresh_zookeeper(),
        Duration::from_secs(10),
    )
    .with(access);
    let leader = coordinator.connect().await.unwrap();

    // 1. Full allocation, 100k tasks over 20 workers.
    let (cluster, fence) = setup(&coordinator, leader.as_ref()).await;
    let all = tasks(&cluster, 100_000);
    let mut state = ClusterState::load(leader.as_ref(), cluster.clone())
        .await
        .unwrap();
    let mut workers = Vec::new();
    for i in 0..20 {
        workers.push(worker(&coordinator, cluster.id, &format!("w{i:02}")).await);
    }
    state.refresh_workers(leader.as_ref()).await.unwrap();
    let started = Instant::now();
    state.mirror(leader.as_ref(), &fence, &all).await.unwrap();
    let mirror_time = started.elapsed();
    let mirror_writes = fence.writes.swap(0, Ordering::Relaxed);
    let started = Instant::now();
    let moved = state.allocate(leader.as_ref(), &fence).await.unwrap();
    let allocate_time = started.elapsed();
    let allocate_writes = fence.writes.swap(0, Ordering::Relaxed);
    assert_eq!(moved, 100_000);
    let started = Instant::now();
    let again = state.allocate(leader.as_ref(), &fence).await.unwrap();
    let noop_time = started.elapsed();
    assert_eq!(
        (again, fence.writes.load(Ordering::Relaxed)),
        (0, 0),
        "no change, no write"
    );

    // Baseline: the same number of bare creates, same batch size.
    leader.ensure_path("/baseline").await.unwrap();
    let started = Instant::now();
    let ops: Vec<Op> = (0..100_000)
        .map(|i| Op::Create {
            path: format!("/baseline/n{i}"),
            data: Vec::new(),
            kind: NodeKind::Persistent,
        })
        .collect();
    for chunk in ops.chunks(1_000) {
        leader.multi(chunk.to_vec()).await.unwrap();
    }
    let baseline_time = started.elapsed();

    // 2. Failover at 10k tasks over 10 workers.
    let (cluster2, fence2) = setup(&coordinator, leader.as_ref()).await;
    let some = tasks(&cluster2, 10_000);
    let mut state2 = ClusterState::load(leader.as_ref(), cluster2.clone())
        .await
        .unwrap();
    let mut sessions = Vec::new();
    for i in 0..10 {
        sessions.push(worker(&coordinator, cluster2.id, &format!("w{i}")).await);
    }
    state2.refresh_workers(leader.as_ref()).await.unwrap();
    state2
        .mirror(leader.as_ref(), &fence2, &some)
        .await
        .unwrap();
    state2.allocate(leader.as_ref(), &fence2).await.unwrap();
    let victim_tasks = state2.assignments().values().filter(|w| *w == "w3").count();
    fence2.writes.store(0, Ordering::Relaxed);

    let mut reaction = Vec::new();
    let mut notification = Vec::new();
    for round in 0..5 {
        let name = format!("w{}", 3 + round);
        let index = 3 + round;
        let (_, watch) = leader
            .children_and_watch(&layout::workers(cluster2.id))
            .await
            .unwrap();
        let t0 = Instant::now();
        sessions[index].close().await;
        assert_eq!(watch.fired().await, WatchEvent::ChildrenChanged);
        let heard = t0.elapsed();
        state2.refresh_workers(leader.as_ref()).await.unwrap();
        state2.allocate(leader.as_ref(), &fence2).await.unwrap();
        reaction.push(t0.elapsed());
        notification.push(heard);
        assert!(!state2.assignments().values().any(|w| w.as_str() == name));
    }
    let failover_writes = fence2.writes.load(Ordering::Relaxed);
    let avg = |v: &[Duration]| v.iter().sum::<Duration>().as_secs_f64() * 1000.0 / v.len() as f64;
    let max = |v: &[Duration]| v.iter().max().unwrap().as_secs_f64() * 1000.0;

    println!();
    println!("| measurement | time ms | znode writes | baseline ms | ratio |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| allocate 100k tasks over 20 workers | {:.0} | {allocate_writes} | {:.0} (100k bare creates) | {:.2} |",
        allocate_time.as_secs_f64() * 1000.0,
        baseline_time.as_secs_f64() * 1000.0,
        allocate_time.as_secs_f64() / baseline_time.as_secs_f64()
    );
    println!(
        "| mirror 100k task specs | {:.0} | {mirror_writes} | {:.0} | {:.2} |",
        mirror_time.as_secs_f64() * 1000.0,
        baseline_time.as_secs_f64() * 1000.0,
        mirror_time.as_secs_f64() / baseline_time.as_secs_f64()
    );
    println!(
        "| re-allocate with nothing changed | {:.1} | 0 | — | — |",
        noop_time.as_secs_f64() * 1000.0
    );
    println!(
        "| failover at 10k tasks / 10 workers (avg of 5, max) | {:.1} (max {:.1}) | {} total, ~{victim_tasks} tasks per failure | {:.1} (ZooKeeper's own notification) | {:.2} |",
        avg(&reaction),
        max(&reaction),
        failover_writes,
        avg(&notification),
        avg(&reaction) / avg(&notification)
    );
    drop(workers);
}
