//! ZooKeeper over TLS (`tcp+tls://` hosts, `zookeeper_tls_ca`) against a real TLS-only
//! server: a private ZooKeeper whose only client port is a Netty `secureClientPort`, its
//! certificate signed by a CA made for the test.

use std::time::Duration;

use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{CoordError, Coordinator, layout};
use cloudtask_testkit::{PrivateZooKeeper, TestCa};
use serde_json::json;

use crate::harness::{Cluster, Options, at, status};

const SESSION_TIMEOUT: Duration = Duration::from_secs(15);

fn ca_of(zookeeper: &PrivateZooKeeper) -> std::path::PathBuf {
    zookeeper.ca_file().expect("a TLS server").to_owned()
}

#[tokio::test]
async fn the_scheduler_and_a_worker_run_tasks_over_tls_only_and_survive_a_server_restart() {
    let mut zookeeper = PrivateZooKeeper::start_tls().await;
    // TLS only: the port does not speak plain ZooKeeper (not even `ruok`), and a plain
    // client gets no session.
    assert!(!zookeeper.ruok().await, "the TLS port answered in clear");
    let plain = ZkCoordinator::new(
        format!("127.0.0.1:{}/plain", zookeeper.port),
        Duration::from_secs(2),
    )
    .connect()
    .await;
    assert!(plain.is_err(), "a plain client got a session");

    let chroot = format!("/cloudtask_test_{}", uuid::Uuid::new_v4().simple());
    let connect_string = zookeeper.connect_string(&chroot);
    assert!(connect_string.starts_with("tcp+tls://127.0.0.1:"));
    // API in this process; scheduler and worker as `cloudtask` processes configured as
    // an operator would (CLOUDTASK_ZOOKEEPER=tcp+tls://…, CLOUDTASK_ZOOKEEPER_TLS_CA).
    let mut cluster = Cluster::start_with(Options {
        zookeeper: Some(connect_string),
        zookeeper_tls_ca: Some(ca_of(&zookeeper)),
        session_timeout: SESSION_TIMEOUT,
        in_process_scheduler: false,
        ..Options::default()
    })
    .await;
    cluster.spawn_scheduler_process("s1");
    cluster.spawn_worker_process("w1");
    let task = cluster
        .create_task(json!({
            "name": "over-tls",
            "schedule": "*/2 * * * * *",
            "command": "echo fired-over-tls",
        }))
        .await;
    let logs = cluster.data.path().display().to_string();
    let runs = cluster
        .runs_until(&task, "a run over TLS", |runs| {
            runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    let ran = runs.iter().find(|r| status(r) == "SUCCEEDED").unwrap();
    assert_eq!(ran["worker"], "w1", "{ran}");
    assert_eq!(ran["logs"][0]["text"], "fired-over-tls", "{ran}");
    assert_eq!(cluster.assigned_worker(&task).await.as_deref(), Some("w1"));

    // The tree, read over TLS with the platform's identity: the worker registered and
    // holds the assignment.
    let observer = cluster
        .observer()
        .connect()
        .await
        .expect("the owner over TLS");
    let cluster_id = cluster.cluster_id.parse().unwrap();
    let w1 = "w1".parse().unwrap();
    assert!(
        observer
            .get(&layout::worker(cluster_id, &w1))
            .await
            .unwrap()
            .is_some(),
        "w1's membership node (logs in {logs})"
    );
    assert!(
        observer
            .get(&layout::assignment(cluster_id, &w1, task.parse().unwrap()))
            .await
            .unwrap()
            .is_some(),
        "w1's assignment"
    );
    observer.close().await;

    // A crash and restart of the server, shorter than the session timeout: the sessions
    // resume over TLS (a new handshake each) and the task fires again on the same worker.
    zookeeper.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    zookeeper.restart().await;
    let back_at = chrono::Utc::now();
    cluster
        .runs_until(&task, "a run after the server's restart", |runs| {
            runs.iter().any(|r| {
                at(r, "scheduledAt") > back_at + chrono::Duration::seconds(2)
                    && status(r) == "SUCCEEDED"
            })
        })
        .await;
    assert_eq!(cluster.assigned_worker(&task).await.as_deref(), Some("w1"));
}

#[tokio::test]
async fn a_client_trusting_another_ca_is_refused_with_a_clear_error() {
    let zookeeper = PrivateZooKeeper::start_tls().await;
    let other = tempfile::tempdir().unwrap();
    let stranger_ca = TestCa::new(other.path());
    let pem = |path: &std::path::Path| Some(std::fs::read_to_string(path).unwrap());
    let chroot = format!("/cloudtask_test_{}", uuid::Uuid::new_v4().simple());

    let started = std::time::Instant::now();
    let refused = ZkCoordinator::new(zookeeper.connect_string(&chroot), Duration::from_secs(4))
        .with_tls_ca(pem(&stranger_ca.cert))
        .connect()
        .await;
    let elapsed = started.elapsed();
    match refused {
        Err(CoordError::Other(message)) => {
            assert!(
                message.contains("invalid peer certificate")
                    && message.contains("zookeeper_tls_ca")
                    && message.contains(&format!("127.0.0.1:{}", zookeeper.port)),
                "an unclear error: {message}"
            );
        }
        Err(other) => panic!("expected a certificate error, got {other:?}"),
        Ok(_) => panic!("a client trusting another CA got a session"),
    }
    assert!(
        elapsed < Duration::from_secs(10),
        "refused only after {elapsed:?}"
    );

    // It never reached the server: its chroot was not created. The right CA connects.
    let trusted = ZkCoordinator::new(zookeeper.connect_string("/"), Duration::from_secs(4))
        .with_tls_ca(pem(&ca_of(&zookeeper)))
        .connect()
        .await
        .expect("the server's own CA is trusted");
    assert!(
        trusted.get(&chroot).await.unwrap().is_none(),
        "the refused client created its chroot"
    );
    trusted.close().await;

    // A `cloudtask worker` given the other CA joins through the API but gets no session:
    // it says why in its log, and never registers.
    let mut cluster = Cluster::start_with(Options {
        zookeeper: Some(zookeeper.connect_string(&chroot)),
        zookeeper_tls_ca: Some(ca_of(&zookeeper)),
        session_timeout: Duration::from_secs(4),
        ..Options::default()
    })
    .await;
    cluster.wait_cluster_mirrored().await;
    let right_ca = cluster.zookeeper_tls_ca.replace(stranger_ca.cert.clone());
    cluster.spawn_worker_process("misled");
    cluster.zookeeper_tls_ca = right_ca;
    let log = cluster.data.path().join("misled").join("worker.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("invalid peer certificate") && text.contains("zookeeper_tls_ca") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never said why it has no session: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let observer = cluster.observer().connect().await.unwrap();
    let workers = layout::workers(cluster.cluster_id.parse().unwrap());
    assert_eq!(
        observer.children(&workers).await.unwrap(),
        Vec::<String>::new(),
        "a worker registered"
    );
    observer.close().await;
}

#[tokio::test]
async fn a_tls_host_without_a_ca_is_refused_at_start() {
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cloudtask"))
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLOUDTASK_ZOOKEEPER", "tcp+tls://127.0.0.1:1/cloudtask")
        .env("CLOUDTASK_CLUSTER_TOKEN", "unused")
        .env("CLOUDTASK_API_URL", "http://127.0.0.1:1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the worker exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("zookeeper_tls_ca") && stderr.contains("tcp+tls://"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
