//! Membership on the in-memory coordinator, where a session can be expired at an exact
//! point and the reconnect held back, so every intermediate state can be observed.

use std::sync::{Arc, Mutex};

use cloudtask_coord::layout;
use cloudtask_coord::memory::{MemoryCoordinator, MemorySession};
use cloudtask_coord::{Coordinator, Session};
use cloudtask_core::ids::ClusterId;
use cloudtask_worker::{Membership, MembershipStatus};
use tokio::sync::Semaphore;

use crate::support::{Worker, absent, assign, registered_node, tasks, wait_node, worker_node};

/// Hands out in-memory sessions one permit at a time and remembers them.
struct Gated {
    service: MemoryCoordinator,
    sessions: Mutex<Vec<Arc<MemorySession>>>,
    permits: Semaphore,
}

impl Gated {
    fn new() -> Arc<Gated> {
        Arc::new(Gated {
            service: MemoryCoordinator::new(),
            sessions: Mutex::default(),
            permits: Semaphore::new(0),
        })
    }

    fn allow_one(&self) {
        self.permits.add_permits(1);
    }

    fn latest(&self) -> Arc<MemorySession> {
        self.sessions
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a session")
    }
}

#[async_trait::async_trait]
impl Coordinator for Gated {
    async fn connect(&self) -> cloudtask_coord::Result<Arc<dyn Session>> {
        self.permits.acquire().await.expect("open").forget();
        let session = self.service.connect_memory();
        self.sessions.lock().unwrap().push(session.clone());
        Ok(session)
    }

    fn access(&self) -> &cloudtask_coord::Access {
        self.service.access()
    }

    fn with_access(&self, _: cloudtask_coord::Access) -> Arc<dyn Coordinator> {
        unimplemented!("these tests run on an open tree")
    }
}

#[tokio::test]
async fn expiry_drops_assignments_at_once_then_registers_again_under_a_new_epoch() {
    let gated = Gated::new();
    let observer = gated.service.connect_memory();
    let cluster = ClusterId::new();
    let me = worker_node("w1");
    gated.allow_one();
    let mut worker = Worker::start(Membership::new(gated.clone(), cluster, me.clone()));
    registered_node(observer.as_ref(), cluster, "w1").await;
    let t = tasks(2);
    assign(observer.as_ref(), cluster, "w1", &t[..1]).await;
    worker.expect_assignments(1, &t[..1]).await;

    gated.service.expire(&gated.latest());
    // The reconnect is held back: what is published now is what the worker does first.
    worker.expect_assignments(2, &[]).await;
    worker.expect_status(MembershipStatus::Connecting).await;
    let path = layout::worker(cluster, &"w1".parse().unwrap());
    assert!(
        absent(observer.as_ref(), &path).await,
        "node gone with the session"
    );
    assign(observer.as_ref(), cluster, "w1", &t[1..]).await;

    gated.allow_one();
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
    assert!(absent(observer.as_ref(), &path).await);
    assert!(
        observer
            .get(&layout::departure(cluster, &"w1".parse().unwrap()))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_node_removed_behind_the_workers_back_is_treated_as_a_lost_session() {
    let gated = Gated::new();
    let observer = gated.service.connect_memory();
    let cluster = ClusterId::new();
    gated.allow_one();
    let mut worker = Worker::start(Membership::new(gated.clone(), cluster, worker_node("w1")));
    registered_node(observer.as_ref(), cluster, "w1").await;
    let t = tasks(1);
    assign(observer.as_ref(), cluster, "w1", &t).await;
    worker.expect_assignments(1, &t).await;
    let first = gated.latest();

    let path = layout::worker(cluster, &"w1".parse().unwrap());
    observer.delete(&path, None).await.unwrap();
    worker.expect_assignments(2, &[]).await;
    assert!(
        first.state().borrow().is_terminal(),
        "the session whose registration was lost is closed"
    );

    gated.allow_one();
    registered_node(observer.as_ref(), cluster, "w1").await;
    worker.expect_assignments(2, &t).await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_before_registration_leaves_nothing_behind() {
    let gated = Gated::new();
    let observer = gated.service.connect_memory();
    let cluster = ClusterId::new();
    // No permit: the worker is still connecting when it is told to stop.
    let mut worker = Worker::start(Membership::new(gated.clone(), cluster, worker_node("w1")));
    worker.expect_status(MembershipStatus::Connecting).await;
    worker.stop().await.expect("clean stop");
    assert!(absent(observer.as_ref(), &layout::departures(cluster)).await);
}
