//! Log benchmark: `cargo bench --bench logs`. Prints a table; every figure comes with a
//! baseline measured in the same run.
//!
//! - Ingest: log lines per second one API replica stores through `POST /worker/reports`
//!   (4 writers, as 4 workers would, each posting its batches in order), against the same
//!   batches handed straight to the catalogue (no HTTP, JSON or auth) at the same
//!   concurrency.
//! - Live latency: the same writers paced at 50,000 lines/s through replica A, while
//!   `runLogs` subscribers on replica B follow every run; a line's latency is the time the
//!   subscriber got it minus the time its batch was posted (stamped in the line). Against
//!   a bare Postgres NOTIFY → LISTEN on the same server.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::Utc;
use cloudtask_core::ids::{ClusterId, RunId, TaskId};
use cloudtask_core::protocol::{Claim, Report, ReportBatch};
use cloudtask_core::run::{LogLine, LogStream, RunStatus, RunTrigger};
use cloudtask_testkit::stats::{ms, percentile};
use cloudtask_testkit::{GqlSocket, Reply, TestApi};
use serde_json::json;

const WRITERS: usize = 4;
const RUNS_PER_WRITER: usize = 2;
const BATCH_LINES: usize = 1_000;
const SECONDS: u64 = 10;
const PACED_RATE: usize = 50_000;

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// One writer's batch: `lines` lines spread over its runs, continuing their offsets.
fn batch(runs: &[RunId], next: &mut [u64], lines: usize) -> Vec<Report> {
    let stamp = now_micros();
    let per_run = lines / runs.len();
    runs.iter()
        .zip(next.iter_mut())
        .map(|(run, next)| {
            let lines = (0..per_run)
                .map(|i| LogLine {
                    offset: *next + i as u64,
                    stream: LogStream::Stdout,
                    at: Utc::now(),
                    text: format!(
                        "{stamp} processed record {} of the nightly export",
                        *next + i as u64
                    ),
                })
                .collect();
            *next += per_run as u64;
            Report::Logs { run: *run, lines }
        })
        .collect()
}

struct Setup {
    api: TestApi,
    cluster: ClusterId,
    task: TaskId,
    credential: String,
    owner_token: String,
}

async fn setup() -> Setup {
    let api = TestApi::start().await;
    let tenant = api.tenant_with_cluster("bench", "bench password").await;
    let joined: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/worker/join", api.url))
        .json(&json!({ "token": tenant.join_token }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created = tenant
        .owner
        .run(
            "mutation($c: ID!) { createTask(input: { clusterId: $c, name: \"talker\", schedule: \"0 0 1 1 *\", command: \"true\" }) { id } }",
            json!({ "c": tenant.cluster_id }),
        )
        .await;
    Setup {
        cluster: tenant.cluster_id.parse().unwrap(),
        task: created.data()["createTask"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        credential: joined["credential"].as_str().unwrap().to_owned(),
        owner_token: tenant.owner.token.clone().unwrap(),
        api,
    }
}

/// Fresh RUNNING runs for the writers (claimed straight in the catalogue: setup, not
/// measured).
async fn runs(setup: &Setup, count: usize) -> Vec<RunId> {
    let mut runs = Vec::new();
    for _ in 0..count {
        let claim = Claim {
            task_id: setup.task,
            scheduled_at: Utc::now(),
            attempt: 0,
            task_version: 1,
            worker: "bench".parse().unwrap(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Running,
            reason: None,
        };
        runs.push(
            setup
                .api
                .catalogue
                .cluster(setup.cluster)
                .claim_run(&claim)
                .await
                .unwrap()
                .id,
        );
    }
    runs
}

/// Lines/s of `WRITERS` writers for `SECONDS`, as fast as they go, through HTTP or
/// straight to the catalogue.
async fn ingest(setup: &Setup, over_http: bool) -> f64 {
    let all = runs(setup, WRITERS * RUNS_PER_WRITER).await;
    write(setup, &all, over_http, None).await
}

/// `WRITERS` writers over `all` runs (each its own, in order, as a worker reports) for
/// `SECONDS`: batches of `BATCH_LINES` as fast as they go, or every 20 ms `paced` lines.
/// Returns lines/s.
async fn write(setup: &Setup, all: &[RunId], over_http: bool, paced: Option<usize>) -> f64 {
    let started = Instant::now();
    let mut handles = Vec::new();
    for runs in all.chunks(RUNS_PER_WRITER) {
        let runs = runs.to_vec();
        let catalogue = setup.api.catalogue.clone();
        let cluster = setup.cluster;
        let http = reqwest::Client::new();
        let url = format!("{}/worker/reports", setup.api.url);
        let credential = setup.credential.clone();
        handles.push(tokio::spawn(async move {
            let mut next = vec![0u64; runs.len()];
            let mut written = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while started.elapsed() < Duration::from_secs(SECONDS) {
                if paced.is_some() {
                    tick.tick().await;
                }
                let reports = batch(&runs, &mut next, paced.unwrap_or(BATCH_LINES));
                written += reports
                    .iter()
                    .map(|r| match r {
                        Report::Logs { lines, .. } => lines.len(),
                        _ => 0,
                    })
                    .sum::<usize>();
                if over_http {
                    let response = http
                        .post(&url)
                        .bearer_auth(&credential)
                        .json(&ReportBatch { reports })
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                } else {
                    catalogue
                        .cluster(cluster)
                        .ingest_reports(&reports)
                        .await
                        .unwrap();
                }
            }
            written
        }));
    }
    let mut total = 0;
    for handle in handles {
        total += handle.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// NOTIFY → LISTEN latency of the bare database.
async fn notify_latency(setup: &Setup, samples: usize) -> Vec<Duration> {
    use sea_orm::ConnectionTrait;
    let pool = setup
        .api
        .catalogue
        .connection()
        .get_postgres_connection_pool()
        .clone();
    let mut listener = sea_orm::sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("bench_latency").await.unwrap();
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let sent = Instant::now();
        setup
            .api
            .catalogue
            .connection()
            .execute_unprepared(&format!("NOTIFY bench_latency, '{i}'"))
            .await
            .unwrap();
        listener.recv().await.unwrap();
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    latencies
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
        return;
    }
    let setup = setup().await;

    let direct = ingest(&setup, false).await;
    let http = ingest(&setup, true).await;

    // Live: subscribers on replica B follow the runs the paced writers fill through A.
    let replica = setup.api.replica().await;
    let runs_for_latency = runs(&setup, WRITERS * RUNS_PER_WRITER).await;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut followers = Vec::new();
    let subscribed = Arc::new(tokio::sync::Barrier::new(runs_for_latency.len() + 1));
    for run in runs_for_latency.clone() {
        let url = replica.url.clone();
        let token = setup.owner_token.clone();
        let latencies = latencies.clone();
        let subscribed = subscribed.clone();
        followers.push(tokio::spawn(async move {
            let mut socket = GqlSocket::connect(&url, &token).await;
            socket
                .subscribe(
                    "logs",
                    "subscription($r: ID!) { runLogs(runId: $r) { offset text } }",
                    json!({ "r": run }),
                )
                .await;
            subscribed.wait().await;
            let mut expected = 0u64;
            loop {
                match socket.reply("logs", Duration::from_secs(30)).await {
                    Reply::Next(payload) => {
                        let got = now_micros();
                        let line = &payload["data"]["runLogs"];
                        assert_eq!(
                            line["offset"].as_u64(),
                            Some(expected),
                            "no gap, no duplicate"
                        );
                        expected += 1;
                        let stamp: u128 = line["text"]
                            .as_str()
                            .unwrap()
                            .split(' ')
                            .next()
                            .unwrap()
                            .parse()
                            .unwrap();
                        latencies
                            .lock()
                            .unwrap()
                            .push(Duration::from_micros((got.saturating_sub(stamp)) as u64));
                    }
                    Reply::Complete => return expected,
                    Reply::Error(e) => panic!("{e}"),
                }
            }
        }));
    }
    subscribed.wait().await;
    // Give the subscriptions a moment to be in place server-side (they replay from 0,
    // so nothing is lost either way; this keeps the replay out of the latency figures).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paced = write(
        &setup,
        &runs_for_latency,
        true,
        Some(PACED_RATE / WRITERS / 50),
    )
    .await;
    // End the runs so the subscriptions complete.
    let finish: Vec<Report> = runs_for_latency
        .iter()
        .map(|run| Report::Finish {
            run: *run,
            outcome: cloudtask_core::run::Outcome {
                status: RunStatus::Succeeded,
                exit_code: Some(0),
                signal: None,
                error: None,
                finished_at: Utc::now(),
                reason: None,
            },
        })
        .collect();
    setup
        .api
        .catalogue
        .cluster(setup.cluster)
        .ingest_reports(&finish)
        .await
        .unwrap();
    let mut delivered = 0;
    for follower in followers {
        delivered += follower.await.unwrap();
    }
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let bare = notify_latency(&setup, 1_000).await;

    println!();
    println!("| scenario | measured | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| ingest, {WRITERS} writers, batches of {BATCH_LINES} lines, {SECONDS} s | {http:.0} lines/s through POST /worker/reports | {direct:.0} lines/s straight to the catalogue | {:.2} |",
        http / direct
    );
    println!(
        "| live: {paced:.0} lines/s through replica A, {} runLogs subscribers on replica B | {delivered} lines delivered; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | NOTIFY → LISTEN p50 {:.2} ms, p99 {:.2} ms | p99 {:.1}× |",
        runs_for_latency.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().unwrap()),
        ms(percentile(&bare, 0.5)),
        ms(percentile(&bare, 0.99)),
        ms(percentile(&latencies, 0.99)) / ms(percentile(&bare, 0.99)),
    );
}
