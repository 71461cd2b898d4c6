//! Firing benchmark: `cargo bench --bench firing`. The whole path on real services (the
//! API on Postgres, a scheduler and workers on ZooKeeper, real processes); every figure
//! beside a baseline measured in the same run.
//!
//! Workers are `cloudtask worker` processes, as deployed. Trigger lag is the child
//! process's own start time minus its scheduled time: each run is `sh -c` exec'ing a
//! stamp that writes the time it started at. Spread and burst are measured with two
//! stamps: `date`, and a static C program that reads the clock first thing (built with
//! the machine's C compiler, when there is one): `date`'s own start-up (dynamic linking,
//! locale, time zone) is in the first figure, not in the second.
//!
//! 1. spread: 100 tasks, 10 due in every second → p50/p99 lag (target p99 ≤ 5 ms);
//! 2. burst: 1,000 tasks, 100 due in every second → p99 lag against the time this
//!    machine needs to start 100 `sh -c true` at once (target ≤ 1.1×);
//! 3. sustained: the highest rate of `true` fires the worker keeps up with (each run
//!    SUCCEEDED end to end), against a bare loop spawning `sh -c true` on as many threads
//!    as cores (target ratio ≥ 0.5);
//! 4. memory: RSS of a `cloudtask worker` process holding 10,000 assigned tasks
//!    (target ≤ 50 MB), against the same process idle with none.
//!
//! Each scenario (each stamp of spread and burst) runs in a process of its own.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use cloudtask_catalogue::{NewTask, Scope, TenantHandle};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_core::ids::{ClusterId, TaskId};
use cloudtask_core::task::{TaskSpec, TaskState};
use cloudtask_testkit::TestApi;
use cloudtask_testkit::stats::{ms, percentile};
use tokio_util::sync::CancellationToken;

const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` runs benches without `--bench`.
    }
    match std::env::var(ONE) {
        Ok(scenario) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_one(&scenario)),
        Err(_) => bench(),
    }
}

/// Set in the process of one scenario (see [`bench`]).
const ONE: &str = "CLOUDTASK_BENCH_SCENARIO";

/// The command of every timed run: the time `date` starts at, named by the run, beside
/// its scheduled time.
const STAMP: &str =
    r#"exec date "+${CLOUDTASK_SCHEDULED_AT}%n%s.%N" > "$STAMP_DIR/$CLOUDTASK_RUN_ID""#;

/// The same record written by a static C program that reads the clock first thing: `date`
/// reads it after its own start-up (dynamic linking, locale, time zone: about a
/// millisecond here, more when ten start at once), which is the stamp's lag, not the
/// scheduler's. Built with the machine's C compiler when it has one.
const STAMP_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(void) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    const char *dir = getenv("STAMP_DIR"), *run = getenv("CLOUDTASK_RUN_ID");
    const char *at = getenv("CLOUDTASK_SCHEDULED_AT");
    char path[4096];
    if (!dir || !run || !at) return 2;
    snprintf(path, sizeof path, "%s/%s", dir, run);
    FILE *f = fopen(path, "w");
    if (!f) return 1;
    fprintf(f, "%s\n%lld.%09ld\n", at, (long long)now.tv_sec, now.tv_nsec);
    return fclose(f) != 0;
}
"#;

/// A stamp command and what it needs in its environment.
struct Stamp {
    name: &'static str,
    command: &'static str,
    env: Vec<(&'static str, String)>,
}

/// `date`, and the static C stamp when it can be built (in `dir`).
fn stamps(dir: &Path) -> Vec<Stamp> {
    let mut stamps = vec![Stamp {
        name: "`date`",
        command: STAMP,
        env: Vec::new(),
    }];
    let source = dir.join("stamp.c");
    let binary = dir.join("stamp");
    std::fs::write(&source, STAMP_C).unwrap();
    let built = [vec!["-O2", "-static"], vec!["-O2"]].iter().any(|flags| {
        std::process::Command::new("cc")
            .args(flags)
            .arg("-o")
            .arg(&binary)
            .arg(&source)
            .status()
            .is_ok_and(|s| s.success())
    });
    if built {
        stamps.push(Stamp {
            name: "static C",
            command: r#"exec "$STAMP_BIN""#,
            env: vec![("STAMP_BIN", binary.to_str().unwrap().to_owned())],
        });
    } else {
        eprintln!("no C compiler: spread and burst are measured with `date` only");
    }
    stamps
}

/// A worker process, killed when dropped.
struct WorkerProcess(std::process::Child);

impl WorkerProcess {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Stack {
    api: TestApi,
    tenant: TenantHandle,
    cluster: ClusterId,
    zookeeper: String,
    join_token: String,
    stop: CancellationToken,
    data: tempfile::TempDir,
}

async fn stack(cluster_name: &str) -> Stack {
    let zookeeper = cloudtask_testkit::fresh_zookeeper();
    let zk = zookeeper.clone();
    let api = TestApi::start_with(move |c| {
        c.zookeeper = zk;
        c.zookeeper_session_timeout_ms = SESSION_TIMEOUT.as_millis() as u64;
    })
    .await;
    let setup = api
        .tenant_with_cluster(cluster_name, "bench password")
        .await;
    let tenant_id = setup.tenant_id;
    let cluster_id: ClusterId = setup.cluster_id.parse().unwrap();
    let join_token = setup.join_token;
    let owner_id = api
        .catalogue
        .user_credentials(&setup.owner_email)
        .await
        .unwrap()
        .unwrap()
        .user
        .id;
    let tenant = api
        .catalogue
        .tenant(Scope {
            tenant_id: tenant_id.parse().unwrap(),
            user_id: owner_id,
            actor: "bench".into(),
        })
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let scheduler = cloudtask_scheduler::Scheduler {
        catalogue: api.catalogue.clone(),
        // The platform's own credential, as the API's: the tree the API made has ACLs.
        coordinator: Arc::new(
            ZkCoordinator::from_config(&api.state.config).expect("the API's ZooKeeper settings"),
        ),
        identity: "bench".into(),
        sweep: Duration::from_secs(3600),
        writes: Default::default(),
        notifier: None,
        pruning: None,
    };
    tokio::spawn(scheduler.run(stop.clone()));
    // What the scenario before left for Postgres to flush is flushed now, not during
    // this one's window (bursts measured right after another scenario came out slower
    // than bursts measured alone; a checkpoint due is one cause this takes away).
    use sea_orm::ConnectionTrait;
    let checkpoint = api
        .catalogue
        .connection()
        .execute_unprepared("CHECKPOINT")
        .await;
    if let Err(e) = checkpoint {
        eprintln!("no checkpoint before the scenario: {e}");
    }
    Stack {
        api,
        tenant,
        cluster: cluster_id,
        zookeeper,
        join_token,
        stop,
        data: open_to_runs(tempfile::tempdir().unwrap()),
    }
}

/// A root worker's tasks run as another user: the bench's folders they use (the stamp
/// program, the stamps folder) must let that user in.
fn open_to_runs(dir: tempfile::TempDir) -> tempfile::TempDir {
    set_mode(dir.path(), 0o711);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Stack {
    fn worker_config(&self, name: &str) -> cloudtask_core::config::Config {
        let mut config = cloudtask_testkit::test_config(String::new());
        config.api_url = self.api.url.clone();
        config.zookeeper = self.zookeeper.clone();
        config.zookeeper_session_timeout_ms = SESSION_TIMEOUT.as_millis() as u64;
        config.cluster_token = Some(self.join_token.clone());
        config.worker_name = Some(name.into());
        config.data_dir = self.data.path().join(name);
        config.log_level = "warn".into();
        config
    }

    /// Starts `cloudtask worker` as a process of its own, as in a deployment (a worker
    /// inside this process would fork a process that also hosts the API: every fork
    /// would stall the API's threads).
    fn start_worker(&self, name: &str) -> WorkerProcess {
        let config = self.worker_config(name);
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_cloudtask"))
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CLOUDTASK_API_URL", &config.api_url)
            .env("CLOUDTASK_ZOOKEEPER", &config.zookeeper)
            .env(
                "CLOUDTASK_ZOOKEEPER_SESSION_TIMEOUT_MS",
                config.zookeeper_session_timeout_ms.to_string(),
            )
            .env(
                "CLOUDTASK_CLUSTER_TOKEN",
                config.cluster_token.as_deref().unwrap(),
            )
            .env("CLOUDTASK_WORKER_NAME", name)
            .env("CLOUDTASK_DATA_DIR", &config.data_dir)
            // The bench's own settings pass through: CLOUDTASK_CONTAINMENT to compare how
            // runs are held, CLOUDTASK_LOG_LEVEL to look inside.
            .env(
                "CLOUDTASK_LOG_LEVEL",
                std::env::var("CLOUDTASK_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .env(
                "CLOUDTASK_CONTAINMENT",
                std::env::var("CLOUDTASK_CONTAINMENT").unwrap_or_else(|_| "auto".into()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        WorkerProcess(child)
    }

    async fn create_tasks(
        &self,
        count: usize,
        schedule: impl Fn(usize) -> String,
        command: &str,
        env: &[(&str, &str)],
    ) -> Vec<TaskId> {
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let mut spec = TaskSpec::new(schedule(i), command);
            spec.env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let task = self
                .tenant
                .create_task(
                    NewTask {
                        cluster_id: self.cluster,
                        name: format!("bench-{i}-{}", TaskId::new()),
                        description: String::new(),
                        state: TaskState::Active,
                        spec,
                    },
                    None,
                )
                .await
                .unwrap();
            ids.push(task.id);
        }
        ids
    }
}

/// Lags (start − scheduled) of the stamps in `dir` for fires in `[from, to)`.
fn lags(dir: &Path, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Duration> {
    let mut lags = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        let mut lines = text.lines();
        let (Some(at), Some(started)) = (lines.next(), lines.next()) else {
            continue;
        };
        let at: DateTime<Utc> = at.parse().unwrap();
        let (secs, nanos) = started.split_once('.').expect("seconds.nanoseconds");
        let started =
            DateTime::from_timestamp(secs.parse().unwrap(), nanos.parse().unwrap()).unwrap();
        if at >= from && at < to {
            lags.push((started - at).to_std().unwrap_or_default());
        }
    }
    lags.sort();
    lags
}

/// (Tasks are created before their worker starts, so creating them is not slowed by
/// them firing; the fires missed meanwhile are recorded as misfires at the start.)
/// Lets the tasks warm up, then waits out a window of `seconds` whole seconds (and two
/// more for the last stamps); returns the window.
async fn measure_window(warmup: Duration, seconds: i64) -> (DateTime<Utc>, DateTime<Utc>) {
    tokio::time::sleep(warmup).await;
    let now = Utc::now();
    let from = DateTime::from_timestamp(now.timestamp() + 1, 0).unwrap();
    let to = from + chrono::Duration::seconds(seconds);
    let end = (to - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(2);
    tokio::time::sleep(end).await;
    (from, to)
}

/// Lags of `command` spawned straight from a thread of this process, the way the `sh -c
/// true` baseline is (`/bin/sh -c`, piped output like a run's): `rounds` times,
/// `at_once` commands one after the other, all "scheduled" at the moment before the
/// first spawn call. What any scheduler on this machine pays at the least for them.
///
/// `Start::Held`: the shells are started first and hold on their stdin (as the worker
/// stages them); "scheduled" is the moment before a line is written to each, back to
/// back. What is left is the exec of the command by each shell: the floor of a
/// scheduler that starts its shells ahead.
async fn direct_spawn_lags(
    stamp: &Stamp,
    dir: &Path,
    start: Start,
    at_once: usize,
    rounds: usize,
) -> Vec<Duration> {
    let stamps = dir.to_path_buf();
    let command = match start {
        Start::Now => stamp.command.to_owned(),
        // The worker's own hold.
        Start::Held => format!("{}{}", cloudtask_worker::exec::HOLD, stamp.command),
    };
    let env = stamp.env.clone();
    tokio::task::spawn_blocking(move || {
        for round in 0..rounds {
            let spawn = |i: usize, at: DateTime<Utc>| {
                std::process::Command::new("/bin/sh")
                    .args(["-c", "--", &command])
                    .env("STAMP_DIR", &stamps)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("CLOUDTASK_RUN_ID", format!("probe-{at_once}-{round}-{i}"))
                    .env("CLOUDTASK_SCHEDULED_AT", at.to_rfc3339())
                    .stdin(match start {
                        Start::Now => std::process::Stdio::null(),
                        Start::Held => std::process::Stdio::piped(),
                    })
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            };
            let children: Vec<_> = match start {
                Start::Now => {
                    let at = Utc::now();
                    (0..at_once).map(|i| spawn(i, at)).collect()
                }
                Start::Held => {
                    // Scheduled a little ahead; the lines go at that moment.
                    let at = Utc::now() + chrono::Duration::milliseconds(300 + 3 * at_once as i64);
                    let mut children: Vec<_> = (0..at_once).map(|i| spawn(i, at)).collect();
                    std::thread::sleep((at - Utc::now()).to_std().unwrap_or_default());
                    use std::io::Write;
                    for child in &mut children {
                        child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
                    }
                    children
                }
            };
            for mut child in children {
                drop(child.stdin.take());
                child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20 + 2 * at_once as u64));
        }
    })
    .await
    .unwrap();
    let lags = lags(dir, DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    lags
}

/// How [`direct_spawn_lags`] starts its commands.
#[derive(Clone, Copy, PartialEq)]
enum Start {
    /// Spawned at their time.
    Now,
    /// Started ahead, let go at their time.
    Held,
}

/// Wall time to start 100 `sh -c true` at once and see them all exit.
fn spawn_burst(n: usize) -> Duration {
    let started = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "true"])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        child.wait().unwrap();
    }
    started.elapsed()
}

/// `sh -c true` spawned and reaped in a loop on one thread per core, per second.
fn bare_spawn_rate(seconds: u64) -> f64 {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    std::process::Command::new("sh")
                        .args(["-c", "true"])
                        .status()
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / seconds as f64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn row(line: String) {
    println!("{line}");
}

/// Runs of the tenant that ended SUCCEEDED with a fire time in `[from, to)`.
async fn succeeded_between(stack: &Stack, from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
    use sea_orm::{ConnectionTrait, Statement};
    let db = stack.api.catalogue.connection();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM runs WHERE status = 'SUCCEEDED' AND scheduled_at >= $1 AND scheduled_at < $2",
            [from.into(), to.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap() as u64
}

/// Every scenario (and stamp) runs in a process of its own, this program again, so that
/// nothing an earlier scenario's stack left running in the process weighs on a later
/// one (bursts measured after other scenarios in the same process came out slower).
fn bench() {
    row("| scenario | measured | baseline (same run) | verdict |".into());
    row("|---|---|---|---|".into());

    // CLOUDTASK_BENCH_ONLY=spread,burst runs only the scenarios named.
    let only = std::env::var("CLOUDTASK_BENCH_ONLY").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == name))
    };
    let scenarios = [
        "spread:0",
        "spread:1",
        "burst:0",
        "burst:1",
        "sustained",
        "memory",
    ];
    for scenario in scenarios {
        let name = scenario.split(':').next().unwrap_or(scenario);
        if !wanted(name) {
            continue;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(std::env::args().skip(1))
            .env(ONE, scenario)
            .status()
            .unwrap();
        assert!(status.success(), "scenario {scenario} failed: {status}");
    }
}

/// One scenario: `spread:<stamp>`, `burst:<stamp>` (the stamp's place in [`stamps`]),
/// `sustained` or `memory`.
async fn run_one(scenario: &str) {
    let (name, stamp) = scenario.split_once(':').unwrap_or((scenario, "0"));
    let tools = open_to_runs(tempfile::tempdir().unwrap());
    let stamp = || {
        let place: usize = stamp.parse().expect("a stamp's place");
        stamps(tools.path()).into_iter().nth(place)
    };
    match name {
        "spread" => {
            if let Some(stamp) = stamp() {
                spread_with(&stamp).await;
            }
        }
        "burst" => {
            if let Some(stamp) = stamp() {
                burst_with(&stamp).await;
            }
        }
        "sustained" => sustained().await,
        "memory" => memory().await,
        other => panic!("no scenario {other}"),
    }
}

/// 1: spread, 10 due in every second.
async fn spread_with(stamp: &Stamp) {
    let spread = stack("spread").await;
    let dir = spread.data.path().join("stamps");
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o1777);
    let mut env = vec![("STAMP_DIR", dir.to_str().unwrap())];
    env.extend(stamp.env.iter().map(|(k, v)| (*k, v.as_str())));
    spread
        .create_tasks(
            100,
            |i| format!("{}/10 * * * * *", i % 10),
            stamp.command,
            &env,
        )
        .await;
    let worker = spread.start_worker("w1");
    let (from, to) = measure_window(Duration::from_secs(3), 20).await;
    let lags_spread = lags(&dir, from, to);
    drop(worker);
    spread.stop.cancel();
    // What the lag is made of: the same stamp command spawned straight from this process
    // (what any scheduler pays), and let go from shells started ahead (the floor of
    // staging).
    let probe_dir = spread.data.path().join("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    let direct = direct_spawn_lags(stamp, &probe_dir, Start::Now, 1, 100).await;
    let direct_10 = direct_spawn_lags(stamp, &probe_dir, Start::Now, 10, 30).await;
    let held_10 = direct_spawn_lags(stamp, &probe_dir, Start::Held, 10, 30).await;
    row(format!(
        "| spread: 100 tasks, 10 due per second, 20 s; stamp {} | {} fires; lag p50 {:.1} ms, p99 {:.1} ms | the stamp spawned directly, one at a time: p50 {:.1} ms, p99 {:.1} ms; 10 at once: p50 {:.1} ms, p99 {:.1} ms; 10 held shells let go at once: p50 {:.1} ms, p99 {:.1} ms | target p99 ≤ 5 ms; p99 / 10-at-once p99 = {:.2}; p99 / held p99 = {:.2} |",
        stamp.name,
        lags_spread.len(),
        ms(percentile(&lags_spread, 0.5)),
        ms(percentile(&lags_spread, 0.99)),
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.99)),
        ms(percentile(&direct_10, 0.5)),
        ms(percentile(&direct_10, 0.99)),
        ms(percentile(&held_10, 0.5)),
        ms(percentile(&held_10, 0.99)),
        percentile(&lags_spread, 0.99).as_secs_f64() / percentile(&direct_10, 0.99).as_secs_f64(),
        percentile(&lags_spread, 0.99).as_secs_f64() / percentile(&held_10, 0.99).as_secs_f64(),
    ));
}

/// 2: burst, 100 due in every second.
async fn burst_with(stamp: &Stamp) {
    let burst = stack("burst").await;
    let dir = burst.data.path().join("stamps");
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o1777);
    let mut env = vec![("STAMP_DIR", dir.to_str().unwrap())];
    env.extend(stamp.env.iter().map(|(k, v)| (*k, v.as_str())));
    burst
        .create_tasks(
            1_000,
            |i| format!("{}/10 * * * * *", i % 10),
            stamp.command,
            &env,
        )
        .await;
    // The baseline is taken before and after the window (this machine's spawn speed
    // drifts within minutes): the median of ten.
    let mut baselines: Vec<Duration> = (0..5).map(|_| spawn_burst(100)).collect();
    let worker = burst.start_worker("w1");
    let (from, to) = measure_window(Duration::from_secs(5), 10).await;
    let lags_burst = lags(&dir, from, to);
    drop(worker);
    burst.stop.cancel();
    tokio::time::sleep(Duration::from_secs(2)).await;
    baselines.extend((0..5).map(|_| spawn_burst(100)));
    baselines.sort();
    let baseline = baselines[baselines.len() / 2];
    let probe_dir = burst.data.path().join("probe");
    std::fs::create_dir_all(&probe_dir).unwrap();
    let direct_100 = direct_spawn_lags(stamp, &probe_dir, Start::Now, 100, 10).await;
    let held_100 = direct_spawn_lags(stamp, &probe_dir, Start::Held, 100, 10).await;
    row(format!(
        "| burst: 1,000 tasks, 100 due per second, 10 s; stamp {} | {} fires; lag p50 {:.1} ms, p99 {:.1} ms | 100 × `sh -c true` at once: {:.1} ms (median of 10, before and after); the stamp command 100 at once, spawned the same way: lag p50 {:.1} ms, p99 {:.1} ms; 100 held shells let go at once: p50 {:.1} ms, p99 {:.1} ms | p99 / `sh -c true` baseline = {:.2} (target ≤ 1.1); p99 / the stamp's own p99 = {:.2}; p99 / held p99 = {:.2} |",
        stamp.name,
        lags_burst.len(),
        ms(percentile(&lags_burst, 0.5)),
        ms(percentile(&lags_burst, 0.99)),
        ms(baseline),
        ms(percentile(&direct_100, 0.5)),
        ms(percentile(&direct_100, 0.99)),
        ms(percentile(&held_100, 0.5)),
        ms(percentile(&held_100, 0.99)),
        percentile(&lags_burst, 0.99).as_secs_f64() / baseline.as_secs_f64(),
        percentile(&lags_burst, 0.99).as_secs_f64() / percentile(&direct_100, 0.99).as_secs_f64(),
        percentile(&lags_burst, 0.99).as_secs_f64() / percentile(&held_100, 0.99).as_secs_f64(),
    ));
}

/// 3: sustained: the highest rate of `true` runs the worker keeps up with, every fire of
/// a 10 s window run and SUCCEEDED end to end. Tasks firing every second are added in
/// steps of a tenth of the bare loop's rate until the worker falls behind (fires
/// skipped because the previous second's run still goes, or not run in time); what it
/// still completed at that first overloaded step is shown too.
async fn sustained() {
    let bare = tokio::task::spawn_blocking(|| bare_spawn_rate(5))
        .await
        .unwrap();
    let sustained = stack("sustained").await;
    let mut worker = None;
    let mut tasks = 0;
    let mut kept_up = (0, 0.0);
    let mut overloaded = None;
    for tenth in 3..=10 {
        let offered = (bare * tenth as f64 / 10.0).round() as usize;
        sustained
            .create_tasks(offered - tasks, |_| "* * * * * *".into(), "true", &[])
            .await;
        tasks = offered;
        if worker.is_none() {
            worker = Some(sustained.start_worker("w1"));
        }
        let (from, to) = measure_window(Duration::from_secs(5), 10).await;
        tokio::time::sleep(Duration::from_secs(3)).await; // the last outcomes land
        let done = succeeded_between(&sustained, from, to).await as f64 / 10.0;
        if done >= 0.99 * offered as f64 {
            kept_up = (offered, done);
        } else {
            overloaded = Some((offered, done));
            break;
        }
    }
    drop(worker);
    sustained.stop.cancel();
    let (offered, done) = kept_up;
    let beyond = match overloaded {
        Some((offered, done)) => {
            format!("; at {offered}/s offered it completed {done:.0}/s")
        }
        None => String::new(),
    };
    row(format!(
        "| sustained: tasks of `true` firing every second, added in steps of bare/10 | kept up with {offered} fires/s ({done:.0} runs/s SUCCEEDED end to end){beyond} | bare `sh -c true` loop, one thread per core: {bare:.0}/s | ratio {:.2} (target ≥ 0.5) |",
        done / bare
    ));
}

/// 4: memory of a worker process holding 10,000 assigned tasks.
async fn memory() {
    let memory = stack("memory").await;
    let child = memory.start_worker("mem");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_kib(child.id());
    memory
        .create_tasks(10_000, |_| "0 0 1 1 *".into(), "true", &[])
        .await;
    // Settled: RSS steady over 5 s (every task assigned and its spec read).
    let mut loaded = 0;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = rss_kib(child.id());
        if now == loaded {
            break;
        }
        loaded = now;
    }
    drop(child);
    memory.stop.cancel();
    row(format!(
        "| memory: worker process with 10,000 assigned tasks | RSS {:.1} MB | same process with none: {:.1} MB | target ≤ 50 MB |",
        loaded as f64 / 1024.0,
        idle as f64 / 1024.0
    ));
}
