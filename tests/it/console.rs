//! The web console in headless Chromium (`web/tests/console.test.mjs`, on Playwright),
//! against the real API with a worker: it signs in, runs a task and follows its output
//! live, stops a run, renews a refused access token, creates a task with a package and
//! runs it, sees a worker join, and signs out. What its clicks did is checked here, in the
//! catalogue, and the console's files are served with their types and policy.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{Cluster, status};
use crate::support::PASSWORD;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/web/tests/console.test.mjs");
const PLAYWRIGHT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/web/node_modules/playwright-core"
);

#[tokio::test(flavor = "multi_thread")]
async fn the_console_is_served_with_its_types_and_a_strict_policy() {
    let api = cloudtask_testkit::TestApi::start().await;
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let response = http.get(format!("{}{path}", api.url)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(
            header("content-security-policy").contains("default-src 'self'"),
            "{path}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_runs_a_task_follows_its_output_live_and_stops_a_run() {
    assert!(
        std::path::Path::new(PLAYWRIGHT).exists(),
        "playwright-core is not installed in web/: run the test command (scripts/test.sh), \
         which runs `npm ci` there"
    );
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let gate = crate::harness::shared_dir();
    let go = gate.path().join("go");
    let demo = cluster
        .create_task(json!({
            "name": "console-demo",
            "description": "<b>not bold</b>",
            "schedule": "0 0 1 1 *",
            // Prints a line, then waits for this test to let it go on.
            "command": "echo first; while [ ! -e \"$GO\" ]; do sleep 0.05; done; echo second >&2; exit 3",
            "env": [{ "name": "GO", "value": go.to_str().unwrap() }],
        }))
        .await;
    let sleeper = cluster
        .create_task(
            json!({ "name": "console-sleeper", "schedule": "0 0 1 1 *", "command": "sleep 60" }),
        )
        .await;
    cluster.wait_assigned(&demo).await;
    cluster.wait_assigned(&sleeper).await;

    let package = gate.path().join("hello.tar.gz");
    std::fs::write(
        &package,
        cloudtask_core::archive::samples::tar_gz_of(&[(
            "hello.sh",
            b"#!/bin/sh\necho \"hello from the package\"\n",
            0o755,
        )]),
    )
    .unwrap();

    let mut browser = tokio::process::Command::new("node")
        .arg(SCRIPT)
        .env("CONSOLE_URL", format!("{}/", cluster.api.url))
        .env("CONSOLE_EMAIL", "owner@acme.example")
        .env("CONSOLE_PASSWORD", PASSWORD)
        .env("CONSOLE_PACKAGE", &package)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the console test (Node.js is needed)");
    let mut stdout = BufReader::new(browser.stdout.take().unwrap()).lines();
    // Read alongside: a full stderr pipe would stall the script.
    let mut stderr = browser.stderr.take().unwrap();
    let errors = tokio::spawn(async move {
        let mut errors = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut errors).await;
        errors
    });
    let said = tokio::time::timeout(Duration::from_secs(120), async {
        let mut said = Vec::new();
        while let Some(line) = stdout.next_line().await.unwrap() {
            match line.as_str() {
                "waiting-for-go" => std::fs::write(&go, b"").unwrap(),
                "waiting-for-w2" => {
                    cluster.start_worker("w2");
                }
                _ => {}
            }
            said.push(line);
        }
        said
    })
    .await
    .expect("the console test did not end within 2 minutes");
    let status_code = browser.wait().await.unwrap();
    let errors = errors.await.unwrap();
    assert!(
        status_code.success() && said.last().map(String::as_str) == Some("ok"),
        "the console test failed ({status_code}): {said:?}\n{errors}"
    );

    // What the clicks did, as the catalogue has it.
    let runs = cluster.runs(&demo).await;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let run = &runs[0];
    assert_eq!(
        (
            status(run),
            run["trigger"].as_str(),
            run["exitCode"].as_i64()
        ),
        ("FAILED", Some("MANUAL"), Some(3))
    );
    let lines: Vec<(&str, &str)> = run["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["stream"] != "SYSTEM")
        .map(|l| (l["stream"].as_str().unwrap(), l["text"].as_str().unwrap()))
        .collect();
    assert_eq!(lines, [("STDOUT", "first"), ("STDERR", "second")]);
    let stopped = cluster.runs(&sleeper).await;
    assert_eq!(stopped.len(), 1, "{stopped:#?}");
    assert_eq!(
        (status(&stopped[0]), stopped[0]["trigger"].as_str()),
        ("STOPPED", Some("MANUAL"))
    );
    // The form's task, once (the refused attempt made nothing), with its package.
    let made = cluster
        .owner
        .run(
            "{ tasks(first: 10) { nodes { id name timezone packageSha256 } } }",
            json!({}),
        )
        .await;
    let made: Vec<&serde_json::Value> = made.data()["tasks"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "console-made")
        .collect();
    assert_eq!(made.len(), 1, "{made:#?}");
    assert_eq!(made[0]["timezone"], "Europe/Paris");
    assert!(made[0]["packageSha256"].is_string(), "{made:#?}");
    let runs = cluster.runs(made[0]["id"].as_str().unwrap()).await;
    assert_eq!(
        runs.iter().map(status).collect::<Vec<_>>(),
        ["SUCCEEDED"],
        "{runs:#?}"
    );
}
