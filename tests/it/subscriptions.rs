//! Subscriptions across API replicas: a run's logs ingested through one replica reach a
//! subscriber of another live (Postgres LISTEN/NOTIFY), in order, each once; a
//! subscriber reconnecting from an offset gets no gap and no duplicate; run events and
//! worker events arrive as they happen; another tenant's run is NOT_FOUND.

use std::time::Duration;

use cloudtask_testkit::{GqlSocket, Reply, TestApi};
use serde_json::{Value, json};

use crate::harness::Cluster;

const LOGS: &str = "subscription($run: ID!, $from: Int) {
    runLogs(runId: $run, fromOffset: $from) { offset stream text }
}";

fn token(cluster: &Cluster) -> String {
    cluster.owner.token.clone().expect("the owner is logged in")
}

async fn run_status(cluster: &Cluster, run: &str) -> String {
    let response = cluster
        .owner
        .run(
            "query($id: ID!) { run(id: $id) { status } }",
            json!({ "id": run }),
        )
        .await;
    response.data()["run"]["status"]
        .as_str()
        .expect("a status")
        .to_owned()
}

fn offsets_and_texts(payloads: &[Value]) -> Vec<(u64, String)> {
    payloads
        .iter()
        .map(|p| {
            let line = &p["data"]["runLogs"];
            (
                line["offset"].as_u64().expect("an offset"),
                line["text"].as_str().expect("a text").to_owned(),
            )
        })
        .collect()
}

/// A manual task running `command`, its worker reporting to the cluster's first API
/// replica, started now; a subscriber of its logs from offset 0 on a second replica.
async fn follow_a_run(name: &str, command: &str) -> (Cluster, TestApi, GqlSocket, String) {
    let mut cluster = Cluster::start().await;
    let replica = cluster.api.replica().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({ "name": name, "schedule": "0 0 1 1 *", "command": command }))
        .await;
    cluster.wait_assigned(&task).await;
    let mut socket = GqlSocket::connect(&replica.url, &token(&cluster)).await;
    let run = cluster.run_now(&task).await;
    socket
        .subscribe("logs", LOGS, json!({ "run": run, "from": 0 }))
        .await;
    (cluster, replica, socket, run)
}

#[tokio::test]
async fn live_logs_reach_a_subscriber_of_another_replica_without_gap_or_duplicate() {
    let (cluster, replica, mut socket, run) = follow_a_run(
        "talker",
        "for i in $(seq 1 20); do echo line-$i; sleep 0.1; done",
    )
    .await;

    // The first line comes while the run is still going (it takes two seconds).
    let first = match socket.reply("logs", Duration::from_secs(20)).await {
        Reply::Next(payload) => payload,
        other => panic!("expected a line, got {other:?}"),
    };
    assert_eq!(first["data"]["runLogs"]["offset"], 0, "{first}");
    assert_eq!(first["data"]["runLogs"]["text"], "line-1");
    assert_eq!(first["data"]["runLogs"]["stream"], "STDOUT");
    assert_eq!(
        run_status(&cluster, &run).await,
        "RUNNING",
        "the first line should arrive while the run goes on"
    );

    let rest = socket.until_complete("logs", Duration::from_secs(30)).await;
    let mut lines = vec![(0, "line-1".to_owned())];
    lines.extend(offsets_and_texts(&rest));
    let expected: Vec<(u64, String)> = (0..20).map(|i| (i, format!("line-{}", i + 1))).collect();
    assert_eq!(lines, expected, "order and offsets exact, each line once");
    assert_eq!(run_status(&cluster, &run).await, "SUCCEEDED");

    // Reconnecting from an offset: what follows it, nothing before, then complete.
    let mut again = GqlSocket::connect(&replica.url, &token(&cluster)).await;
    again
        .subscribe("logs", LOGS, json!({ "run": run, "from": 7 }))
        .await;
    let resumed = again.until_complete("logs", Duration::from_secs(10)).await;
    assert_eq!(offsets_and_texts(&resumed), expected[7..].to_vec());
}

#[tokio::test]
async fn a_tail_longer_than_a_page_arriving_as_the_run_ends_is_delivered_whole() {
    // One line, a pause (the subscriber is caught up and waits), then 2,500 lines at once
    // and the end: more than a page (1,000) is stored after the follower's last read.
    let (cluster, replica, mut socket, run) =
        follow_a_run("tail", "echo start; sleep 1; seq 1 2500").await;
    let lines = offsets_and_texts(&socket.until_complete("logs", Duration::from_secs(60)).await);
    let mut expected = vec![(0, "start".to_owned())];
    expected.extend((1..=2500).map(|i| (i, i.to_string())));
    assert_eq!(lines.len(), expected.len());
    assert_eq!(lines, expected, "order and offsets exact, each line once");

    // Subscribed after the end, from the middle of a page: the rest, then complete.
    let mut again = GqlSocket::connect(&replica.url, &token(&cluster)).await;
    again
        .subscribe("logs", LOGS, json!({ "run": run, "from": 1200 }))
        .await;
    let rest = offsets_and_texts(&again.until_complete("logs", Duration::from_secs(30)).await);
    assert_eq!(rest, expected[1200..].to_vec());
}

#[tokio::test]
async fn run_and_worker_events_arrive_on_another_replica() {
    let mut cluster = Cluster::start().await;
    let replica = cluster.api.replica().await;
    let mut socket = GqlSocket::connect(&replica.url, &token(&cluster)).await;
    socket
        .subscribe(
            "workers",
            "subscription($c: ID) { workerEvents(clusterId: $c) { clusterId worker kind at } }",
            json!({ "c": cluster.cluster_id }),
        )
        .await;
    // Subscriptions start asynchronously: give the server a request to answer first, so
    // the subscription is in place before the worker joins.
    socket
        .subscribe("ping", "query { me { email } }", json!({}))
        .await;
    assert!(matches!(
        socket.reply("ping", Duration::from_secs(10)).await,
        Reply::Next(_)
    ));
    // The join must come after the leader has read the cluster's workers.
    cluster.wait_cluster_mirrored().await;
    let worker = cluster.start_worker("w1");
    let joined = match socket.reply("workers", Duration::from_secs(20)).await {
        Reply::Next(payload) => payload["data"]["workerEvents"].clone(),
        other => panic!("expected a worker event, got {other:?}"),
    };
    assert_eq!(joined["kind"], "JOINED", "{joined}");
    assert_eq!(joined["worker"], "w1");
    assert_eq!(joined["clusterId"], cluster.cluster_id.as_str());

    let task = cluster
        .create_task(json!({
            "name": "quick",
            "schedule": "0 0 1 1 *",
            "command": "echo hi; exit 3",
        }))
        .await;
    cluster.wait_assigned(&task).await;
    socket
        .subscribe(
            "runs",
            "subscription($t: ID) { runEvents(taskId: $t) { id status exitCode } }",
            json!({ "t": task }),
        )
        .await;
    socket
        .subscribe("ping2", "query { me { email } }", json!({}))
        .await;
    assert!(matches!(
        socket.reply("ping2", Duration::from_secs(10)).await,
        Reply::Next(_)
    ));
    let run = cluster.run_now(&task).await;
    let mut statuses = Vec::new();
    while statuses.last().map(String::as_str) != Some("FAILED") {
        match socket.reply("runs", Duration::from_secs(20)).await {
            Reply::Next(payload) => {
                let event = &payload["data"]["runEvents"];
                assert_eq!(event["id"], run.as_str(), "{event}");
                statuses.push(event["status"].as_str().unwrap().to_owned());
                if event["status"] == "FAILED" {
                    assert_eq!(event["exitCode"], 3);
                }
            }
            other => panic!("expected a run event, got {other:?}"),
        }
    }
    // An event says that the run changed, and the run is read then: a QUEUED event read
    // once the worker has started the run reads RUNNING. What is heard never goes back.
    let rank = |s: &str| ["QUEUED", "RUNNING", "FAILED"].iter().position(|k| *k == s);
    let ranks: Vec<_> = statuses.iter().map(|s| rank(s)).collect();
    assert!(
        ranks.iter().all(Option::is_some) && ranks.windows(2).all(|w| w[0] <= w[1]),
        "statuses in the run's order: {statuses:?}"
    );
    assert!(
        statuses.len() >= 2,
        "the queueing and the end: {statuses:?}"
    );

    worker.cancel();
    let left = match socket.reply("workers", Duration::from_secs(20)).await {
        Reply::Next(payload) => payload["data"]["workerEvents"].clone(),
        other => panic!("expected a worker event, got {other:?}"),
    };
    assert_eq!(left["kind"], "LEFT", "{left}");
}

#[tokio::test]
async fn another_tenants_run_is_not_found_and_bad_offsets_are_refused() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({ "name": "mine", "schedule": "0 0 1 1 *", "command": "echo x" }))
        .await;
    cluster.wait_assigned(&task).await;
    let run = cluster.run_now(&task).await;
    let other = cluster
        .api
        .tenant_with_cluster("other", crate::support::PASSWORD)
        .await;
    let mut socket =
        GqlSocket::connect(&cluster.api.url, other.owner.token.as_ref().unwrap()).await;
    socket
        .subscribe("logs", LOGS, json!({ "run": run, "from": 0 }))
        .await;
    match socket.reply("logs", Duration::from_secs(10)).await {
        Reply::Error(errors) => {
            assert_eq!(errors[0]["extensions"]["code"], "NOT_FOUND", "{errors}")
        }
        Reply::Next(payload) => assert_eq!(
            payload["errors"][0]["extensions"]["code"], "NOT_FOUND",
            "{payload}"
        ),
        Reply::Complete => panic!("completed without an error"),
    }
    let mut own = GqlSocket::connect(&cluster.api.url, &token(&cluster)).await;
    own.subscribe("bad", LOGS, json!({ "run": run, "from": -1 }))
        .await;
    match own.reply("bad", Duration::from_secs(10)).await {
        Reply::Next(payload) => {
            assert_eq!(
                payload["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
                "{payload}"
            );
            assert_eq!(payload["errors"][0]["extensions"]["field"], "fromOffset");
        }
        Reply::Error(errors) => {
            assert_eq!(
                errors[0]["extensions"]["code"], "BAD_USER_INPUT",
                "{errors}"
            )
        }
        Reply::Complete => panic!("completed without an error"),
    }
}
