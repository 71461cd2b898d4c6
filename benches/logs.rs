//! Log benchmark: `cargo bench --bench logs`. Prints a table; every figure comes with a
//! baseline measured in the same run.
//!
//! - Ingest: log lines per second one API replica stores through `POST /worker/reports`
//!   (4 writers, as 4 workers would, each posting its batches in order), against the same
//!   batches handed straight to the catalogue (no HTTP, JSON or auth) at the same
//!   concurrency.
//! - Live latency, the whole way a line goes: a real program's line read by the worker's
//!   output reader (the line's `at`), through its collector and reporter, `POST
//!   /worker/reports` on replica A, Postgres and its NOTIFY, to a `runLogs` subscriber on
//!   replica B (graphql-transport-ws). At 1 line/s (a quiet run, what users watch most)
//!   and at 50,000 lines/s, each line's latency is when the subscriber got it minus its
//!   `at`. Against a bare Postgres NOTIFY → LISTEN on the same server, in the same run.
//!   The live cases run first, each after a `CHECKPOINT` (the ingest cases write enough
//!   to set off checkpoints every few seconds, which would otherwise land in them).
//!   The program is this benchmark itself, started with `--emit RATE SECONDS`. Each live
//!   case also prints when the program ended, when the API had stored every line, and
//!   when the subscriber had every line: where a backlog builds. `LOGS_BENCH_LOUD_ONLY=1`
//!   shortens the quiet case to 3 s (for quick runs; its figures then mean little).

use std::collections::BTreeMap;
use std::io::Write;
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
const LOUD_RATE: u64 = 50_000;
const LOUD_SECONDS: u64 = 10;
const QUIET_SECONDS: u64 = 40;

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
    join_token: String,
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
        join_token: tenant.join_token.clone(),
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
    write(setup, &all, over_http).await
}

/// `WRITERS` writers over `all` runs (each its own, in order, as a worker reports) for
/// `SECONDS`: batches of `BATCH_LINES` as fast as they go. Returns lines/s.
async fn write(setup: &Setup, all: &[RunId], over_http: bool) -> f64 {
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
            while started.elapsed() < Duration::from_secs(SECONDS) {
                let reports = batch(&runs, &mut next, BATCH_LINES);
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

/// Writes every dirty page of the database out now, so that no checkpoint the earlier
/// cases made necessary falls into the next one.
async fn checkpoint(setup: &Setup) {
    use sea_orm::ConnectionTrait;
    setup
        .api
        .catalogue
        .connection()
        .execute_unprepared("CHECKPOINT")
        .await
        .unwrap();
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

/// `--emit RATE SECONDS`: prints RATE numbered lines a second for SECONDS, evenly (at
/// most a millisecond's worth at once), flushing each burst.
fn emit(rate: u64, seconds: u64) {
    let started = Instant::now();
    let total = rate * seconds;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut sent = 0;
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while sent < due {
            writeln!(out, "{sent} emitted by the live latency benchmark").unwrap();
            sent += 1;
        }
        out.flush().unwrap();
        let next = Duration::from_secs_f64(sent as f64 / rate as f64);
        let wait = next.saturating_sub(started.elapsed());
        std::thread::sleep(
            wait.max(Duration::from_micros(500))
                .min(Duration::from_millis(1_000)),
        );
    }
}

/// Live latency of `rate` lines/s for `seconds`: a program run by the worker's own exec,
/// output and reporter, reporting to replica A; a subscriber on replica B. Returns
/// (lines/s delivered, sorted latencies).
async fn live(setup: &Setup, replica: &TestApi, rate: u64, seconds: u64) -> (f64, Vec<Duration>) {
    use cloudtask_worker::exec::{ExecLimits, RunSpec, execute};
    let run = runs(setup, 1).await[0];
    // The subscriber first, caught up (nothing stored yet) before the program starts.
    let mut socket = GqlSocket::connect(&replica.url, &setup.owner_token).await;
    socket
        .subscribe(
            "logs",
            "subscription($r: ID!) { runLogs(runId: $r) { offset at } }",
            json!({ "r": run }),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let follower = tokio::spawn(async move {
        let mut latencies = Vec::new();
        let mut expected = 0u64;
        loop {
            match socket.reply("logs", Duration::from_secs(60)).await {
                Reply::Next(payload) => {
                    let got = Utc::now();
                    let line = &payload["data"]["runLogs"];
                    assert_eq!(
                        line["offset"].as_u64(),
                        Some(expected),
                        "no gap, no duplicate"
                    );
                    expected += 1;
                    let at: chrono::DateTime<Utc> = line["at"].as_str().unwrap().parse().unwrap();
                    latencies.push((got - at).to_std().unwrap_or_default());
                }
                Reply::Complete => return latencies,
                Reply::Error(e) => panic!("{e}"),
            }
        }
    });

    let shutdown = tokio_util::sync::CancellationToken::new();
    let client = Arc::new(cloudtask_worker::ApiClient::new(
        &setup.api.url,
        &setup.join_token,
        setup.credential.clone(),
        shutdown.clone(),
    ));
    let spool = tempfile::tempdir().unwrap();
    let (reporter, writer) =
        cloudtask_worker::report::spawn(client, spool.path().to_path_buf(), shutdown.clone());
    let workdir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let spec = RunSpec {
        run_id: run,
        task_id: setup.task,
        scheduled_at: Utc::now(),
        attempt: 0,
        command: format!("'{}' --emit {rate} {seconds}", exe.display()),
        env: BTreeMap::new(),
        workdir: workdir.path().to_path_buf(),
        timeout: None,
        identity: Default::default(),
        limits: Default::default(),
    };
    let limits = ExecLimits {
        max_lines: 10_000_000,
        max_output_bytes: 1 << 30,
        max_line_bytes: 16 << 10,
        kill_grace: Duration::from_secs(1),
        hurried_grace: Duration::from_secs(1),
        containment: cloudtask_worker::exec::Containment::process_tree(),
    };
    let never = tokio_util::sync::CancellationToken::new();
    let started = Instant::now();
    let outcome = execute(&spec, limits, &reporter, &never, &never).await;
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    // As the worker's engine does: the outcome after the lines; the subscription completes.
    let exited = started.elapsed();
    reporter.send(Report::Finish { run, outcome });
    reporter.delivered().await;
    let stored = started.elapsed();
    let mut latencies = follower.await.unwrap();
    let elapsed = started.elapsed();
    // Where a backlog builds: the program's end, everything stored, everything followed.
    eprintln!(
        "{rate} lines/s: program ended at {:.1} s, all stored at {:.1} s, all followed at {:.1} s",
        exited.as_secs_f64(),
        stored.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    shutdown.cancel();
    writer.await.unwrap();
    assert_eq!(
        latencies.len() as u64,
        rate * seconds,
        "every line delivered"
    );
    latencies.sort();
    (latencies.len() as f64 / elapsed.as_secs_f64(), latencies)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--emit") {
        return emit(args[at + 1].parse().unwrap(), args[at + 2].parse().unwrap());
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
        return;
    }
    let setup = setup().await;

    // Live first: the ingest cases write millions of lines, whose checkpoints would land
    // in the live cases. Each live case starts from a checkpoint.
    // The worker reports to replica A, the subscriber follows on replica B.
    let replica = setup.api.replica().await;
    let quiet_seconds = if std::env::var_os("LOGS_BENCH_LOUD_ONLY").is_some() {
        3
    } else {
        QUIET_SECONDS
    };
    checkpoint(&setup).await;
    let quiet = live(&setup, &replica, 1, quiet_seconds).await;
    checkpoint(&setup).await;
    let loud = live(&setup, &replica, LOUD_RATE, LOUD_SECONDS).await;
    let bare = notify_latency(&setup, 1_000).await;

    let direct = ingest(&setup, false).await;
    let http = ingest(&setup, true).await;

    println!();
    println!("| scenario | measured | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| ingest, {WRITERS} writers, batches of {BATCH_LINES} lines, {SECONDS} s | {http:.0} lines/s through POST /worker/reports | {direct:.0} lines/s straight to the catalogue | {:.2} |",
        http / direct
    );
    for (name, (rate, latencies)) in [
        (format!("1 line/s for {quiet_seconds} s"), quiet),
        (format!("{LOUD_RATE} lines/s for {LOUD_SECONDS} s"), loud),
    ] {
        println!(
            "| live, {name}: worker line read → worker API on replica A → runLogs subscriber on replica B | {} lines ({rate:.0} lines/s); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | NOTIFY → LISTEN p50 {:.2} ms, p99 {:.2} ms | p99 {:.1}× |",
            latencies.len(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(*latencies.last().unwrap()),
            ms(percentile(&bare, 0.5)),
            ms(percentile(&bare, 0.99)),
            ms(percentile(&latencies, 0.99)) / ms(percentile(&bare, 0.99)),
        );
    }
}
