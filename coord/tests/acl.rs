//! The tree's ACLs, attacked with one cluster's worker identity and with none, on the real
//! ZooKeeper (a fresh chroot per test) and on the in-memory coordinator alike: both must
//! refuse the same things.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cloudtask_coord::acl::{self, Access, Credential};
use cloudtask_coord::layout;
use cloudtask_coord::memory::MemoryCoordinator;
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{CoordError, Coordinator, NodeKind, Op, Session};
use cloudtask_core::ids::{ClusterId, TaskId, WorkerId};

struct Tree {
    a: ClusterId,
    b: ClusterId,
    task_a: TaskId,
    task_b: TaskId,
    election_node: String,
    command_a: String,
    command_b: String,
}

/// What the scheduler writes: two clusters with a task, an assignment and a command
/// each, a worker of B, and the scheduler's election node.
async fn build(owner: &dyn Session, access: &Access) -> Tree {
    let (a, b) = (ClusterId::new(), ClusterId::new());
    let at = Utc::now();
    assert!(access.admit_cluster(a, at));
    assert!(access.admit_cluster(b, at));
    let (task_a, task_b) = (TaskId::new(), TaskId::new());
    let mut commands = Vec::new();
    for (cluster, task, worker) in [(a, task_a, "wa"), (b, task_b, "wb")] {
        let worker: WorkerId = worker.parse().unwrap();
        for dir in [
            layout::tasks(cluster),
            layout::workers(cluster),
            layout::worker_assignments(cluster, &worker),
            layout::commands(cluster, &worker),
            layout::departures(cluster),
        ] {
            owner.ensure_path(&dir).await.unwrap();
        }
        owner
            .create(&layout::task(cluster, task), b"{}", NodeKind::Persistent)
            .await
            .unwrap();
        owner
            .create(
                &layout::assignment(cluster, &worker, task),
                b"{}",
                NodeKind::Persistent,
            )
            .await
            .unwrap();
        let command = owner
            .create(
                &layout::command_prefix(cluster, &worker),
                b"{}",
                NodeKind::PersistentSequential,
            )
            .await
            .unwrap();
        commands.push(command);
    }
    owner.ensure_path(layout::ELECTION).await.unwrap();
    let election_node = owner
        .create(layout::ELECTION_PREFIX, b"", NodeKind::EphemeralSequential)
        .await
        .unwrap();
    Tree {
        a,
        b,
        task_a,
        task_b,
        election_node,
        command_b: commands.pop().unwrap(),
        command_a: commands.pop().unwrap(),
    }
}

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, CoordError>) {
    assert!(
        matches!(result, Err(CoordError::NoAuth(_))),
        "{what}: expected NoAuth, got {result:?}"
    );
}

async fn rules(coordinator: &dyn Coordinator) {
    let owner_access = coordinator.access().clone();
    let owner = coordinator.connect().await.unwrap();
    let tree = build(owner.as_ref(), &owner_access).await;
    let (a, b) = (tree.a, tree.b);
    // Cluster B's workers, as admitted; then A's worker, with the identity the API
    // would hand out for A's current token.
    let rotated_at = Utc::now();
    assert!(
        owner_access.admit_cluster(a, rotated_at),
        "A's token rotated"
    );
    acl::enforce_cluster(owner.as_ref(), &owner_access, a)
        .await
        .unwrap();
    let credential = owner_access.worker_credential(a, rotated_at).unwrap();
    let worker_a = coordinator
        .with_access(Access::cluster_worker(
            credential,
            a,
            owner_access.owner_id().unwrap(),
        ))
        .connect()
        .await
        .unwrap();
    let wa: WorkerId = "wa".parse().unwrap();
    let wb: WorkerId = "wb".parse().unwrap();

    // B's worker node exists (created by the scheduler's session here: a B worker's
    // identity is not needed to prove that A cannot touch it).
    owner
        .create(&layout::worker(b, &wb), b"{}", NodeKind::Ephemeral)
        .await
        .unwrap();

    // A's worker does its job: reads its tasks and assignments, registers, consumes
    // its command, leaves with a departure marker.
    assert!(
        worker_a
            .get(&layout::task(a, tree.task_a))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        worker_a
            .children(&layout::worker_assignments(a, &wa))
            .await
            .unwrap(),
        vec![tree.task_a.to_string()]
    );
    worker_a
        .ensure_path(&layout::workers(a))
        .await
        .expect("an existing folder is fine to ensure");
    worker_a
        .create(&layout::worker(a, &wa), b"{}", NodeKind::Ephemeral)
        .await
        .unwrap();
    assert_eq!(
        owner
            .get(&layout::worker(a, &wa))
            .await
            .unwrap()
            .unwrap()
            .data,
        b"{}",
        "the scheduler reads the worker's node"
    );
    assert_eq!(
        worker_a
            .children(&layout::commands(a, &wa))
            .await
            .unwrap()
            .len(),
        1
    );
    worker_a.get(&tree.command_a).await.unwrap().unwrap();
    worker_a.delete(&tree.command_a, None).await.unwrap();

    // Everything else is refused.
    refused(
        "read B's task",
        worker_a.get(&layout::task(b, tree.task_b)).await,
    );
    refused("list B's tasks", worker_a.children(&layout::tasks(b)).await);
    refused(
        "watch B's assignments",
        worker_a
            .children_and_watch(&layout::worker_assignments(b, &wb))
            .await
            .map(|(names, _)| names),
    );
    refused(
        "register under B",
        worker_a
            .create(&layout::worker(b, &wa), b"{}", NodeKind::Ephemeral)
            .await,
    );
    refused(
        "delete B's worker",
        worker_a.delete(&layout::worker(b, &wb), None).await,
    );
    for (cluster, worker, task) in [(a, &wa, tree.task_a), (b, &wb, tree.task_b)] {
        refused(
            "create an assignment",
            worker_a
                .create(
                    &layout::assignment(cluster, worker, TaskId::new()),
                    b"{}",
                    NodeKind::Persistent,
                )
                .await,
        );
        refused(
            "rewrite an assignment",
            worker_a
                .set(&layout::assignment(cluster, worker, task), b"{}", None)
                .await,
        );
        refused(
            "delete an assignment",
            worker_a
                .delete(&layout::assignment(cluster, worker, task), None)
                .await,
        );
        refused(
            "create an assignment folder",
            worker_a
                .create(
                    &layout::worker_assignments(cluster, &"other".parse().unwrap()),
                    b"",
                    NodeKind::Persistent,
                )
                .await,
        );
        refused(
            "write a command",
            worker_a
                .create(
                    &layout::command_prefix(cluster, worker),
                    b"{}",
                    NodeKind::PersistentSequential,
                )
                .await,
        );
        refused(
            "create a command folder",
            worker_a
                .create(
                    &layout::commands(cluster, &"other".parse().unwrap()),
                    b"",
                    NodeKind::Persistent,
                )
                .await,
        );
        refused(
            "rewrite a task",
            worker_a
                .set(&layout::task(cluster, task), b"{}", None)
                .await,
        );
    }
    refused(
        "consume B's command",
        worker_a.delete(&tree.command_b, None).await,
    );
    refused(
        "batch: delete B's assignment with A's departure",
        worker_a
            .multi(vec![
                Op::Create {
                    path: layout::departure(a, &wa),
                    data: b"{}".to_vec(),
                    kind: NodeKind::Persistent,
                },
                Op::Delete {
                    path: layout::assignment(b, &wb, tree.task_b),
                    version: None,
                },
            ])
            .await,
    );
    refused(
        "read the election node",
        worker_a.get(&tree.election_node).await,
    );
    refused(
        "delete the election node",
        worker_a.delete(&tree.election_node, None).await,
    );
    refused(
        "campaign",
        worker_a
            .create(layout::ELECTION_PREFIX, b"", NodeKind::EphemeralSequential)
            .await,
    );
    refused(
        "list the clusters",
        worker_a.children(layout::CLUSTERS).await,
    );
    refused(
        "create a cluster",
        worker_a
            .create(
                &layout::cluster(ClusterId::new()),
                b"{}",
                NodeKind::Persistent,
            )
            .await,
    );
    refused(
        "set B's ACL",
        worker_a
            .set_acl(
                &layout::task(b, tree.task_b),
                &[cloudtask_coord::Grant::anyone_all()],
            )
            .await,
    );

    // A clean leave: the marker and the deletion of its node, in one batch.
    worker_a
        .multi(vec![
            Op::Create {
                path: layout::departure(a, &wa),
                data: b"{}".to_vec(),
                kind: NodeKind::Persistent,
            },
            Op::Delete {
                path: layout::worker(a, &wa),
                version: None,
            },
        ])
        .await
        .unwrap();
    worker_a
        .set(&layout::departure(a, &wa), b"{\"again\":1}", None)
        .await
        .unwrap();

    // An anonymous connection sees nothing useful.
    let stranger = coordinator
        .with_access(Access::anonymous_on(&owner_access))
        .connect()
        .await
        .unwrap();
    refused("anonymous list", stranger.children(layout::CLUSTERS).await);
    refused(
        "anonymous read",
        stranger.get(&layout::task(a, tree.task_a)).await,
    );
    refused(
        "anonymous register",
        stranger
            .create(
                &layout::worker(a, &"x".parse().unwrap()),
                b"",
                NodeKind::Ephemeral,
            )
            .await,
    );
    refused(
        "anonymous election",
        stranger.children(layout::ELECTION).await,
    );

    // B's workers, under B's identity, are just as walled in.
    let worker_b = coordinator
        .with_access(Access::cluster_worker(
            owner_access.worker_credential(b, Utc::now()).unwrap(),
            b,
            owner_access.owner_id().unwrap(),
        ))
        .connect()
        .await
        .unwrap();
    refused(
        "a wrong identity (not B's current one) reads B",
        worker_b.get(&layout::task(b, tree.task_b)).await,
    );
    for session in [owner, worker_a, stranger, worker_b] {
        session.close().await;
    }
}

/// An older tree, written world-writable, is walled in by `enforce`.
async fn repair(open: &dyn Coordinator, owned: &dyn Coordinator) {
    let legacy = open.connect().await.unwrap();
    let access = owned.access().clone();
    let (a, b) = (ClusterId::new(), ClusterId::new());
    let task = TaskId::new();
    legacy.ensure_path(&layout::tasks(b)).await.unwrap();
    legacy
        .create(&layout::task(b, task), b"{\"env\":1}", NodeKind::Persistent)
        .await
        .unwrap();
    legacy.ensure_path(&layout::tasks(a)).await.unwrap();
    let at = Utc::now();
    access.admit_cluster(a, at);
    access.admit_cluster(b, at);
    let owner = owned.connect().await.unwrap();
    for cluster in [a, b] {
        let fixed = acl::enforce_cluster(owner.as_ref(), &access, cluster)
            .await
            .unwrap();
        assert!(fixed >= 2, "{fixed} nodes fixed");
        assert_eq!(
            acl::enforce_cluster(owner.as_ref(), &access, cluster)
                .await
                .unwrap(),
            0,
            "a second pass finds nothing to fix"
        );
    }
    let worker_a = owned
        .with_access(Access::cluster_worker(
            access.worker_credential(a, at).unwrap(),
            a,
            access.owner_id().unwrap(),
        ))
        .connect()
        .await
        .unwrap();
    refused(
        "read B's repaired task",
        worker_a.get(&layout::task(b, task)).await,
    );
    refused("anonymous", legacy.get(&layout::task(b, task)).await);
    assert!(
        worker_a
            .children(&layout::tasks(a))
            .await
            .unwrap()
            .is_empty()
    );
}

fn owner_access() -> Access {
    Access::owner(Credential::generate("cloudtask"))
}

#[tokio::test]
async fn in_memory_refuses_what_zookeeper_refuses() {
    let service = MemoryCoordinator::new();
    rules(&service.as_access(owner_access())).await;
}

#[tokio::test]
async fn zookeeper_refuses_a_clusters_worker_everything_outside_its_part() {
    let connect = cloudtask_testkit::fresh_zookeeper();
    let coordinator = ZkCoordinator::new(&connect, Duration::from_secs(6)).with(owner_access());
    rules(&coordinator).await;
}

#[tokio::test]
async fn an_open_tree_is_repaired_in_memory() {
    let service = MemoryCoordinator::new();
    repair(&service, &service.as_access(owner_access())).await;
}

#[tokio::test]
async fn an_open_tree_is_repaired_in_zookeeper() {
    let connect = cloudtask_testkit::fresh_zookeeper();
    let open = ZkCoordinator::new(&connect, Duration::from_secs(6));
    let owned: Arc<dyn Coordinator> = open.with_access(owner_access());
    repair(&open, owned.as_ref()).await;
}
