//! The same behaviour from both implementations: the in-memory one must not promise what
//! ZooKeeper does not do, and the other way round. ZooKeeper runs for real, in a fresh
//! chroot per test.

use std::time::Duration;

use cloudtask_coord::memory::MemoryCoordinator;
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{CoordError, Coordinator, NodeKind, Op, SessionState, WatchEvent};

const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn conformance(coordinator: &dyn Coordinator) {
    let worker = coordinator.connect().await.unwrap();
    let observer = coordinator.connect().await.unwrap();
    assert_eq!(*worker.state().borrow(), SessionState::Connected);

    // Paths, ephemerals, children watches.
    worker.ensure_path("/clusters/c1/workers").await.unwrap();
    worker.ensure_path("/clusters/c1/workers").await.unwrap(); // idempotent
    let (children, watch) = observer
        .children_and_watch("/clusters/c1/workers")
        .await
        .unwrap();
    assert!(children.is_empty());
    worker
        .create("/clusters/c1/workers/w1", b"{\"n\":1}", NodeKind::Ephemeral)
        .await
        .unwrap();
    assert_eq!(
        within("children watch", watch.fired()).await,
        WatchEvent::ChildrenChanged
    );
    assert_eq!(
        worker
            .create("/clusters/c1/workers/w1", b"", NodeKind::Ephemeral)
            .await,
        Err(CoordError::NodeExists("/clusters/c1/workers/w1".into()))
    );

    // Data, versions, data watches.
    let (node, watch) = observer
        .get_and_watch("/clusters/c1/workers/w1")
        .await
        .unwrap();
    assert_eq!(node.unwrap().data, b"{\"n\":1}");
    let v = worker
        .set("/clusters/c1/workers/w1", b"{\"n\":2}", Some(0))
        .await
        .unwrap();
    assert_eq!(v, 1);
    assert_eq!(
        within("data watch", watch.fired()).await,
        WatchEvent::DataChanged
    );
    assert!(matches!(
        worker.set("/clusters/c1/workers/w1", b"", Some(0)).await,
        Err(CoordError::BadVersion(_))
    ));
    let (absent, watch) = observer.get_and_watch("/clusters/c1/late").await.unwrap();
    assert!(absent.is_none());
    worker
        .create("/clusters/c1/late", b"", NodeKind::Persistent)
        .await
        .unwrap();
    assert_eq!(
        within("creation watch", watch.fired()).await,
        WatchEvent::Created
    );

    // Sequential names increase.
    worker.ensure_path("/scheduler/election").await.unwrap();
    let a = worker
        .create("/scheduler/election/n_", b"", NodeKind::EphemeralSequential)
        .await
        .unwrap();
    let b = observer
        .create("/scheduler/election/n_", b"", NodeKind::EphemeralSequential)
        .await
        .unwrap();
    assert!(a < b, "{a} < {b}");
    assert!(a.starts_with("/scheduler/election/n_"));

    // Atomic batches: all or nothing.
    let failed = worker
        .multi(vec![
            Op::Create {
                path: "/clusters/c1/tasks".into(),
                data: vec![],
                kind: NodeKind::Persistent,
            },
            Op::Delete {
                path: "/clusters/c1/missing".into(),
                version: None,
            },
        ])
        .await;
    assert!(matches!(failed, Err(CoordError::NoNode(p)) if p == "/clusters/c1/missing"));
    assert_eq!(worker.get("/clusters/c1/tasks").await.unwrap(), None);
    worker
        .multi(vec![
            Op::Create {
                path: "/clusters/c1/tasks".into(),
                data: vec![],
                kind: NodeKind::Persistent,
            },
            Op::Create {
                path: "/clusters/c1/tasks/t1".into(),
                data: b"x".to_vec(),
                kind: NodeKind::Persistent,
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        worker.children("/clusters/c1/tasks").await.unwrap(),
        vec!["t1".to_string()]
    );
    assert!(matches!(
        worker.delete("/clusters/c1/tasks", None).await,
        Err(CoordError::NotEmpty(_))
    ));

    // A closed session's ephemerals vanish at once, and watchers hear of it.
    let (_, watch) = observer
        .children_and_watch("/clusters/c1/workers")
        .await
        .unwrap();
    worker.close().await;
    assert_eq!(
        within("ephemeral removal", watch.fired()).await,
        WatchEvent::ChildrenChanged
    );
    assert!(
        observer
            .children("/clusters/c1/workers")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        observer
            .children("/scheduler/election")
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        worker.get("/clusters").await.is_err(),
        "a closed session does nothing"
    );

    cloudtask_coord::delete_recursive(observer.as_ref(), "/clusters")
        .await
        .unwrap();
    assert_eq!(observer.get("/clusters").await.unwrap(), None);
}

#[tokio::test]
async fn in_memory_conforms() {
    conformance(&MemoryCoordinator::new()).await;
}

#[tokio::test]
async fn zookeeper_conforms_in_a_chroot() {
    let connect = cloudtask_testkit::fresh_zookeeper();
    conformance(&ZkCoordinator::new(&connect, Duration::from_secs(6))).await;
    // Everything happened inside the chroot.
    let (server, chroot) = connect.split_once('/').unwrap();
    let unrooted = ZkCoordinator::new(format!("{server}/"), Duration::from_secs(6))
        .connect()
        .await
        .unwrap();
    let inside = unrooted.children(&format!("/{chroot}")).await.unwrap();
    assert_eq!(inside, vec!["scheduler".to_string()]);
    cloudtask_coord::delete_recursive(unrooted.as_ref(), &format!("/{chroot}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_connect_string_without_a_chroot_works_under_the_default_root() {
    let server = cloudtask_testkit::fresh_zookeeper();
    let server = &server[..server.find('/').expect("a chroot")];
    let bare = ZkCoordinator::new(server, Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let root = ZkCoordinator::new(format!("{server}/"), Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let probe = format!("/probe_{}", uuid::Uuid::new_v4().simple());
    bare.create(&probe, b"here", NodeKind::Ephemeral)
        .await
        .unwrap();
    let seen = root.get(&format!("/cloudtask{probe}")).await.unwrap();
    assert_eq!(seen.map(|n| n.data), Some(b"here".to_vec()));
    assert!(root.get(&probe).await.unwrap().is_none());
    bare.close().await;
}
