//! `cloudtask standalone`, the built binary in a temporary folder: it serves, runs a
//! packaged task with its logs, shuts down cleanly on SIGTERM, and finds everything
//! again after a restart.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudtask_core::archive::samples;
use cloudtask_testkit::Gql;
use cloudtask_testkit::{GqlSocket, Reply};
use serde_json::{Value, json};

use crate::support::PASSWORD;

/// Starts the binary and waits for its banner; returns the process, the API base URL,
/// the banner, and how long it took to be ready.
fn start(dir: &std::path::Path) -> (Child, String, Vec<String>, Duration) {
    // Runs work beside the data folder, in `runs/`, which their user must reach.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudtask"))
        .arg("standalone")
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLOUDTASK_LISTEN", "127.0.0.1:0")
        .env("CLOUDTASK_ADMIN_PASSWORD", PASSWORD)
        .env("CLOUDTASK_RUN_DIR", dir.join("runs"))
        .env("CLOUDTASK_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cloudtask standalone");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    let url = loop {
        let line = lines
            .next()
            .expect("standalone printed its banner")
            .unwrap();
        banner.push(line.clone());
        if let Some(rest) = line.trim().strip_prefix("GraphQL API and GraphiQL: ") {
            break rest.trim_end_matches("/graphql").to_owned();
        }
    };
    // The rest of the banner (the credentials line).
    for _ in 0..2 {
        if let Some(Ok(line)) = lines.next() {
            banner.push(line);
        }
    }
    let ready = started.elapsed();
    (child, url, banner, ready)
}

pub(crate) async fn login(url: &str) -> Gql {
    let anonymous = Gql {
        http: reqwest::Client::new(),
        url: url.to_owned(),
        token: None,
    };
    let first = anonymous
        .run(
            "mutation($p: String!) { login(email: \"admin@localhost\", password: $p) { accessToken } }",
            json!({ "p": PASSWORD }),
        )
        .await;
    let user = anonymous
        .clone()
        .with_token(first.data()["login"]["accessToken"].as_str().unwrap());
    let me = user
        .run("{ me { memberships { tenant { id name } } } }", json!({}))
        .await;
    let tenant = me.data()["me"]["memberships"][0]["tenant"].clone();
    assert_eq!(tenant["name"], "default");
    let second = anonymous
        .run(
            "mutation($p: String!, $t: ID) { login(email: \"admin@localhost\", password: $p, tenantId: $t) { accessToken } }",
            json!({ "p": PASSWORD, "t": tenant["id"] }),
        )
        .await;
    anonymous.with_token(second.data()["login"]["accessToken"].as_str().unwrap())
}

pub(crate) fn terminate(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "standalone exits cleanly on SIGTERM: {exit:?}"
    );
}

async fn runs(owner: &Gql, task: &str) -> Vec<Value> {
    let response = owner
        .run(
            "query($t: ID!) { task(id: $t) { name runs(first: 100) { edges { node { id status logs { text } } } } } }",
            json!({ "t": task }),
        )
        .await;
    response.data()["task"]["runs"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"].clone())
        .collect()
}

#[tokio::test]
async fn standalone_runs_a_packaged_task_and_keeps_everything_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, banner, ready) = start(dir.path());
    eprintln!("standalone: cold start to ready in {ready:?}");
    assert!(
        banner.iter().any(|l| l.contains("admin@localhost")),
        "{banner:?}"
    );
    assert!(dir.path().join("cloudtask-data/cloudtask.db").exists());
    // The console is where the banner says, in standalone as in the API.
    assert!(
        banner
            .iter()
            .any(|l| l.trim() == format!("console: {url}/")),
        "{banner:?}"
    );
    let console = reqwest::get(format!("{url}/")).await.unwrap();
    assert_eq!(console.status(), 200);
    assert!(
        console
            .text()
            .await
            .unwrap()
            .contains("/console/console.js")
    );

    let owner = login(&url).await;
    let clusters = owner.run("{ clusters { id name } }", json!({})).await;
    assert_eq!(clusters.data()["clusters"][0]["name"], "local");
    let cluster = clusters.data()["clusters"][0]["id"].clone();
    let package = samples::tar_gz_of(&[(
        "hello.sh",
        b"#!/bin/sh\necho \"hello from the package\"\necho \"args: $1\"\n",
        0o755,
    )]);
    let created = owner
        .upload(
            "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
            json!({ "input": {
                "clusterId": cluster, "name": "hello", "schedule": "*/2 * * * * *",
                "command": "./hello.sh world", "package": null,
            } }),
            vec![("variables.input.package", "hello.tar.gz", package)],
        )
        .await;
    let task = created.data()["createTask"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let deadline = Instant::now() + Duration::from_secs(30);
    let succeeded = loop {
        let runs = runs(&owner, &task).await;
        if let Some(run) = runs.iter().find(|r| r["status"] == "SUCCEEDED") {
            break run.clone();
        }
        assert!(Instant::now() < deadline, "no run succeeded: {runs:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let texts: Vec<&str> = succeeded["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["hello from the package", "args: world"]);

    let before: Vec<String> = runs(&owner, &task)
        .await
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    terminate(child);

    let (child, url, banner, _) = start(dir.path());
    assert!(
        banner.iter().all(|l| !l.contains(PASSWORD)),
        "the password is shown once: {banner:?}"
    );
    let owner = login(&url).await;
    let after = runs(&owner, &task).await;
    assert!(
        after
            .iter()
            .any(|r| r["id"] == succeeded["id"] && r["status"] == "SUCCEEDED"),
        "the run is still there after the restart: {after:#?}"
    );
    // The clean shutdown stopped and recorded what was going: no run from before it is
    // still RUNNING.
    for run in after
        .iter()
        .filter(|r| before.iter().any(|id| r["id"] == id.as_str()))
    {
        assert_ne!(run["status"], "RUNNING", "{run}");
        assert_ne!(run["status"], "QUEUED", "{run}");
    }

    // Live logs fan out in-process: a subscriber sees a manual run's lines as they come.
    let slow = owner
        .run(
            "mutation($input: CreateTaskInput!) { createTask(input: $input) { id } }",
            json!({ "input": {
                "clusterId": cluster, "name": "slow", "schedule": "0 0 1 1 *",
                "command": "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.2; done",
            } }),
        )
        .await;
    let slow = slow.data()["createTask"]["id"].as_str().unwrap().to_owned();
    let mut socket = GqlSocket::connect(&url, owner.token.as_ref().unwrap()).await;
    // Queued now, handed to the worker once the task is assigned (the one-second sweep).
    let queued = owner
        .run(
            "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
            json!({ "id": slow }),
        )
        .await;
    let run = queued.data()["runTaskNow"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    socket
        .subscribe(
            "logs",
            "subscription($r: ID!) { runLogs(runId: $r) { offset text } }",
            json!({ "r": run }),
        )
        .await;
    let first = socket.reply("logs", Duration::from_secs(30)).await;
    let Reply::Next(first) = first else {
        panic!("expected a line, got {first:?}");
    };
    assert_eq!(first["data"]["runLogs"]["text"], "tick-1", "{first}");
    let status = owner
        .run(
            "query($id: ID!) { run(id: $id) { status } }",
            json!({ "id": run }),
        )
        .await;
    assert_eq!(
        status.data()["run"]["status"],
        "RUNNING",
        "the first line comes live"
    );
    let rest = socket.until_complete("logs", Duration::from_secs(30)).await;
    let texts: Vec<&str> = rest
        .iter()
        .map(|p| p["data"]["runLogs"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["tick-2", "tick-3", "tick-4", "tick-5"]);
    terminate(child);
}

/// A weak `CLOUDTASK_ADMIN_PASSWORD` stops the first start, with a message that names it
/// and says why, instead of creating an admin anyone could guess.
#[test]
fn a_weak_admin_password_stops_the_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudtask"))
        .arg("standalone")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CLOUDTASK_LISTEN", "127.0.0.1:0")
        .env("CLOUDTASK_ADMIN_PASSWORD", "password")
        .env("CLOUDTASK_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cloudtask standalone");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("standalone started with the admin password \"password\"");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("CLOUDTASK_ADMIN_PASSWORD"), "{stderr}");
    assert!(stderr.contains("common password"), "{stderr}");
}
