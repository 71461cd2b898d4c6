//! A run's output on the real worker and API: nothing a task prints is lost unsaid. A line
//! of 10 MB is stored whole (split), a gigabyte past the run's cap is counted and said
//! in a SYSTEM line and fails the run, bytes that are not text come back escaped as the
//! README says, and a line printed at a quiet moment reaches a subscriber promptly.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_testkit::{GqlSocket, Reply};
use cloudtask_worker::clock::SystemClock;
use serde_json::{Value, json};

use crate::harness::Cluster;

/// A run's status and error, once it has ended (bounded wait).
async fn ended(cluster: &Cluster, run: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let response = cluster
            .owner
            .run(
                "query($id: ID!) { run(id: $id) { status error exitCode reason } }",
                json!({ "id": run }),
            )
            .await;
        let node = response.data()["run"].clone();
        if !matches!(node["status"].as_str(), Some("RUNNING" | "QUEUED")) {
            return node;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run did not end within {within:?}: {node}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every stored line of a run, in pages.
async fn all_lines(cluster: &Cluster, run: &str) -> Vec<Value> {
    let mut lines: Vec<Value> = Vec::new();
    loop {
        let response = cluster
            .owner
            .run(
                "query($id: ID!, $from: Int!) { run(id: $id) {
                    logs(fromOffset: $from, limit: 100) { offset stream text } } }",
                json!({ "id": run, "from": lines.len() }),
            )
            .await;
        let page = response.data()["run"]["logs"]
            .as_array()
            .unwrap_or_else(|| panic!("{}", response.body))
            .clone();
        if page.is_empty() {
            return lines;
        }
        lines.extend(page);
    }
}

/// Offsets 0, 1, 2… with no gap and no duplicate.
fn assert_contiguous(lines: &[Value]) {
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["offset"].as_u64(), Some(i as u64), "offset gap at {i}");
    }
}

async fn run_command(cluster: &Cluster, name: &str, command: &str) -> String {
    let task = cluster
        .create_task(json!({ "name": name, "schedule": "0 0 1 1 *", "command": command }))
        .await;
    cluster.wait_assigned(&task).await;
    cluster.run_now(&task).await
}

#[tokio::test]
async fn a_ten_megabyte_line_is_stored_whole_split_in_order() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let run = run_command(
        &cluster,
        "one-long-line",
        "head -c 10000000 /dev/zero | tr '\\0' a; echo; echo after",
    )
    .await;
    let outcome = ended(&cluster, &run, Duration::from_secs(30)).await;
    assert_eq!(outcome["status"], "SUCCEEDED", "{outcome}");
    let lines = all_lines(&cluster, &run).await;
    assert_contiguous(&lines);
    // run_max_line_bytes (16 KiB) a piece: 611 pieces, then the next line.
    assert_eq!(lines.len(), 612);
    let whole: String = lines[..611]
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(whole.len(), 10_000_000);
    assert!(whole.bytes().all(|b| b == b'a'));
    assert_eq!(lines[611]["text"], "after");
    assert!(lines.iter().all(|l| l["stream"] == "STDOUT"));
}

/// The issue's 1 GB stream, past a cap of 1 MiB: the worker keeps 1 MiB and counts the
/// rest at pipe speed, so the whole gigabyte is read (the program is not blocked or
/// killed) and every byte of it is accounted for.
#[tokio::test]
async fn a_gigabyte_past_the_output_cap_is_accounted_for_and_fails_the_run() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker_with("w1", Arc::new(SystemClock), |config| {
        config.run_max_output_bytes = 1 << 20;
    });
    // 1 GiB in lines of 1,023 bytes and a newline: 1,048,576 lines.
    let run = run_command(
        &cluster,
        "firehose",
        "yes \"$(head -c 1023 /dev/zero | tr '\\0' x)\" | head -c 1073741824",
    )
    .await;
    let outcome = ended(&cluster, &run, Duration::from_secs(60)).await;
    assert_eq!(outcome["status"], "FAILED", "{outcome}");
    assert_eq!(outcome["reason"], "OUTPUT_LIMIT", "{outcome}");
    assert_eq!(outcome["exitCode"], 0, "{outcome}");
    assert!(
        outcome["error"].as_str().unwrap().contains("output limit"),
        "{outcome}"
    );
    let lines = all_lines(&cluster, &run).await;
    assert_contiguous(&lines);
    // 1,025 lines of 1,023 bytes fit 1 MiB; the 1,026th would not.
    assert_eq!(lines.len(), 1_026);
    assert!(
        lines[..1_025]
            .iter()
            .all(|l| l["text"].as_str().unwrap().len() == 1_023)
    );
    let last = &lines[1_025];
    assert_eq!(last["stream"], "SYSTEM");
    let kept_bytes = 1_025 * 1_023;
    let dropped_lines = 1_048_576 - 1_025;
    let dropped_bytes = 1_073_741_824 - 1_048_576 - kept_bytes;
    assert_eq!(
        last["text"],
        format!(
            "output limit reached (1048576 bytes): {dropped_lines} more lines \
             ({dropped_bytes} bytes) were dropped; 1025 lines ({kept_bytes} bytes) were kept"
        )
    );
}

#[tokio::test]
async fn bytes_that_are_not_text_come_back_escaped() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    // NUL (Postgres text refuses it), a byte that is no UTF-8, a cut-off character, a
    // real one, an escape sequence, on stdout and stderr.
    let run = run_command(
        &cluster,
        "binary",
        r"printf 'a\000b\377c\303 \303\251 \033[1m\n'; printf '\000\000\n' >&2",
    )
    .await;
    let outcome = ended(&cluster, &run, Duration::from_secs(30)).await;
    assert_eq!(outcome["status"], "SUCCEEDED", "{outcome}");
    let lines = all_lines(&cluster, &run).await;
    assert_contiguous(&lines);
    let mut texts: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["stream"].as_str().unwrap(), l["text"].as_str().unwrap()))
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            ("STDERR", r"\x00\x00"),
            ("STDOUT", "a\\x00b\\xffc\\xc3 \u{e9} \u{1b}[1m"),
        ]
    );
}

/// A line printed once a second reaches a `runLogs` subscriber on another API replica
/// soon after the worker read it (the line's `at`): no batching window on the way.
#[tokio::test]
async fn a_quiet_line_reaches_a_subscriber_on_another_replica_promptly() {
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let replica = cluster.api.replica().await;
    let task = cluster
        .create_task(json!({
            "name": "quiet",
            "schedule": "0 0 1 1 *",
            "command": "sleep 1; for i in 1 2 3 4 5; do echo \"quiet $i\"; sleep 1; done",
        }))
        .await;
    cluster.wait_assigned(&task).await;
    let run = cluster.run_now(&task).await;
    let token = cluster.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect(&replica.url, &token).await;
    socket
        .subscribe(
            "logs",
            "subscription($r: ID!) { runLogs(runId: $r) { offset text at } }",
            json!({ "r": run }),
        )
        .await;
    let mut latencies = Vec::new();
    loop {
        match socket.reply("logs", Duration::from_secs(20)).await {
            Reply::Next(payload) => {
                let got = Utc::now();
                let line = &payload["data"]["runLogs"];
                let at: DateTime<Utc> = line["at"].as_str().unwrap().parse().unwrap();
                latencies.push((
                    (got - at).num_microseconds().unwrap() as f64 / 1000.0,
                    line["text"].clone(),
                ));
            }
            Reply::Complete => break,
            Reply::Error(e) => panic!("{e}"),
        }
    }
    assert_eq!(latencies.len(), 5, "{latencies:?}");
    // Before, every quiet line waited 100 ms in the worker's collector and 20 ms in its
    // reporter (~130 ms median in all); now ~30-40 ms in a debug build on a loaded
    // machine. Bounds with room for a shared machine, still below the old floor.
    let mut sorted: Vec<f64> = latencies.iter().map(|(ms, _)| *ms).collect();
    sorted.sort_by(f64::total_cmp);
    assert!(sorted[2] < 100.0, "median {} ms: {latencies:?}", sorted[2]);
    assert!(sorted[4] < 400.0, "max {} ms: {latencies:?}", sorted[4]);
}
