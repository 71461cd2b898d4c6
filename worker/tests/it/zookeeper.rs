//! Membership on real ZooKeeper.

use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Coordinator, NodeKind, Session, WatchEvent};
use cloudtask_core::ids::ClusterId;
use cloudtask_testkit::fresh_zookeeper;
use cloudtask_worker::{Assignments, Membership, MembershipStatus};

use crate::support::{
    Proxy, SESSION_TIMEOUT, Worker, absent, assign, connect, registered_node, tasks, unassign,
    wait_node, within, worker_node,
};

fn zookeeper() -> Arc<dyn Coordinator> {
    Arc::new(ZkCoordinator::new(fresh_zookeeper(), SESSION_TIMEOUT))
}

#[tokio::test]
async fn registers_and_publishes_every_assignment_change() {
    let coordinator = zookeeper();
    let observer = connect(&coordinator).await;
    let cluster = ClusterId::new();
    let me = worker_node("w1");
    let mut worker = Worker::start(Membership::new(coordinator.clone(), cluster, me.clone()));

    let registered = registered_node(observer.as_ref(), cluster, "w1").await;
    assert_eq!(registered, me, "the node carries the worker's payload");
    worker
        .expect_status(MembershipStatus::Registered { epoch: 1 })
        .await;
    worker.expect_assignments(1, &[]).await;

    // The scheduler creates the folder with the first assignments, then adds and removes.
    let t = tasks(3);
    assign(observer.as_ref(), cluster, "w1", &t[..2]).await;
    worker.expect_assignments(1, &t[..2]).await;
    assign(observer.as_ref(), cluster, "w1", &t[2..]).await;
    worker.expect_assignments(1, &t).await;
    unassign(observer.as_ref(), cluster, "w1", t[0]).await;
    worker.expect_assignments(1, &t[1..]).await;

    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn clean_shutdown_deletes_the_node_and_leaves_a_departure_marker() {
    let coordinator = zookeeper();
    let observer = connect(&coordinator).await;
    let cluster = ClusterId::new();
    let me = worker_node("w1");
    let mut worker = Worker::start(Membership::new(coordinator.clone(), cluster, me.clone()));
    registered_node(observer.as_ref(), cluster, "w1").await;
    let t = tasks(1);
    assign(observer.as_ref(), cluster, "w1", &t).await;
    worker.expect_assignments(1, &t).await;

    let node_path = layout::worker(cluster, &"w1".parse().unwrap());
    let marker_path = layout::departure(cluster, &"w1".parse().unwrap());
    let (_, node_watch) = observer.get_and_watch(&node_path).await.unwrap();
    let assignments = worker.assignments.clone();
    worker.stop().await.expect("clean stop");

    assert_eq!(
        within("the node's deletion", node_watch.fired()).await,
        WatchEvent::Deleted
    );
    assert!(
        absent(observer.as_ref(), &node_path).await,
        "worker node gone"
    );
    let marker = observer
        .get(&marker_path)
        .await
        .unwrap()
        .expect("the departure marker exists");
    let departed: WorkerNode = layout::decode(&marker_path, &marker.data).unwrap();
    assert_eq!(departed, me, "the marker names the incarnation that left");
    assert_eq!(
        *assignments.borrow(),
        Assignments {
            epoch: 1,
            tasks: Default::default()
        },
        "a stopped worker owns nothing"
    );
}

#[tokio::test]
async fn waits_for_a_previous_incarnation_then_registers_as_soon_as_it_is_gone() {
    let coordinator = zookeeper();
    let observer = connect(&coordinator).await;
    let previous_session = connect(&coordinator).await;
    let cluster = ClusterId::new();
    let path = layout::worker(cluster, &"w1".parse().unwrap());
    let previous = WorkerNode {
        hostname: "crashed-host".into(),
        started_at: chrono::Utc::now() - chrono::Duration::minutes(5),
        containment: String::new(),
        ..worker_node("w1")
    };
    previous_session
        .ensure_path(&layout::workers(cluster))
        .await
        .unwrap();
    previous_session
        .create(&path, &layout::encode(&previous), NodeKind::Ephemeral)
        .await
        .unwrap();

    let me = worker_node("w1");
    let mut worker = Worker::start(Membership::new(coordinator.clone(), cluster, me.clone()));
    worker
        .expect_status(MembershipStatus::WaitingForPreviousIncarnation { epoch: 1 })
        .await;
    let held: WorkerNode =
        layout::decode(&path, &observer.get(&path).await.unwrap().unwrap().data).unwrap();
    assert_eq!(
        held, previous,
        "the waiting worker leaves the old node alone"
    );

    previous_session.close().await;
    let payload = layout::encode(&me);
    wait_node(
        observer.as_ref(),
        &path,
        "the new incarnation's node",
        |n| n.is_some_and(|n| n.data == payload),
    )
    .await;
    worker
        .expect_status(MembershipStatus::Registered { epoch: 1 })
        .await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_name_held_by_a_live_worker_past_the_bound_is_an_error() {
    let coordinator = zookeeper();
    let holder = connect(&coordinator).await;
    let cluster = ClusterId::new();
    let path = layout::worker(cluster, &"w1".parse().unwrap());
    holder.ensure_path(&layout::workers(cluster)).await.unwrap();
    holder
        .create(
            &path,
            &layout::encode(&worker_node("w1")),
            NodeKind::Ephemeral,
        )
        .await
        .unwrap();

    let worker = Worker::start(
        Membership::new(coordinator.clone(), cluster, worker_node("w1"))
            .previous_incarnation_wait(Duration::from_millis(300)),
    );
    let err = worker.finished().await.expect_err("a duplicate name fails");
    let message = err.to_string();
    assert!(
        message.contains("in use") && message.contains("CLOUDTASK_WORKER_NAME"),
        "{message}"
    );
    assert!(
        holder.get(&path).await.unwrap().is_some(),
        "the live holder's node is untouched"
    );
}

/// The connect string's server and chroot, to put a proxy in between.
fn split(connect: &str) -> (&str, &str) {
    let at = connect.find('/').expect("a chroot");
    connect.split_at(at)
}

/// A fresh chroot reached through a proxy that can cut it off (for the worker), and a
/// direct session on it (for the test to look).
async fn behind_a_proxy() -> (Proxy, Arc<dyn Coordinator>, Arc<dyn Session>) {
    let connect_string = fresh_zookeeper();
    let (server, chroot) = split(&connect_string);
    let proxy = Proxy::start(server).await;
    let direct: Arc<dyn Coordinator> =
        Arc::new(ZkCoordinator::new(connect_string.clone(), SESSION_TIMEOUT));
    let proxied: Arc<dyn Coordinator> = Arc::new(ZkCoordinator::new(
        format!("{}{chroot}", proxy.addr),
        SESSION_TIMEOUT,
    ));
    (proxy, proxied, connect(&direct).await)
}

#[tokio::test]
async fn a_lost_connection_keeps_assignments_and_resyncs_when_back() {
    let (proxy, proxied, observer) = behind_a_proxy().await;
    let cluster = ClusterId::new();
    let mut worker = Worker::start(Membership::new(proxied, cluster, worker_node("w1")));
    registered_node(observer.as_ref(), cluster, "w1").await;
    let t = tasks(2);
    assign(observer.as_ref(), cluster, "w1", &t[..1]).await;
    worker.expect_assignments(1, &t[..1]).await;

    proxy.cut();
    worker
        .expect_status(MembershipStatus::Disconnected { epoch: 1 })
        .await;
    assign(observer.as_ref(), cluster, "w1", &t[1..]).await;
    assert_eq!(
        worker.assignments.borrow().epoch,
        1,
        "a connection loss is not a session loss"
    );

    proxy.restore();
    worker
        .expect_status(MembershipStatus::Registered { epoch: 1 })
        .await;
    worker.expect_assignments(1, &t).await;
    worker.stop().await.expect("clean stop");
    assert!(
        observer
            .get(&layout::departure(cluster, &"w1".parse().unwrap()))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn an_expired_session_drops_everything_then_registers_again() {
    let (proxy, proxied, observer) = behind_a_proxy().await;
    let cluster = ClusterId::new();
    let me = worker_node("w1");
    let mut worker = Worker::start(Membership::new(proxied, cluster, me.clone()));
    registered_node(observer.as_ref(), cluster, "w1").await;
    let t = tasks(1);
    assign(observer.as_ref(), cluster, "w1", &t).await;
    worker.expect_assignments(1, &t).await;

    // Cut off past the session timeout: the server expires the session (the node
    // vanishes), then the client notices and the worker drops everything.
    let path = layout::worker(cluster, &"w1".parse().unwrap());
    proxy.cut();
    wait_node(
        observer.as_ref(),
        &path,
        "the node to vanish with its session",
        |n| n.is_none(),
    )
    .await;
    worker.expect_assignments(2, &[]).await;

    proxy.restore();
    let payload = layout::encode(&me);
    wait_node(
        observer.as_ref(),
        &path,
        "the worker to register again",
        |n| n.is_some_and(|n| n.data == payload),
    )
    .await;
    worker
        .expect_status(MembershipStatus::Registered { epoch: 2 })
        .await;
    worker.expect_assignments(2, &t).await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_long_disconnection_fences_the_worker_off_before_its_session_can_expire() {
    let (proxy, proxied, observer) = behind_a_proxy().await;
    let cluster = ClusterId::new();
    let membership =
        Membership::new(proxied, cluster, worker_node("w1")).fence_after(SESSION_TIMEOUT / 5);
    let mut worker = Worker::start(membership);
    registered_node(observer.as_ref(), cluster, "w1").await;
    let t = tasks(1);
    assign(observer.as_ref(), cluster, "w1", &t).await;
    worker.expect_assignments(1, &t).await;

    proxy.cut();
    worker
        .expect_status(MembershipStatus::Disconnected { epoch: 1 })
        .await;
    // Fenced: everything dropped under the next epoch while the session still lives on
    // the server (our node is there: nobody else can have been given our tasks yet).
    worker
        .expect_status(MembershipStatus::Fenced { epoch: 2 })
        .await;
    worker.expect_assignments(2, &[]).await;
    let path = layout::worker(cluster, &"w1".parse().unwrap());
    assert!(
        observer.get(&path).await.unwrap().is_some(),
        "fenced only after the session expired"
    );

    // The same session resumes: the assignments are read again, under the new epoch.
    proxy.restore();
    worker
        .expect_status(MembershipStatus::Registered { epoch: 2 })
        .await;
    worker.expect_assignments(2, &t).await;
    worker.stop().await.expect("clean stop");
}
