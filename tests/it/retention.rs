//! Retention through the API and the scheduler: a tenant's own horizons are set within the
//! platform's (a longer one is refused and changes nothing), audited, and enforced by the
//! scheduler leader, whose last pass the tenant reads back. (Which roles may set them is
//! in the role matrix, `roles.rs`; what a pass prunes, row by row, in the catalogue's own
//! tests.)

use std::time::Duration;

use cloudtask_scheduler::retention::Pruning;
use serde_json::{Value, json};

use crate::harness::{Cluster, Options, status};

const SETTINGS: &str = "{ retention {
    held { runDays runsPerTask logDays auditDays }
    own { runDays runsPerTask logDays auditDays }
    platform { runDays runsPerTask logDays auditDays }
    lastPrune { at runs logLines auditEntries packages }
} }";

async fn settings(cluster: &Cluster) -> Value {
    cluster.owner.run(SETTINGS, json!({})).await.data()["retention"].clone()
}

#[tokio::test]
async fn a_tenants_horizons_are_kept_within_the_platforms_and_the_leader_prunes_to_them() {
    let platform = cloudtask_testkit::test_config(String::new()).retention();
    let mut cluster = Cluster::start_with(Options {
        pruning: Some(Pruning {
            platform,
            every: Duration::from_millis(300),
            batch: 2,
        }),
        ..Options::default()
    })
    .await;
    cluster.start_worker("w1");
    let defaults = json!({
        "runDays": platform.run_days,
        "runsPerTask": platform.runs_per_task,
        "logDays": platform.log_days,
        "auditDays": platform.audit_days,
    });
    let none = json!({ "runDays": null, "runsPerTask": null, "logDays": null, "auditDays": null });
    let before = settings(&cluster).await;
    assert_eq!(before["platform"], defaults);
    assert_eq!(before["held"], defaults);
    assert_eq!(before["own"], none);

    // Longer than the platform keeps: refused, nothing changed.
    let longer = cluster
        .owner
        .run(
            "mutation($input: RetentionInput!) { setRetention(input: $input) { own { runDays } } }",
            json!({ "input": { "runDays": platform.run_days.unwrap() + 1 } }),
        )
        .await;
    assert_eq!(longer.code(), Some("BAD_USER_INPUT"), "{}", longer.body);
    assert!(
        longer.body.to_string().contains("runDays"),
        "{}",
        longer.body
    );
    assert_eq!(settings(&cluster).await["own"], none);
    for (input, field) in [
        (json!({ "auditDays": -1 }), "auditDays"),
        (json!({ "logDays": 0 }), "logDays"),
    ] {
        let refused = cluster
            .owner
            .run(
                "mutation($input: RetentionInput!) { setRetention(input: $input) { own { runDays } } }",
                json!({ "input": input }),
            )
            .await;
        assert_eq!(refused.code(), Some("BAD_USER_INPUT"), "{}", refused.body);
        assert!(refused.body.to_string().contains(field), "{}", refused.body);
    }
    assert_eq!(settings(&cluster).await["own"], none);

    let set = cluster
        .owner
        .run(
            "mutation($input: RetentionInput!) { setRetention(input: $input) { held { runDays runsPerTask logDays } } }",
            json!({ "input": { "runDays": 7, "runsPerTask": 2 } }),
        )
        .await;
    assert_eq!(
        set.data()["setRetention"]["held"],
        json!({ "runDays": 7, "runsPerTask": 2, "logDays": platform.log_days }),
        "{}",
        set.body
    );
    let audit = cluster
        .owner
        .run(
            "{ auditLog(first: 20) { edges { node { operation objectType } } } }",
            json!({}),
        )
        .await;
    assert!(
        audit.body.to_string().contains("\"setRetention\""),
        "not audited: {}",
        audit.body
    );

    // Three runs of a task: the leader's next passes leave its newest two.
    let task = cluster
        .create_task(json!({ "name": "kept", "schedule": "0 0 1 1 *", "command": "echo hi" }))
        .await;
    cluster.wait_assigned(&task).await;
    for n in 1..=3 {
        let run = cluster.run_now(&task).await;
        cluster
            .runs_until(&task, "the run to succeed", |runs| {
                runs.iter()
                    .any(|r| r["id"] == run && status(r) == "SUCCEEDED")
            })
            .await;
        if n < 3 {
            continue;
        }
        let runs = cluster
            .runs_until(&task, "the leader to prune the oldest run", |runs| {
                runs.len() == 2
            })
            .await;
        assert!(runs.iter().any(|r| r["id"] == run), "the newest run stays");
    }
    // Read back: the pass that deleted it (passes that delete nothing leave it be).
    let last = settings(&cluster).await["lastPrune"].clone();
    assert_eq!(last["runs"], 1, "{last}");
    assert!(last["logLines"].as_u64().unwrap() >= 1, "{last}");
    assert!(!last["at"].is_null(), "{last}");
}
