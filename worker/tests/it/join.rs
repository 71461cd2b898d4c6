//! Joining through the real API (fresh database), and the `cloudtask worker` entry point
//! end to end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Access, Credential};
use cloudtask_coord::{Coordinator, Session};
use cloudtask_core::config::Config;
use cloudtask_core::ids::ClusterId;
use cloudtask_testkit::{TestApi, fresh_zookeeper};
use cloudtask_worker::{JoinError, join};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{SESSION_TIMEOUT, registered_node, wait_node, within};

const ADMIN: &str = "admin@example.com";
const PASSWORD: &str = "correct horse battery";

/// A tenant with a cluster, made the way a user would: returns (tenant, cluster, token).
async fn cluster_with_token(api: &TestApi) -> (String, String, String) {
    api.create_user(ADMIN, PASSWORD, true).await;
    let admin = api.login(ADMIN, PASSWORD, None).await;
    let created = admin
        .run(
            "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id } }",
            json!({ "input": { "name": "alpha", "ownerEmail": "owner@alpha.example",
                               "ownerPassword": PASSWORD } }),
        )
        .await;
    let tenant = created.data()["createTenant"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let owner = api
        .login("owner@alpha.example", PASSWORD, Some(&tenant))
        .await;
    let cluster = owner
        .run(
            "mutation($n: String!) { createCluster(name: $n) { cluster { id } joinToken } }",
            json!({ "n": "alpha-cluster" }),
        )
        .await;
    let data = &cluster.data()["createCluster"];
    (
        tenant,
        data["cluster"]["id"].as_str().unwrap().to_owned(),
        data["joinToken"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn join_trades_the_token_for_a_cluster_credential() {
    let api = TestApi::start().await;
    let (tenant, cluster, token) = cluster_with_token(&api).await;
    let joined = within("join", join(&api.url, &token, &CancellationToken::new()))
        .await
        .expect("joined");
    assert_eq!(joined.cluster_id.to_string(), cluster);
    assert_eq!(joined.tenant_id.to_string(), tenant);
    assert!(!joined.credential.is_empty());
    assert!(joined.expires_at > chrono::Utc::now());
    assert!(
        !format!("{joined:?}").contains(&joined.credential),
        "the credential stays out of logs"
    );
    // The trailing slash of a configured URL is fine.
    let again = within(
        "join",
        join(&format!("{}/", api.url), &token, &CancellationToken::new()),
    )
    .await
    .expect("joined");
    assert_eq!(again.cluster_id, joined.cluster_id);
}

#[tokio::test]
async fn a_wrong_token_is_refused_for_good() {
    let api = TestApi::start().await;
    cluster_with_token(&api).await;
    let err = within(
        "join",
        join(&api.url, "not-a-token", &CancellationToken::new()),
    )
    .await
    .expect_err("refused");
    assert!(matches!(err, JoinError::BadToken { .. }), "{err:?}");
    assert!(err.to_string().contains("CLOUDTASK_CLUSTER_TOKEN"), "{err}");
}

#[tokio::test]
async fn an_unreachable_api_is_retried_until_shutdown() {
    // A port that was just free: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let shutdown = CancellationToken::new();
    let mut joining = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { join(&format!("http://127.0.0.1:{port}"), "token", &shutdown).await }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), &mut joining)
            .await
            .is_err(),
        "join keeps retrying while the API is unreachable"
    );
    shutdown.cancel();
    let result = within("join to stop", joining).await.unwrap();
    assert!(matches!(result, Err(JoinError::Cancelled)), "{result:?}");
}

/// An API that answers 503 to the first `failures` requests, then a join answer.
async fn flaky_api(failures: usize, cluster: ClusterId) -> (String, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let url = cloudtask_testkit::stand_in_api(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) < failures {
            (
                "503 Service Unavailable",
                json!({ "error": "starting", "code": "UNAVAILABLE" }).to_string(),
            )
        } else {
            (
                "200 OK",
                json!({ "credential": "c", "expiresAt": "2099-01-01T00:00:00Z",
                        "tenantId": cloudtask_core::ids::TenantId::new().to_string(),
                        "clusterId": cluster.to_string() })
                .to_string(),
            )
        }
    })
    .await;
    (url, served)
}

#[tokio::test]
async fn server_errors_are_retried_until_the_api_answers() {
    let cluster = ClusterId::new();
    let (url, served) = flaky_api(2, cluster).await;
    let joined = within("join", join(&url, "token", &CancellationToken::new()))
        .await
        .expect("joined after the API recovered");
    assert_eq!(joined.cluster_id, cluster);
    assert_eq!(
        served.load(Ordering::SeqCst),
        3,
        "two refusals, then success"
    );
}

#[tokio::test]
async fn the_worker_joins_registers_and_leaves() {
    let api = TestApi::start().await;
    let (_, cluster, token) = cluster_with_token(&api).await;
    let cluster: ClusterId = cluster.parse().unwrap();
    let zookeeper = fresh_zookeeper();
    let config = Config {
        api_url: api.url.clone(),
        cluster_token: Some(token),
        zookeeper: zookeeper.clone(),
        zookeeper_session_timeout_ms: SESSION_TIMEOUT.as_millis() as u64,
        worker_name: Some("w-run".into()),
        worker_capacity: 3,
        worker_labels: "gpu, eu".into(),
        ..Config::default()
    };
    config.validate().expect("valid configuration");
    // The observer plays the scheduler taking the cluster on: the platform's identity,
    // the cluster's workers named in the ACLs, their folders made (a worker may not).
    let owner = Credential::parse(cloudtask_testkit::test_zookeeper_auth()).unwrap();
    let scheduler = ZkCoordinator::new(zookeeper, SESSION_TIMEOUT).with(Access::owner(owner));
    let rotated_at = api
        .catalogue
        .cluster_by_id(cluster)
        .await
        .unwrap()
        .unwrap()
        .token_rotated_at;
    scheduler.access().admit_cluster(cluster, rotated_at);
    let observer: Arc<dyn Session> = scheduler.connect().await.expect("observer");
    for folder in [layout::workers(cluster), layout::departures(cluster)] {
        observer.ensure_path(&folder).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { cloudtask_worker::run(&config, shutdown).await }
    });

    let node: WorkerNode = registered_node(observer.as_ref(), cluster, "w-run").await;
    assert_eq!(node.capacity, 3);
    assert_eq!(
        node.labels,
        ["eu".to_string(), "gpu".to_string()].into_iter().collect()
    );
    assert_eq!(node.version, env!("CARGO_PKG_VERSION"));

    shutdown.cancel();
    within("the worker to stop", running)
        .await
        .unwrap()
        .expect("clean stop");
    let path = layout::worker(cluster, &"w-run".parse().unwrap());
    wait_node(observer.as_ref(), &path, "the node to be gone", |n| {
        n.is_none()
    })
    .await;
    assert!(
        observer
            .get(&layout::departure(cluster, &"w-run".parse().unwrap()))
            .await
            .unwrap()
            .is_some(),
        "a clean leave"
    );
}
