//! Firing end to end on real services (see `harness`).

use std::time::Duration;

use chrono::{DateTime, Timelike, Utc};
use cloudtask_worker::clock::ManualClock;
use serde_json::{Value, json};

use crate::harness::{Cluster, at, ledger, status, until_node};

#[tokio::test]
async fn a_task_firing_every_second_runs_once_per_second_with_its_logs() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({
            "name": "every-second",
            "schedule": "* * * * * *",
            "command": "echo \"out $CLOUDTASK_SCHEDULED_AT $CLOUDTASK_ATTEMPT\"; echo err >&2; echo done",
        }))
        .await;

    // Ten seconds of firing after the first run that started on time.
    let runs = cluster
        .runs_until(&task, "ten seconds of runs", |runs| {
            let first = runs.iter().find(|r| status(r) != "SKIPPED");
            first.is_some_and(|first| {
                let start = at(first, "scheduledAt");
                runs.iter()
                    .filter(|r| at(r, "scheduledAt") >= start + chrono::Duration::seconds(11))
                    .count()
                    > 0
            })
        })
        .await;
    drop(runs);
    let runs = cluster.pause_and_settle(&task, 1).await;

    let first = runs.iter().position(|r| status(r) != "SKIPPED").unwrap();
    // Fires before the worker took the new task over are accounted as misfires.
    for skipped in &runs[..first] {
        assert!(
            skipped["error"].as_str().unwrap().contains("misfire"),
            "{skipped}"
        );
    }
    let start = at(&runs[first], "scheduledAt");
    let window: Vec<&Value> = runs
        .iter()
        .filter(|r| {
            let t = at(r, "scheduledAt");
            t >= start && t < start + chrono::Duration::seconds(10)
        })
        .collect();
    assert!(
        (9..=11).contains(&window.len()),
        "{} runs in 10 s: {window:#?}",
        window.len()
    );
    let mut previous: Option<DateTime<Utc>> = None;
    for run in &window {
        let scheduled = at(run, "scheduledAt");
        assert_eq!(scheduled.nanosecond(), 0, "fires on the second: {run}");
        if let Some(previous) = previous {
            assert_eq!(
                scheduled - previous,
                chrono::Duration::seconds(1),
                "one run per second"
            );
        }
        previous = Some(scheduled);
        assert_eq!(status(run), "SUCCEEDED", "{run}");
        assert_eq!(run["exitCode"], 0);
        assert_eq!(run["trigger"], "SCHEDULE");
        assert_eq!(run["worker"], "w1");
        assert!(at(run, "startedAt") >= scheduled);
        let logs = run["logs"].as_array().unwrap();
        let offsets: Vec<u64> = logs.iter().map(|l| l["offset"].as_u64().unwrap()).collect();
        assert_eq!(
            offsets,
            (0..logs.len() as u64).collect::<Vec<_>>(),
            "offsets in order: {run}"
        );
        let stdout: Vec<&str> = logs
            .iter()
            .filter(|l| l["stream"] == "STDOUT")
            .map(|l| l["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            stdout,
            [format!("out {} 0", scheduled.to_rfc3339()).as_str(), "done"]
        );
        assert!(
            logs.iter()
                .any(|l| l["stream"] == "STDERR" && l["text"] == "err")
        );
    }
    ledger(&runs, chrono::Duration::seconds(1));
}

#[tokio::test]
async fn a_killed_worker_loses_its_run_and_a_survivor_fires_on_with_nothing_twice() {
    let mut cluster = Cluster::start().await;
    let mut index = std::collections::HashMap::new();
    index.insert("w1".to_owned(), cluster.spawn_worker_process("w1"));
    index.insert("w2".to_owned(), cluster.spawn_worker_process("w2"));
    let task = cluster
        .create_task(json!({
            "name": "frequent",
            "schedule": "* * * * * *",
            "maxRetries": 1,
            "command": "echo start; sleep 0.7; echo end",
        }))
        .await;
    cluster
        .runs_until(&task, "a first success", |runs| {
            runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    let owner = cluster.assigned_worker(&task).await.expect("an owner");
    let survivor = if owner == "w1" { "w2" } else { "w1" };

    // kill -9 in the middle of a run.
    let runs = cluster
        .runs_until(&task, "a run in flight on the owner", |runs| {
            runs.iter().any(|r| in_flight_on(r, &owner))
        })
        .await;
    let in_flight = runs.iter().find(|r| in_flight_on(r, &owner)).unwrap()["id"].clone();
    let process = &mut cluster.processes[index[&owner]];
    process.kill().unwrap();
    process.wait().unwrap();
    let killed_at = Utc::now();

    // The run in flight ends LOST (the scheduler hears of the session's end), and the
    // survivor takes the task over.
    cluster
        .runs_until(&task, "the run in flight to be LOST", |runs| {
            runs.iter()
                .any(|r| r["id"] == in_flight && status(r) == "LOST")
        })
        .await;
    cluster
        .runs_until(&task, "a run on the survivor", |runs| {
            runs.iter()
                .any(|r| r["worker"] == survivor && status(r) == "SUCCEEDED")
        })
        .await;

    // The killed worker comes back; the task keeps firing, once per second.
    cluster.spawn_worker_process(&owner);
    let back_at = Utc::now();
    cluster
        .runs_until(&task, "three more seconds of runs", |runs| {
            runs.iter()
                .any(|r| at(r, "scheduledAt") > back_at + chrono::Duration::seconds(3))
        })
        .await;
    let runs = cluster.pause_and_settle(&task, 1).await;

    ledger(&runs, chrono::Duration::seconds(1));
    for run in &runs {
        assert!(
            matches!(status(run), "SUCCEEDED" | "SKIPPED" | "LOST" | "STOPPED"),
            "unexpected outcome: {run}"
        );
    }
    // The run in flight is LOST; so is the next fire if the worker had claimed it ahead
    // of its time (fires are claimed 400 ms early) without reporting its start.
    let lost: Vec<&Value> = runs.iter().filter(|r| status(r) == "LOST").collect();
    assert!(
        lost.iter().any(|r| r["id"] == in_flight),
        "the run in flight is lost: {lost:#?}"
    );
    assert!(
        lost.iter()
            .all(|r| r["id"] == in_flight || r["startedAt"].is_null()),
        "only the run in flight (and a fire claimed, not started) is lost: {lost:#?}"
    );
    assert!(lost.len() <= 2, "{lost:#?}");
    // The retry policy decides what a lost fire becomes: its next attempt ran on the
    // survivor.
    for lost in &lost {
        let retry: Vec<&Value> = runs
            .iter()
            .filter(|r| r["scheduledAt"] == lost["scheduledAt"] && r["attempt"] == 1)
            .collect();
        assert_eq!(retry.len(), 1, "{runs:#?}");
        assert_eq!(retry[0]["trigger"], "RETRY");
        assert_eq!(status(retry[0]), "SUCCEEDED", "{}", retry[0]);
        assert_eq!(retry[0]["worker"], survivor);
    }
    // Fires while nobody owned the task are accounted as misfires (SKIP policy).
    let gap: Vec<&Value> = runs
        .iter()
        .filter(|r| at(r, "scheduledAt") > killed_at && status(r) == "SKIPPED")
        .collect();
    assert!(
        !gap.is_empty(),
        "the fires missed during failover are recorded"
    );
    // Each is a misfire, or an overlap skip while the lost fire's retry was running.
    assert!(
        gap.iter()
            .any(|r| r["error"].as_str().unwrap().contains("misfire")),
        "{gap:#?}"
    );
    assert!(
        gap.iter().all(|r| {
            let why = r["error"].as_str().unwrap();
            why.contains("misfire") || why.contains("overlap")
        }),
        "{gap:#?}"
    );
}

#[tokio::test]
async fn timeout_kills_the_whole_group_replace_stops_the_previous_run_skip_records_skips() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    // Ignores SIGTERM and leaves a grandchild: only SIGKILL to the group ends both.
    let timeout = cluster
        .create_task(json!({
            "name": "stubborn",
            "schedule": "*/3 * * * * *",
            "timeoutSeconds": 1,
            "command": "trap '' TERM; sleep 60 & echo $! > \"grandchild-$CLOUDTASK_RUN_ID\"; wait",
        }))
        .await;
    let replace = cluster
        .create_task(json!({
            "name": "replaced",
            "schedule": "*/2 * * * * *",
            "overlapPolicy": "REPLACE",
            "command": "echo started; sleep 30",
        }))
        .await;
    let skip = cluster
        .create_task(json!({
            "name": "skipping",
            "schedule": "* * * * * *",
            "overlapPolicy": "SKIP",
            "command": "sleep 2.5",
        }))
        .await;

    let timed_out = cluster
        .runs_until(&timeout, "a run to time out", |runs| {
            runs.iter().any(|r| status(r) == "TIMED_OUT")
        })
        .await;
    let run = timed_out.iter().find(|r| status(r) == "TIMED_OUT").unwrap();
    assert_eq!(run["error"], "timed out");
    let logs = run["logs"].as_array().unwrap();
    assert!(
        logs.iter()
            .any(|l| l["stream"] == "SYSTEM" && l["text"].as_str().unwrap().contains("timed out"))
    );
    let pid_file = cluster
        .packages_of(&cluster.cluster_id, "w1")
        .join("none")
        .join(format!("grandchild-{}", run["id"].as_str().unwrap()));
    let pid = std::fs::read_to_string(&pid_file).expect("the grandchild wrote its pid");
    let proc = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proc.exists()
        && !std::fs::read_to_string(proc.join("stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the grandchild {} survived the timeout",
            pid.trim()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let replaced = cluster
        .runs_until(&replace, "two replaced runs", |runs| {
            runs.iter().filter(|r| status(r) == "STOPPED").count() >= 2
        })
        .await;
    // A replaced run ended before its replacement started.
    let ordered: Vec<&Value> = replaced.iter().filter(|r| status(r) != "SKIPPED").collect();
    for pair in ordered.windows(2) {
        if status(pair[0]) == "STOPPED" && !pair[1]["startedAt"].is_null() {
            assert!(
                at(pair[0], "finishedAt") <= at(pair[1], "startedAt"),
                "overlapping runs: {pair:#?}"
            );
        }
    }

    cluster
        .runs_until(&skip, "overlap skips", |runs| {
            runs.iter().any(|r| {
                status(r) == "SKIPPED"
                    && r["error"].as_str().unwrap_or_default().contains("overlap")
            }) && runs.iter().any(|r| status(r) == "SUCCEEDED")
        })
        .await;
    for (task, period) in [(&timeout, 3), (&replace, 2), (&skip, 1)] {
        let runs = cluster.pause_and_settle(task, period).await;
        ledger(&runs, chrono::Duration::seconds(period));
    }
}

#[tokio::test]
async fn outcomes_and_logs_survive_ten_seconds_without_the_api() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let task = cluster
        .create_task(json!({
            "name": "chatty",
            "schedule": "*/2 * * * * *",
            "overlapPolicy": "ALLOW",
            "command": "for i in 1 2 3 4 5; do echo \"line $i\"; sleep 1; done",
        }))
        .await;
    cluster
        .runs_until(&task, "two runs in flight", |runs| {
            // Started: a fire is claimed (RUNNING, no start yet) ahead of its time.
            runs.iter()
                .filter(|r| status(r) == "RUNNING" && !r["startedAt"].is_null())
                .count()
                >= 2
        })
        .await;

    // The API is out of the worker's reach for ten seconds while those runs finish.
    cluster.api_proxy.cut();
    let cut_at = Utc::now();
    let spool = cluster.data.path().join("w1/spool/reports.jsonl");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut spooled = false;
    while tokio::time::Instant::now() < deadline {
        spooled |= spool.exists();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.api_proxy.restore();
    assert!(spooled, "undeliverable reports went to the spool");

    cluster
        .runs_until(&task, "the runs of the outage to end", |runs| {
            runs.iter()
                .filter(|r| at(r, "scheduledAt") < cut_at)
                .all(|r| status(r) != "RUNNING")
        })
        .await;
    let runs = cluster.pause_and_settle(&task, 2).await;
    let before_cut: Vec<&Value> = runs
        .iter()
        .filter(|r| at(r, "scheduledAt") < cut_at && status(r) != "SKIPPED")
        .collect();
    assert!(before_cut.len() >= 2, "{before_cut:#?}");
    for run in &before_cut {
        assert_eq!(status(run), "SUCCEEDED", "{run}");
        let texts: Vec<&str> = run["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            ["line 1", "line 2", "line 3", "line 4", "line 5"],
            "every line once, in order: {run}"
        );
    }
    // Fires during the outage could not be claimed: each is recorded (SKIPPED, once the
    // API is back), none twice.
    ledger(&runs, chrono::Duration::seconds(2));
    assert!(!spool.exists(), "the spool is emptied once delivered");
}

/// The scheduler writes a run-now command only after its task's spec and assignment, and
/// the worker takes commands in order with its assignments; the spec still comes on a
/// watch of its own. Played here by hand in ZooKeeper in orders the scheduler never
/// writes (no scheduler): the command before the spec, and before the assignment too.
/// The run waits for its task (a command ahead of the assignment, for the next
/// assignment change), then runs.
#[tokio::test]
async fn a_manual_run_handed_over_before_its_task_is_read_here_runs_once_it_is() {
    use cloudtask_coord::layout::{self, AssignmentNode, CommandNode, TaskNode};
    use cloudtask_coord::{Coordinator, NodeKind};
    use cloudtask_core::task::TaskState;

    let mut cluster = Cluster::start_with(crate::harness::Options {
        in_process_scheduler: false,
        ..Default::default()
    })
    .await;
    let id: cloudtask_core::ids::ClusterId = cluster.cluster_id.parse().unwrap();
    // This test plays the scheduler: the platform's identity, the cluster's workers
    // named in the ACLs of what it writes, the cluster's folders made before the worker
    // comes (a worker may not make them).
    let scheduler = cluster.observer();
    let rotated_at = cluster
        .api
        .catalogue
        .cluster_by_id(id)
        .await
        .unwrap()
        .unwrap()
        .token_rotated_at;
    scheduler.access().admit_cluster(id, rotated_at);
    let zk = scheduler.connect().await.unwrap();
    for dir in [
        layout::workers(id),
        layout::tasks(id),
        layout::worker_assignments(id, &"w1".parse().unwrap()),
        layout::commands(id, &"w1".parse().unwrap()),
    ] {
        zk.ensure_path(&dir).await.unwrap();
    }
    cluster.start_worker("w1");
    let bound = Duration::from_secs(20);
    until_node(
        zk.as_ref(),
        &layout::worker(id, &"w1".parse().unwrap()),
        true,
        bound,
    )
    .await;
    // The command after the assignment, then before it (the worker may then read the
    // task's spec as absent after the command came: the run waits on).
    for (name, command_first) in [("early", false), ("earlier", true)] {
        let task = cluster
            .create_task(json!({ "name": name, "schedule": "0 0 1 1 *", "command": "echo ran" }))
            .await;
        let run = cluster.run_now(&task).await;
        cluster
            .api
            .catalogue
            .hand_queued_run(run.parse().unwrap(), &"w1".parse().unwrap())
            .await
            .unwrap();
        let task_id = task.parse().unwrap();
        let assign = || async {
            zk.create(
                &layout::assignment(id, &"w1".parse().unwrap(), task_id),
                &layout::encode(&AssignmentNode { version: 1 }),
                NodeKind::Persistent,
            )
            .await
            .unwrap();
        };
        if !command_first {
            assign().await;
        }
        let command = CommandNode::RunNow {
            task: task_id,
            run: run.parse().unwrap(),
        };
        let sent = zk
            .create(
                &layout::command_prefix(id, &"w1".parse().unwrap()),
                &layout::encode(&command),
                NodeKind::PersistentSequential,
            )
            .await
            .unwrap();
        // Taken by the worker (it deletes what it has read).
        until_node(zk.as_ref(), &sent, false, bound).await;
        if command_first {
            assign().await;
        }
        assert_eq!(status(&cluster.runs(&task).await[0]), "QUEUED");

        // The spec arrives: the run that waited for it goes.
        let record = cluster
            .api
            .catalogue
            .tasks_of_cluster(id)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.id == task_id)
            .unwrap();
        let mut node = TaskNode::mirror(
            record.tenant_id,
            record.name.clone(),
            record.version,
            record.state == TaskState::Paused,
            &record.spec,
        );
        node.limits = record.spec.limits;
        zk.create(
            &layout::task(id, task_id),
            &layout::encode(&node),
            NodeKind::Persistent,
        )
        .await
        .unwrap();
        let runs = cluster
            .runs_until(&task, "the early manual run to succeed", |runs| {
                runs.iter().any(|r| status(r) == "SUCCEEDED")
            })
            .await;
        assert_eq!(runs.len(), 1, "{runs:#?}");
        assert_eq!(runs[0]["id"], run.as_str());
        assert_eq!(runs[0]["logs"][0]["text"], "ran");
    }
}

#[tokio::test]
async fn run_now_and_stop_reach_the_worker_within_a_second() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    // Fires once a year: every run here is a manual one.
    let task = cluster
        .create_task(json!({
            "name": "on-demand",
            "schedule": "0 0 1 1 *",
            "command": "echo \"manual $CLOUDTASK_ATTEMPT\"; sleep ${NAP:-0}",
            "env": [{ "name": "NAP", "value": "0" }],
        }))
        .await;
    cluster.wait_assigned(&task).await;

    let queued = cluster
        .owner
        .run(
            "mutation($id: ID!) { runTaskNow(id: $id) { id status trigger } }",
            json!({ "id": task }),
        )
        .await;
    assert_eq!(
        queued.data()["runTaskNow"]["status"],
        "QUEUED",
        "{}",
        queued.body
    );
    assert_eq!(queued.data()["runTaskNow"]["trigger"], "MANUAL");
    let run_id = queued.data()["runTaskNow"]["id"].clone();
    let runs = cluster
        .runs_until(&task, "the manual run to succeed", |runs| {
            runs.iter()
                .any(|r| r["id"] == run_id && status(r) == "SUCCEEDED")
        })
        .await;
    let run = runs.iter().find(|r| r["id"] == run_id).unwrap();
    let texts: Vec<&str> = run["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["manual 0"]);
    let waited = at(run, "startedAt") - at(run, "scheduledAt");
    assert!(
        waited < chrono::Duration::seconds(1),
        "queued to running took {waited}"
    );

    // A long manual run, stopped by the user.
    let updated = cluster
        .owner
        .run(
            "mutation($id: ID!) { updateTask(id: $id, input: { env: [{ name: \"NAP\", value: \"60\" }] }) { version } }",
            json!({ "id": task }),
        )
        .await;
    assert_eq!(
        updated.data()["updateTask"]["version"],
        2,
        "{}",
        updated.body
    );
    let long = cluster
        .owner
        .run(
            "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
            json!({ "id": task }),
        )
        .await;
    let long_id = long.data()["runTaskNow"]["id"].clone();
    cluster
        .runs_until(&task, "the long run to start", |runs| {
            runs.iter()
                .any(|r| r["id"] == long_id && status(r) == "RUNNING")
        })
        .await;
    let stop = cluster
        .owner
        .run(
            "mutation($id: ID!) { stopRun(id: $id) { id status } }",
            json!({ "id": long_id }),
        )
        .await;
    assert_eq!(stop.data()["stopRun"]["status"], "RUNNING", "{}", stop.body);
    let asked = Utc::now();
    let runs = cluster
        .runs_until(&task, "the long run to stop", |runs| {
            runs.iter()
                .any(|r| r["id"] == long_id && status(r) == "STOPPED")
        })
        .await;
    let stopped = runs.iter().find(|r| r["id"] == long_id).unwrap();
    assert_eq!(stopped["error"], "stopped");
    let took = at(stopped, "finishedAt") - asked;
    assert!(took < chrono::Duration::seconds(2), "stop took {took}");

    // A run that has ended cannot be stopped.
    let again = cluster
        .owner
        .run(
            "mutation($id: ID!) { stopRun(id: $id) { id } }",
            json!({ "id": long_id }),
        )
        .await;
    assert_eq!(again.code(), Some("CONFLICT"), "{}", again.body);
}

fn utc(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// Moves the worker's clock to one second past `fire` once the worker has armed it,
/// and waits for the fire's run to end.
async fn drive_to(cluster: &Cluster, clock: &ManualClock, task: &str, fire: &str) {
    let fire = utc(fire);
    tokio::time::timeout(Duration::from_secs(20), clock.wait_for_sleeper(fire))
        .await
        .unwrap_or_else(|_| panic!("the worker never armed {fire}"));
    clock.set(fire + chrono::Duration::seconds(1));
    cluster
        .runs_until(task, &format!("the run of {fire}"), |runs| {
            runs.iter()
                .any(|r| at(r, "scheduledAt") == fire && status(r) == "SUCCEEDED")
        })
        .await;
}

#[tokio::test]
async fn new_york_dst_gap_and_overlap_fire_as_documented() {
    let mut cluster = Cluster::start().await;
    // 01:59:50 EST on 2021-03-14; at 02:00 the clocks go to 03:00 EDT.
    let clock = std::sync::Arc::new(ManualClock::new(utc("2021-03-14T06:59:50Z")));
    cluster.start_worker_with_clock("w1", clock.clone());
    let gap = cluster
        .create_task(json!({
            "name": "in-the-gap",
            "schedule": "30 2 * * *",
            "timezone": "America/New_York",
            "command": "echo gap",
        }))
        .await;
    // 02:30 does not exist that day: it fires once, at the first instant after the gap.
    drive_to(&cluster, &clock, &gap, "2021-03-14T07:00:00Z").await;
    assert_eq!(
        cluster
            .runs(&gap)
            .await
            .iter()
            .map(|r| (at(r, "scheduledAt"), status(r).to_owned()))
            .collect::<Vec<_>>(),
        [(utc("2021-03-14T07:00:00Z"), "SUCCEEDED".to_owned())]
    );
    drop(cluster);

    // A cluster whose worker's clock reads 01:09:50 EDT on 2021-11-07; at 02:00 EDT the
    // clocks go back to 01:00 EST.
    let mut cluster = Cluster::start().await;
    let clock = std::sync::Arc::new(ManualClock::new(utc("2021-11-07T05:09:50Z")));
    cluster.start_worker_with_clock("w1", clock.clone());
    let fixed = cluster
        .create_task(json!({
            "name": "fixed-time",
            "schedule": "15 1 * * *",
            "timezone": "America/New_York",
            "command": "echo fixed",
        }))
        .await;
    tokio::time::timeout(
        Duration::from_secs(20),
        clock.wait_for_sleeper(utc("2021-11-07T05:15:00Z")),
    )
    .await
    .expect("the fixed-time task is armed");
    let interval = cluster
        .create_task(json!({
            "name": "interval",
            "schedule": "*/30 * * * *",
            "timezone": "America/New_York",
            "command": "echo interval",
        }))
        .await;
    // 01:15 EDT, 01:30 EDT, then the repeated hour: 01:00 EST and 01:30 EST. The
    // fixed-time job fires at the first 01:15 only; the interval job fires in both hours.
    drive_to(&cluster, &clock, &fixed, "2021-11-07T05:15:00Z").await;
    drive_to(&cluster, &clock, &interval, "2021-11-07T05:30:00Z").await;
    drive_to(&cluster, &clock, &interval, "2021-11-07T06:00:00Z").await;
    drive_to(&cluster, &clock, &interval, "2021-11-07T06:30:00Z").await;

    let fired = |runs: &[Value]| -> Vec<(DateTime<Utc>, String)> {
        runs.iter()
            .map(|r| (at(r, "scheduledAt"), status(r).to_owned()))
            .collect()
    };
    let ok = |t: &str| (utc(t), "SUCCEEDED".to_owned());
    // Nothing at 06:15Z (01:15 EST), not even a misfire record.
    assert_eq!(
        fired(&cluster.runs(&fixed).await),
        [ok("2021-11-07T05:15:00Z")]
    );
    assert_eq!(
        fired(&cluster.runs(&interval).await),
        [
            ok("2021-11-07T05:30:00Z"),
            ok("2021-11-07T06:00:00Z"),
            ok("2021-11-07T06:30:00Z"),
        ]
    );
}

#[tokio::test]
async fn retries_are_new_attempts_and_run_once_runs_the_latest_missed_fire() {
    let mut cluster = Cluster::start().await;
    // The worker's clock reads ten minutes and a few seconds after the tasks are created,
    // as for a worker that takes them over after they went unowned that long.
    let now = Utc::now();
    let start =
        DateTime::from_timestamp(now.timestamp() - now.timestamp() % 60 + 600 + 5, 0).unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(start));
    let run_once = cluster
        .create_task(json!({
            "name": "catch-up",
            "schedule": "* * * * *",
            "misfirePolicy": "RUN_ONCE",
            "misfireGraceSeconds": 120,
            "command": "echo caught up",
        }))
        .await;
    let failing = cluster
        .create_task(json!({
            "name": "flaky",
            "schedule": "30 * * * * *",
            "maxRetries": 2,
            "retryBackoffSeconds": 1,
            "command": "echo \"attempt $CLOUDTASK_ATTEMPT\"; exit 7",
        }))
        .await;
    cluster.start_worker_with_clock("w1", clock.clone());

    // Ten fires were missed: the latest (within the grace period) runs, the rest are
    // recorded as misfires.
    let latest = start - chrono::Duration::seconds(5);
    let runs = cluster
        .runs_until(&run_once, "the catch-up", |runs| {
            runs.iter()
                .any(|r| at(r, "scheduledAt") == latest && status(r) == "SUCCEEDED")
                && runs.iter().filter(|r| status(r) == "SKIPPED").count() >= 9
        })
        .await;
    for run in &runs {
        if at(run, "scheduledAt") != latest {
            assert_eq!(status(run), "SKIPPED", "{run}");
            assert!(run["error"].as_str().unwrap().contains("misfire"));
        }
    }
    ledger(&runs, chrono::Duration::seconds(60));

    // A failing fire is retried as attempts 1 and 2 of the same fire, then given up.
    let fire = start + chrono::Duration::seconds(25);
    drive_to_any(&clock, fire).await;
    let runs = cluster
        .runs_until(&failing, "three attempts", |runs| {
            runs.iter()
                .filter(|r| at(r, "scheduledAt") == fire && status(r) == "FAILED")
                .count()
                == 3
        })
        .await;
    let attempts: Vec<(u64, &str, i64)> = runs
        .iter()
        .filter(|r| at(r, "scheduledAt") == fire)
        .map(|r| {
            (
                r["attempt"].as_u64().unwrap(),
                r["trigger"].as_str().unwrap(),
                r["exitCode"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [(0, "SCHEDULE", 7), (1, "RETRY", 7), (2, "RETRY", 7)]
    );
    for run in runs.iter().filter(|r| at(r, "scheduledAt") == fire) {
        let text = run["logs"][0]["text"].as_str().unwrap();
        assert_eq!(text, format!("attempt {}", run["attempt"]));
    }
}

/// Moves the clock to one second past `fire` once some task has been armed for it.
async fn drive_to_any(clock: &ManualClock, fire: DateTime<Utc>) {
    tokio::time::timeout(Duration::from_secs(20), clock.wait_for_sleeper(fire))
        .await
        .unwrap_or_else(|_| panic!("the worker never armed {fire}"));
    clock.set(fire + chrono::Duration::seconds(1));
}

/// A run that has started and not ended on `worker` (a fire claimed ahead of its time is
/// RUNNING before it starts).
fn in_flight_on(run: &Value, worker: &str) -> bool {
    status(run) == "RUNNING" && run["worker"] == worker && !run["startedAt"].is_null()
}

/// Pids of held (staged) shells whose command mentions `marker`.
fn staged_shells(marker: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("read -r CLOUDTASK_GO") && cmdline.contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) until `check` holds of the staged shells of `marker`.
async fn until_staged(marker: &str, what: &str, check: impl Fn(&[u32]) -> bool) {
    let wait = async {
        while !check(&staged_shells(marker)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// Moves the worker's clock to 300 ms before `fire` once the worker is to claim it
/// (400 ms ahead), and waits until its shell is staged.
async fn stage_fire(clock: &ManualClock, fire: DateTime<Utc>, marker: &str) {
    let claim_at = fire - chrono::Duration::milliseconds(400);
    tokio::time::timeout(Duration::from_secs(20), clock.wait_for_sleeper(claim_at))
        .await
        .unwrap_or_else(|_| panic!("the fire of {fire} is never claimed ahead"));
    clock.set(fire - chrono::Duration::milliseconds(300));
    until_staged(marker, &format!("the shell of {fire}"), |pids| {
        pids.len() == 1
    })
    .await;
}

#[tokio::test]
async fn a_staged_fire_runs_at_its_time_and_a_pause_before_it_runs_nothing() {
    let mut cluster = Cluster::start().await;
    let out = crate::harness::shared_dir();
    let ran = out.path().join("ran");
    let marker = ran.to_str().unwrap().to_owned();
    // 23:59:55 on the worker's clock; fires every 10 s.
    let clock = std::sync::Arc::new(ManualClock::new(utc("2021-06-01T23:59:55Z")));
    cluster.start_worker_with_clock("w1", clock.clone());
    let task = cluster
        .create_task(json!({
            "name": "staged",
            "schedule": "*/10 * * * * *",
            "command": format!("echo \"$CLOUDTASK_SCHEDULED_AT\" >> {marker}"),
        }))
        .await;
    let lines = || std::fs::read_to_string(&ran).unwrap_or_default();

    // The first fire prepares the (empty) package folder; the second is staged: its shell
    // is up before its time, runs nothing until then, and runs once let go.
    drive_to(&cluster, &clock, &task, "2021-06-02T00:00:00Z").await;
    let second = utc("2021-06-02T00:00:10Z");
    stage_fire(&clock, second, &marker).await;
    assert_eq!(
        lines().lines().count(),
        1,
        "ran before its time: {}",
        lines()
    );
    clock.set(second + chrono::Duration::seconds(1));
    cluster
        .runs_until(&task, "the second fire's run", |runs| {
            runs.iter()
                .any(|r| at(r, "scheduledAt") == second && status(r) == "SUCCEEDED")
        })
        .await;
    assert!(lines().contains("2021-06-02T00:00:10"), "{}", lines());

    // The third is staged, then the task is paused: the shell goes, nothing runs.
    let third = utc("2021-06-02T00:00:20Z");
    stage_fire(&clock, third, &marker).await;
    cluster.pause(&task).await;
    until_staged(&marker, "the third fire's shell to be killed", |pids| {
        pids.is_empty()
    })
    .await;
    clock.set(third + chrono::Duration::seconds(1));
    // Its claim is given back: recorded SKIPPED, or dropped as not due; never started.
    let runs = cluster
        .runs_until(&task, "the third fire's claim to be given back", |runs| {
            !runs
                .iter()
                .any(|r| at(r, "scheduledAt") == third && status(r) != "SKIPPED")
        })
        .await;
    for run in runs.iter().filter(|r| at(r, "scheduledAt") == third) {
        assert!(run["startedAt"].is_null(), "{run:#?}");
    }
    assert!(!lines().contains("2021-06-02T00:00:20"), "{}", lines());
    assert_eq!(lines().lines().count(), 2, "{}", lines());
}
