//! The leader on real ZooKeeper (a fresh chroot) and real Postgres (a fresh database):
//! balance, failover that moves only the failed worker's tasks, joins that move about
//! 1/N, pause and delete, leader failover with nothing rewritten, offline events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use cloudtask_catalogue::{Catalogue, NewTask, TenantHandle};
use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Coordinator, NodeKind, Session};
use cloudtask_core::ids::{ClusterId, TaskId, WorkerId};
use cloudtask_core::task::{TaskSpec, TaskState};
use cloudtask_scheduler::Scheduler;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    catalogue: Catalogue,
    tenant: TenantHandle,
    cluster: ClusterId,
    zk: ZkCoordinator,
    observer: Arc<dyn Session>,
}

async fn setup(tasks: usize) -> Setup {
    let catalogue = Catalogue::connect(&cloudtask_testkit::fresh_database().await)
        .await
        .unwrap();
    catalogue.migrate().await.unwrap();
    let (_, handle) = cloudtask_testkit::owned_tenant(&catalogue, "t").await;
    let cluster = handle
        .create_cluster("main", "hash".into())
        .await
        .unwrap()
        .id;
    for i in 0..tasks {
        handle
            .create_task(new_task(cluster, &format!("task-{i}")), None)
            .await
            .unwrap();
    }
    let zk = ZkCoordinator::new(cloudtask_testkit::fresh_zookeeper(), Duration::from_secs(4));
    let observer = zk.connect().await.unwrap();
    Setup {
        catalogue,
        tenant: handle,
        cluster,
        zk,
        observer,
    }
}

fn new_task(cluster: ClusterId, name: &str) -> NewTask {
    NewTask {
        cluster_id: cluster,
        name: name.into(),
        description: String::new(),
        state: TaskState::Active,
        spec: TaskSpec::new("* * * * *", "true"),
    }
}

fn start_scheduler(setup: &Setup, identity: &str) -> (CancellationToken, Arc<AtomicU64>) {
    let shutdown = CancellationToken::new();
    let writes = Arc::new(AtomicU64::new(0));
    let scheduler = Scheduler {
        catalogue: setup.catalogue.clone(),
        coordinator: Arc::new(setup.zk.clone()),
        identity: identity.into(),
        sweep: Duration::from_secs(3600),
        writes: writes.clone(),
        notifier: None,
        pruning: None,
    };
    tokio::spawn(scheduler.run(shutdown.clone()));
    (shutdown, writes)
}

/// A worker as ZooKeeper sees it: a session holding an ephemeral node.
async fn join(setup: &Setup, name: &str) -> Arc<dyn Session> {
    let name: WorkerId = name.parse().unwrap();
    let session = setup.zk.connect().await.unwrap();
    session
        .ensure_path(&layout::workers(setup.cluster))
        .await
        .unwrap();
    let node = WorkerNode {
        name: name.clone(),
        hostname: "test".into(),
        version: "0".into(),
        capacity: 1,
        labels: BTreeSet::new(),
        started_at: Utc::now(),
        containment: String::new(),
    };
    session
        .create(
            &layout::worker(setup.cluster, &name),
            &layout::encode(&node),
            NodeKind::Ephemeral,
        )
        .await
        .unwrap();
    session
}

/// task → owner, as written in ZooKeeper. The folders are read one after the other while
/// the leader moves tasks between them in atomic batches, so a read can be torn (a task
/// seen in two folders or in none): a snapshot counts only when two reads agree.
async fn assignments(setup: &Setup) -> HashMap<TaskId, String> {
    let mut last = read_assignments(setup).await;
    loop {
        let next = read_assignments(setup).await;
        if let (Some(a), Some(b)) = (&last, &next)
            && a == b
        {
            return next.unwrap();
        }
        last = next;
    }
}

/// One pass over the folders; None when a task shows up twice (a torn read).
async fn read_assignments(setup: &Setup) -> Option<HashMap<TaskId, String>> {
    let mut owners = HashMap::new();
    let root = layout::assignments(setup.cluster);
    let Ok(workers) = setup.observer.children(&root).await else {
        return Some(owners);
    };
    for worker in workers {
        let name: WorkerId = worker.parse().unwrap();
        for task in setup
            .observer
            .children(&layout::worker_assignments(setup.cluster, &name))
            .await
            .unwrap_or_default()
        {
            if owners
                .insert(task.parse().unwrap(), worker.clone())
                .is_some()
            {
                return None;
            }
        }
    }
    Some(owners)
}

/// Polls ZooKeeper until `done` holds; each poll is a fresh read of the real state.
async fn until(
    setup: &Setup,
    what: &str,
    done: impl Fn(&HashMap<TaskId, String>) -> bool,
) -> HashMap<TaskId, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let current = assignments(setup).await;
        if done(&current) {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; have {} assignments",
            current.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counts(owners: &HashMap<TaskId, String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for owner in owners.values() {
        *counts.entry(owner.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn balance_failover_join_and_leader_change() {
    let setup = setup(300).await;
    let (leader, _) = start_scheduler(&setup, "scheduler-a");
    let _w1 = join(&setup, "w1").await;
    let w2 = join(&setup, "w2").await;
    let _w3 = join(&setup, "w3").await;

    // Three workers: everything assigned, balanced within ±25 %.
    let before = until(&setup, "300 tasks over 3 workers", |a| {
        a.len() == 300 && counts(a).len() == 3
    })
    .await;
    for (worker, n) in counts(&before) {
        assert!((75..=125).contains(&n), "{worker} holds {n} of 300");
    }

    // A fourth worker joins: about 1/4 move, all to it.
    let _w4 = join(&setup, "w4").await;
    let joined = until(&setup, "w4 to take tasks", |a| {
        a.values().any(|w| w == "w4")
    })
    .await;
    let moved: Vec<_> = before
        .iter()
        .filter(|(t, w)| joined.get(*t) != Some(*w))
        .collect();
    assert!(
        moved.len() as f64 <= 300.0 * 1.2 / 4.0,
        "{} moved",
        moved.len()
    );
    for (task, _) in &moved {
        assert_eq!(joined[*task], "w4", "a moved task went elsewhere");
    }

    // A worker's session dies: exactly its tasks move, all to survivors.
    w2.close().await;
    let after = until(&setup, "w2's tasks to move", |a| {
        a.len() == 300 && !a.values().any(|w| w == "w2")
    })
    .await;
    for (task, owner) in &joined {
        if owner == "w2" {
            assert_ne!(after[task], "w2");
        } else {
            assert_eq!(&after[task], owner, "task {task} of a survivor moved");
        }
    }
    // …and the failure is an offline event in the outbox and the audit log.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events = setup
            .catalogue
            .outbox_kinds(setup.tenant.tenant_id())
            .await
            .unwrap();
        if events
            .iter()
            .any(|(kind, payload)| kind == "WORKER_OFFLINE" && payload["worker"] == "w2")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no offline event: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Pause and delete take assignments away; the catalogue notification is heard fast.
    let mut ids: Vec<TaskId> = after.keys().copied().collect();
    ids.sort();
    setup
        .tenant
        .set_task_state(ids[0], TaskState::Paused)
        .await
        .unwrap();
    setup.tenant.delete_task(ids[1]).await.unwrap();
    let started = tokio::time::Instant::now();
    let trimmed = until(
        &setup,
        "paused and deleted tasks to lose their assignment",
        |a| a.len() == 298,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "reacted in {:?}",
        started.elapsed()
    );
    assert!(!trimmed.contains_key(&ids[0]) && !trimmed.contains_key(&ids[1]));

    // A standby takes over when the leader goes, and rewrites nothing.
    let (standby, standby_writes) = start_scheduler(&setup, "scheduler-b");
    let deadline = tokio::time::Instant::now() + WAIT;
    while setup
        .observer
        .children(layout::ELECTION)
        .await
        .unwrap()
        .len()
        != 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby did not campaign"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leader.cancel();
    let deadline = tokio::time::Instant::now() + WAIT;
    while setup
        .observer
        .children(layout::ELECTION)
        .await
        .unwrap()
        .len()
        != 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old leader did not step down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new leader proves it leads by reacting to a change: a new task gets assigned.
    let extra = setup
        .tenant
        .create_task(new_task(setup.cluster, "extra"), None)
        .await
        .unwrap();
    let final_state = until(&setup, "the new leader to assign a new task", |a| {
        a.contains_key(&extra.id)
    })
    .await;
    for (task, owner) in &trimmed {
        assert_eq!(&final_state[task], owner, "leader change moved task {task}");
    }
    assert_eq!(
        standby_writes.load(Ordering::Relaxed),
        2,
        "only the new task's node and its assignment were written"
    );
    standby.cancel();
}
