//! Every run tells the truth (issue 22): a manual run of a paused task runs at once, a
//! queued run nobody can take says so and ends after `queue_expiry_secs`, and a run the
//! platform ended (a worker fenced off from ZooKeeper) is LOST with its cause and retried
//! elsewhere per the task's policy. (That every ended run carries a reason is asserted by
//! `Cluster::runs`, in every test that reads runs through it.)

use std::time::Duration;

use chrono::{Timelike, Utc};
use serde_json::{Value, json};

use crate::harness::{Cluster, Options, at, status};

async fn run_of(cluster: &Cluster, id: &str) -> Value {
    let answer = cluster
        .owner
        .run(
            "query($id: ID!) { run(id: $id) {
                id status reason reasonMessage error worker startedAt finishedAt attempt
            } }",
            json!({ "id": id }),
        )
        .await;
    answer.data()["run"].clone()
}

/// Polls the run (bounded) until `done` holds.
async fn run_until(
    cluster: &Cluster,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let run = run_of(cluster, id).await;
        if done(&run) {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {run:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn run_now_on_a_paused_task_runs_at_once_and_the_schedule_stays_paused() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({ "name": "tick", "schedule": "* * * * * *", "command": "echo tick" }))
        .await;
    cluster.wait_assigned(&task).await;
    cluster
        .runs_until(&task, "a first scheduled success", |runs| {
            runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    let before = cluster.pause_and_settle(&task, 1).await;
    let paused_at = Utc::now();

    let asked = Utc::now();
    let run = cluster.run_now(&task).await;
    let ran = run_until(&cluster, &run, "the manual run to end", |r| {
        r["finishedAt"].is_string()
    })
    .await;
    assert_eq!(ran["status"], "SUCCEEDED", "{ran:#}");
    assert_eq!(ran["reason"], "EXIT", "{ran:#}");
    let waited = at(&ran, "startedAt") - asked;
    assert!(
        waited < chrono::Duration::seconds(10),
        "the run waited {waited} to start"
    );
    eprintln!(
        "run now on a paused task: started {} ms after the ask",
        waited.num_milliseconds()
    );

    // The schedule stayed paused: no fire after the pause, two seconds on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = cluster.runs(&task).await;
    let fired: Vec<&Value> = runs
        .iter()
        .filter(|r| r["trigger"] == "SCHEDULE" && at(r, "scheduledAt") > paused_at)
        .collect();
    assert!(fired.is_empty(), "fires of a paused task: {fired:#?}");
    assert_eq!(runs.len(), before.len() + 1, "{runs:#?}");
    let state = cluster
        .owner
        .run(
            "query($id: ID!) { task(id: $id) { state } }",
            json!({ "id": task }),
        )
        .await;
    assert_eq!(state.data()["task"]["state"], "PAUSED");
}

#[tokio::test]
async fn a_queued_run_nobody_can_take_says_so_then_expires_and_is_mailed() {
    let expiry = 3;
    let cluster = Cluster::start_with(Options {
        queue_expiry_secs: Some(expiry),
        ..Options::default()
    })
    .await;
    cluster.wait_cluster_mirrored().await;
    let task = cluster
        .create_task(json!({
            "name": "orphan",
            "schedule": "0 0 1 1 *",
            "command": "echo never",
            "notifyEmails": ["ops@acme.example"],
        }))
        .await;
    let asked = Utc::now();
    let run = cluster.run_now(&task).await;
    let waiting = run_until(
        &cluster,
        &run,
        "the run to say it waits for a worker",
        |r| r["reason"] == "WAITING_FOR_WORKER",
    )
    .await;
    assert_eq!(waiting["status"], "QUEUED", "{waiting:#}");
    assert!(
        waiting["reasonMessage"]
            .as_str()
            .unwrap()
            .contains("worker")
    );

    let ended = run_until(&cluster, &run, "the queued run to expire", |r| {
        r["finishedAt"].is_string()
    })
    .await;
    assert_eq!(
        (ended["status"].as_str(), ended["reason"].as_str()),
        (Some("FAILED"), Some("QUEUE_EXPIRED")),
        "{ended:#}"
    );
    let after = at(&ended, "finishedAt") - asked;
    assert!(
        after >= chrono::Duration::seconds(expiry as i64)
            && after < chrono::Duration::seconds(expiry as i64 + 10),
        "expired after {after}"
    );
    eprintln!(
        "queued run expired after {} ms (expiry {expiry} s)",
        after.num_milliseconds()
    );

    // Mailed like a failure: the outbox holds it, with the reason.
    let tenant = crate::notifications::tenant_id(&cluster).await;
    let notes = cluster
        .api
        .catalogue
        .notifications_of(tenant)
        .await
        .unwrap();
    let failure = notes
        .iter()
        .find(|(n, _)| n.payload["run"] == run.as_str())
        .unwrap_or_else(|| panic!("no notification of the expired run: {notes:#?}"));
    assert_eq!(failure.0.payload["status"], "FAILED");
    assert_eq!(failure.0.payload["reason"], "QUEUE_EXPIRED");
}

#[tokio::test]
async fn a_fenced_workers_run_is_lost_with_its_cause_and_retried_elsewhere() {
    let session_timeout = Duration::from_secs(6);
    let mut cluster = Cluster::start_with(Options {
        session_timeout,
        ..Options::default()
    })
    .await;
    let (server, chroot) = cluster
        .zookeeper
        .split_at(cluster.zookeeper.find('/').expect("a chroot"));
    let proxy = cloudtask_testkit::Proxy::start(server).await;
    let via = format!("{}{chroot}", proxy.addr);
    cluster.spawn_worker_process_via("w1", &via);
    // One fire, a few seconds from now (daily); its first attempt runs long, a retry
    // ends at once.
    let fire = Utc::now() + chrono::Duration::seconds(4);
    let task = cluster
        .create_task(json!({
            "name": "fenced",
            "schedule": format!("{} {} {} * * *", fire.second(), fire.minute(), fire.hour()),
            "command": "if [ \"$CLOUDTASK_ATTEMPT\" = 0 ]; then exec sleep 600; fi; echo retried",
            "maxRetries": 1,
            "retryBackoffSeconds": 1,
        }))
        .await;
    cluster.wait_assigned(&task).await;
    let runs = cluster
        .runs_until(&task, "the fire to start on w1", |runs| {
            runs.iter()
                .any(|r| status(r) == "RUNNING" && r["startedAt"].is_string())
        })
        .await;
    let first = runs.iter().find(|r| status(r) == "RUNNING").unwrap();
    assert_eq!(first["worker"], "w1", "{first:#}");
    let first_id = first["id"].as_str().unwrap().to_owned();

    // w1 loses ZooKeeper (the API it still reaches); w2 is there to take over.
    proxy.cut();
    cluster.start_worker("w2");
    let runs = cluster
        .runs_until(&task, "the fire's retry to succeed on w2", |runs| {
            runs.iter()
                .any(|r| r["attempt"] == 1 && status(r) == "SUCCEEDED" && r["worker"] == "w2")
        })
        .await;
    let lost = runs.iter().find(|r| r["id"] == first_id.as_str()).unwrap();
    assert_eq!(
        (lost["status"].as_str(), lost["reason"].as_str()),
        (Some("LOST"), Some("FENCED")),
        "{runs:#?}"
    );
    let retry = runs.iter().find(|r| r["attempt"] == 1).unwrap();
    assert_eq!(retry["trigger"], "RETRY");
    assert_eq!(retry["scheduledAt"], lost["scheduledAt"], "the same fire");
    assert_eq!(
        runs.iter()
            .filter(|r| r["scheduledAt"] == lost["scheduledAt"])
            .count(),
        2,
        "one retry, as maxRetries allows: {runs:#?}"
    );
    proxy.restore();
}

#[tokio::test]
async fn a_slow_api_never_turns_into_overlap_skips_and_every_report_arrives() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({
            "name": "quick",
            "schedule": "* * * * * *",
            "overlapPolicy": "SKIP",
            "command": "echo quick",
        }))
        .await;
    cluster
        .runs_until(&task, "a few successes", |runs| {
            runs.iter().filter(|r| status(r) == "SUCCEEDED").count() >= 3
        })
        .await;
    // The worker cannot reach the API for three seconds: claims, starts, outcomes and
    // lines wait (claims are retried for five seconds), then all go through at once.
    cluster.api_proxy.cut();
    let cut_at = Utc::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.api_proxy.restore();
    let back_at = Utc::now();
    cluster
        .runs_until(&task, "successes after the outage", |runs| {
            runs.iter()
                .filter(|r| status(r) == "SUCCEEDED" && at(r, "scheduledAt") > back_at)
                .count()
                >= 3
        })
        .await;
    let runs = cluster.pause_and_settle(&task, 1).await;
    crate::harness::ledger(&runs, chrono::Duration::seconds(1));
    let overlaps: Vec<&Value> = runs
        .iter()
        .filter(|r| r["reason"] == "OVERLAP_SKIP")
        .collect();
    assert!(overlaps.is_empty(), "skipped for overlap: {overlaps:#?}");
    let mut ran_in_outage = 0;
    for run in runs.iter().filter(|r| status(r) != "SKIPPED") {
        assert_eq!(status(run), "SUCCEEDED", "{run:#}");
        let texts: Vec<&str> = run["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["quick"], "every report arrived: {run:#}");
        let fire = at(run, "scheduledAt");
        if fire > cut_at && fire < back_at {
            ran_in_outage += 1;
        }
    }
    let skipped = runs.iter().filter(|r| status(r) == "SKIPPED").count();
    eprintln!(
        "slow API: {} runs, {ran_in_outage} fired during the 3 s outage and ran late, {skipped} \
         skipped (misfire), none for overlap",
        runs.len()
    );
}

/// A fire claimed ahead of its time is not listed (nor announced) until its process has
/// started; an outcome without a reason (a worker of an earlier version) gets one.
#[tokio::test]
async fn a_claimed_fire_is_listed_from_its_start_and_an_old_workers_outcome_gets_a_reason() {
    use cloudtask_core::protocol::{Claim, Report};
    use cloudtask_core::run::{Outcome, RunStatus, RunTrigger};
    let cluster = Cluster::start().await;
    let task = cluster
        .create_task(json!({ "name": "ahead", "schedule": "0 0 1 1 *", "command": "true" }))
        .await;
    let handle = cluster
        .api
        .catalogue
        .cluster(cluster.cluster_id.parse().unwrap());
    let claimed = handle
        .claim_run(&Claim {
            task_id: task.parse().unwrap(),
            scheduled_at: Utc::now() + chrono::Duration::milliseconds(400),
            attempt: 0,
            task_version: 1,
            worker: "w1".parse().unwrap(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Running,
            reason: None,
        })
        .await
        .unwrap();
    let id = claimed.id.to_string();
    assert!(
        cluster.runs(&task).await.is_empty(),
        "a claimed fire is not listed"
    );
    let running = cluster
        .owner
        .run(
            "{ runs(first: 10, filter: { status: RUNNING }) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        running.data()["runs"]["edges"],
        json!([]),
        "{}",
        running.body
    );

    handle
        .ingest_reports(&[Report::Started {
            run: claimed.id,
            at: Utc::now(),
        }])
        .await
        .unwrap();
    let runs = cluster.runs(&task).await;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(
        (runs[0]["id"].as_str(), status(&runs[0])),
        (Some(id.as_str()), "RUNNING")
    );
    assert!(runs[0]["startedAt"].is_string());

    handle
        .ingest_reports(&[Report::Finish {
            run: claimed.id,
            outcome: Outcome {
                status: RunStatus::Failed,
                exit_code: Some(3),
                signal: None,
                error: Some("exit code 3".into()),
                finished_at: Utc::now(),
                reason: None,
            },
        }])
        .await
        .unwrap();
    let ended = run_of(&cluster, &id).await;
    assert_eq!(
        (ended["status"].as_str(), ended["reason"].as_str()),
        (Some("FAILED"), Some("EXIT")),
        "{ended:#}"
    );
    assert!(
        ended["reasonMessage"]
            .as_str()
            .unwrap()
            .contains("exit code 3"),
        "{ended:#}"
    );
}
