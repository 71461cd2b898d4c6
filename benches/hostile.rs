//! Hostile-load benchmark: `cargo bench --bench hostile`. Prints a table.
//!
//! Starts `cloudtask api` as a process of its own, with its default limits, over a fresh
//! Postgres catalogue (a tenant of 1,000 tasks, a run of 5,000 log lines), and measures
//! its resident memory and a legitimate user's `tasks(first: 50)` latency at rest, then
//! while the attacks of issue 16 run together for `ATTACK` seconds:
//!
//! - anonymous JSON batches of 10 wrong logins, from 8 addresses;
//! - anonymous multipart uploads announcing 128 MiB each, 8 at once;
//! - anonymous queries nested 3,000 deep, from 8 addresses;
//! - a VIEWER asking for the most log text its budget allows (40 aliases of 5,000 lines),
//!   4 at once;
//! - the same VIEWER opening 50 sockets with 100 `runLogs` subscriptions each (5,000),
//!   never reading what they are sent.
//!
//! Beside the legitimate user, the machine's floor: `GET /healthz` at the same pace, at
//! rest and under attack (the attackers run on the same two cores as the server).
//!
//! Then everything stops and, `SETTLE` seconds later, the memory is read again. Targets
//! (issue 16): peak − idle ≤ 512 MiB, after − idle ≤ 128 MiB, p99 under attack ≤ 5 × p99
//! at rest. `CLOUDTASK_BENCH_ONLY=logins,uploads,nesting,answers,sockets` picks attacks.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cloudtask_testkit::stats::{ms, percentile};
use cloudtask_testkit::{TEST_JWT_SECRET, TestApi};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const PASSWORD: &str = "correct horse battery staple";
const TASKS: usize = 1_000;
const LOG_LINES: u64 = 5_000;
const ATTACK: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(30);
/// The legitimate user's pace: 25 requests a second, inside its default budget (3,000 a
/// minute).
const PACE: Duration = Duration::from_millis(40);
const TASKS_QUERY: &str = "{ tasks(first: 50) { edges { node { id name schedule state } } } }";

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do.
        return;
    }
    let seeded = seed().await;
    let data = tempfile::tempdir().expect("a temporary folder");
    let mut server = Server::start(&seeded.database_url, data.path());
    let url = server.url.clone();
    let http = reqwest::Client::new();

    // At rest: a warm-up, then the legitimate user's latency and the resident memory.
    let stop = AtomicBool::new(false);
    legitimate(&http, &url, &seeded.owner, Duration::from_secs(3), &stop).await;
    let idle = server.rss();
    let (rest, floor_rest) = tokio::join!(
        legitimate(&http, &url, &seeded.owner, Duration::from_secs(15), &stop),
        floor(&url, Duration::from_secs(15), &stop),
    );
    let idle = idle.max(server.rss());

    // Under attack.
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let only = std::env::var("CLOUDTASK_BENCH_ONLY").ok();
    let wanted = |attack: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|a| a == attack))
    };
    let mut attacks = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        if wanted("logins") {
            attacks.spawn(login_batches(
                url.clone(),
                [127, 0, 1, i + 1],
                stop.clone(),
                tally.clone(),
            ));
        }
        if wanted("uploads") {
            attacks.spawn(uploads(server.addr.clone(), stop.clone(), tally.clone()));
        }
        if wanted("nesting") {
            attacks.spawn(nesting(
                url.clone(),
                [127, 0, 2, i + 1],
                stop.clone(),
                tally.clone(),
            ));
        }
    }
    for _ in 0..4 {
        if wanted("answers") {
            attacks.spawn(huge_answers(
                url.clone(),
                seeded.viewer.clone(),
                seeded.run.clone(),
                stop.clone(),
                tally.clone(),
            ));
        }
    }
    for _ in 0..50 {
        if !wanted("sockets") {
            break;
        }
        attacks.spawn(subscriptions(
            url.clone(),
            seeded.viewer.clone(),
            seeded.run.clone(),
            stop.clone(),
            tally.clone(),
        ));
    }
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), server.pid());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let measuring = AtomicBool::new(false);
    let (during, floor_during) = tokio::join!(
        legitimate(&http, &url, &seeded.owner, ATTACK, &measuring),
        floor(&url, ATTACK, &measuring),
    );
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    attacks.abort_all();
    while attacks.join_next().await.is_some() {}
    let peak = peak.load(Ordering::Relaxed).max(server.rss());
    let alive = http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());

    tokio::time::sleep(SETTLE).await;
    let after = server.rss();
    let log = server.stop();

    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let (rest_p50, rest_p99) = (ms(percentile(&rest, 0.5)), ms(percentile(&rest, 0.99)));
    let (during_p50, during_p99) = (ms(percentile(&during, 0.5)), ms(percentile(&during, 0.99)));
    println!();
    println!(
        "hostile load on `cloudtask api` (default limits), {}s of attacks",
        ATTACK.as_secs()
    );
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!("| idle RSS | {:.0} MiB | |", mib(idle));
    println!("| peak RSS under attack | {:.0} MiB | |", mib(peak));
    println!(
        "| peak − idle | {:.0} MiB | ≤ 512 MiB: {} |",
        mib(peak.saturating_sub(idle)),
        verdict(peak.saturating_sub(idle) <= 512 << 20)
    );
    println!(
        "| RSS {}s after − idle | {:.0} MiB | ≤ 128 MiB: {} |",
        SETTLE.as_secs(),
        mib(after.saturating_sub(idle)),
        verdict(after.saturating_sub(idle) <= 128 << 20)
    );
    println!(
        "| legitimate tasks(first: 50) at rest p50 / p99 ({} samples) | {rest_p50:.2} / {rest_p99:.2} ms | |",
        rest.len()
    );
    println!(
        "| same under attack p50 / p99 ({} samples) | {during_p50:.2} / {during_p99:.2} ms | |",
        during.len()
    );
    println!(
        "| p99 under attack ÷ p99 at rest | {:.2} | ≤ 5: {} |",
        during_p99 / rest_p99,
        verdict(during_p99 <= 5.0 * rest_p99)
    );
    let floor_ratio =
        percentile(&floor_during, 0.99).as_secs_f64() / percentile(&floor_rest, 0.99).as_secs_f64();
    println!(
        "| floor: /healthz at rest p50 / p99 → under attack p50 / p99 | {:.2} / {:.2} → {:.2} / {:.2} ms | |",
        ms(percentile(&floor_rest, 0.5)),
        ms(percentile(&floor_rest, 0.99)),
        ms(percentile(&floor_during, 0.5)),
        ms(percentile(&floor_during, 0.99)),
    );
    println!("| floor's p99 under attack ÷ at rest | {floor_ratio:.2} | |");
    println!(
        "| tasks' p99 ratio ÷ the floor's | {:.2} | |",
        during_p99 / rest_p99 / floor_ratio
    );
    println!("| answering /healthz after the attacks | {alive} | true |");
    println!(
        "| server log lines (warn and up) | {} | |",
        log.lines().count()
    );
    println!();
    println!("what the attackers got:");
    tally.print();
    println!();
    println!("what the server logged, most frequent first:");
    let mut messages = std::collections::BTreeMap::<String, u64>::new();
    for line in log.lines() {
        // `time LEVEL target: message key=value…`: the level and message.
        let mut words = line.split_whitespace().skip(1);
        let level = words.next().unwrap_or_default();
        let message: String = words
            .skip(1)
            .take_while(|w| !w.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        *messages.entry(format!("{level} {message}")).or_default() += 1;
    }
    let mut messages: Vec<_> = messages.into_iter().collect();
    messages.sort_by_key(|m| std::cmp::Reverse(m.1));
    for (message, times) in messages.iter().take(8) {
        println!("{times:>8}  {message}");
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

struct Seeded {
    database_url: String,
    owner: String,
    viewer: String,
    run: String,
}

/// A tenant with 1,000 tasks, an owner, a VIEWER and a run of 5,000 lines, made through an
/// API in this process (then stopped); tokens are signed with the same secret the server
/// process is given.
async fn seed() -> Seeded {
    let api = TestApi::start().await;
    let setup = api.tenant_with_cluster("hostile", PASSWORD).await;
    let owner = api
        .login(&setup.owner_email, PASSWORD, Some(&setup.tenant_id))
        .await;
    let added = owner
        .run(
            "mutation($e: String!) { addMember(input: {email: $e, role: VIEWER, password: \"correct horse battery staple\"}) { role } }",
            json!({ "e": "viewer@hostile.example" }),
        )
        .await;
    assert_eq!(
        added.data()["addMember"]["role"],
        "VIEWER",
        "{}",
        added.body
    );
    let viewer = api
        .login("viewer@hostile.example", PASSWORD, Some(&setup.tenant_id))
        .await;
    api.seed_tasks(&setup.tenant_id, &setup.cluster_id, TASKS)
        .await;
    let task = owner.run(TASKS_QUERY, json!({})).await;
    let task_id = task.data()["tasks"]["edges"][0]["node"]["id"]
        .as_str()
        .expect("a task")
        .to_owned();
    let run = api
        .run_with_lines(&setup.cluster_id, &task_id, LOG_LINES, 100)
        .await;
    let token = |gql: &cloudtask_testkit::Gql| gql.token.clone().expect("signed in");
    let seeded = Seeded {
        database_url: api.state.config.database_url.clone(),
        owner: token(&owner),
        viewer: token(&viewer),
        run,
    };
    drop(api);
    seeded
}

/// `cloudtask api` as a process of its own, on a free port.
struct Server {
    child: Child,
    url: String,
    addr: String,
    log: std::path::PathBuf,
}

impl Server {
    fn start(database_url: &str, dir: &Path) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join("api.log");
        let child = Command::new(env!("CARGO_BIN_EXE_cloudtask"))
            .arg("api")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CLOUDTASK_DATABASE_URL", database_url)
            .env("CLOUDTASK_JWT_SECRET", TEST_JWT_SECRET)
            .env("CLOUDTASK_LISTEN", &addr)
            .env(
                "CLOUDTASK_ZOOKEEPER",
                "127.0.0.1:2181/cloudtask-hostile-bench",
            )
            .env("CLOUDTASK_LOG_LEVEL", "warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("start `cloudtask api`");
        let url = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the API did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server {
            child,
            url,
            addr,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// Stops the server; what it logged.
    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Resident memory of `pid`, in bytes.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The legitimate user's `tasks(first: 50)`, one at a time at `PACE`, for `time`; each
/// answer's latency (an error counts as an answer too, and is reported).
async fn legitimate(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    time: Duration,
    stop: &AtomicBool,
) -> Vec<Duration> {
    paced("tasks(first: 50)", time, stop, || async {
        let answer = http
            .post(format!("{url}/graphql"))
            .bearer_auth(token)
            .json(&json!({ "query": TASKS_QUERY }))
            .send()
            .await;
        match answer {
            Ok(answer) => answer.json::<Value>().await.is_ok_and(|body| {
                body["data"]["tasks"]["edges"]
                    .as_array()
                    .is_some_and(|e| e.len() == 50)
            }),
            Err(_) => false,
        }
    })
    .await
}

/// The machine's floor beside it: `GET /healthz` (no catalogue, no GraphQL) at the same
/// pace, from a client of its own. What it loses under attack is what the machine's two
/// cores, shared by the attackers, the server and Postgres, take from any answer.
async fn floor(url: &str, time: Duration, stop: &AtomicBool) -> Vec<Duration> {
    let http = reqwest::Client::new();
    paced("/healthz", time, stop, || async {
        let answer = http.get(format!("{url}/healthz")).send().await;
        match answer {
            Ok(answer) => answer.status().is_success() && answer.bytes().await.is_ok(),
            Err(_) => false,
        }
    })
    .await
}

/// `ask` one at a time at `PACE` for `time`; each answer's latency, sorted (a failed
/// answer counts too, and is reported).
async fn paced<F, A>(what: &str, time: Duration, stop: &AtomicBool, mut ask: F) -> Vec<Duration>
where
    F: FnMut() -> A,
    A: std::future::Future<Output = bool>,
{
    let end = Instant::now() + time;
    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut next = tokio::time::Instant::now();
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        next += PACE;
        let start = Instant::now();
        let ok = ask().await;
        latencies.push(start.elapsed());
        if !ok {
            failures += 1;
        }
        tokio::time::sleep_until(next).await;
    }
    if failures > 0 {
        println!("{what}: {failures} failed answers of {}", latencies.len());
    }
    latencies.sort();
    latencies
}

/// What the attackers were answered, by attack and answer.
#[derive(Default)]
struct Tally(std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>);

impl Tally {
    fn count(&self, attack: &str, answer: impl Into<String>) {
        *self
            .0
            .lock()
            .unwrap()
            .entry((attack.to_owned(), answer.into()))
            .or_default() += 1;
    }

    fn print(&self) {
        println!("| attack | answer | times |");
        println!("|---|---|---|");
        for ((attack, answer), times) in self.0.lock().unwrap().iter() {
            println!("| {attack} | {answer} | {times} |");
        }
    }
}

/// The first error code of a GraphQL answer (or of the first answer of a batch), or the
/// HTTP status when there is none.
async fn code_of(answer: reqwest::Result<reqwest::Response>) -> String {
    let Ok(answer) = answer else {
        return "connection error".into();
    };
    let status = answer.status().as_u16();
    let body: Value = answer.json().await.unwrap_or(Value::Null);
    let first = if body.is_array() { &body[0] } else { &body };
    match first["errors"][0]["extensions"]["code"].as_str() {
        Some(code) => code.to_owned(),
        None if first["data"].is_object() => "answered".into(),
        None => format!("HTTP {status}"),
    }
}

fn client_from(address: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(address))
        .build()
        .expect("a client")
}

async fn login_batches(url: String, from: [u8; 4], stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let http = client_from(from);
    let batch: Vec<Value> = (0..10)
        .map(|i| {
            json!({
                "query": "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }",
                "variables": { "e": "owner@hostile.example", "p": format!("guess {i}") },
            })
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let answer = http
            .post(format!("{url}/graphql"))
            .json(&batch)
            .send()
            .await;
        tally.count("anonymous login batches of 10", code_of(answer).await);
    }
}

async fn nesting(url: String, from: [u8; 4], stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let http = client_from(from);
    let deep = format!(
        "{{ tasks(first: {}1{}) {{ edges {{ cursor }} }} }}",
        "[".repeat(3_000),
        "]".repeat(3_000)
    );
    while !stop.load(Ordering::Relaxed) {
        let answer = http
            .post(format!("{url}/graphql"))
            .json(&json!({ "query": deep }))
            .send()
            .await;
        tally.count("anonymous query nested 3,000 deep", code_of(answer).await);
    }
}

/// An anonymous multipart upload announcing 128 MiB, its body sent as fast as the server
/// takes it, until the server answers or closes.
async fn uploads(addr: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    const LENGTH: u64 = 128 << 20;
    let chunk = vec![b'x'; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut tcp) = tokio::net::TcpStream::connect(&addr).await else {
            tally.count("anonymous 128 MiB uploads", "connection error");
            continue;
        };
        let head = format!(
            "POST /graphql HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: {LENGTH}\r\n\r\n\
             --XYZ\r\nContent-Disposition: form-data; name=\"operations\"\r\n\r\n"
        );
        let mut sent = 0u64;
        let mut ok = tcp.write_all(head.as_bytes()).await.is_ok();
        while ok && sent < LENGTH && !stop.load(Ordering::Relaxed) {
            ok = tcp.write_all(&chunk).await.is_ok();
            sent += chunk.len() as u64;
            // The server answers before reading the body: stop once it has.
            let mut peek = [0u8; 16];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(0), tcp.peek(&mut peek)).await
                && n > 0
            {
                break;
            }
        }
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        let status = String::from_utf8_lossy(&answer[..n])
            .lines()
            .next()
            .unwrap_or("closed")
            .to_owned();
        tally.count(
            "anonymous 128 MiB uploads",
            format!(
                "{status} after {} MiB sent",
                (sent >> 20).min(128).div_ceil(16) * 16
            ),
        );
    }
}

/// A VIEWER asks for 40 × 5,000 lines of log text (200,000 lines, ~20 MB of JSON) over and
/// over, 4 at once.
async fn huge_answers(
    url: String,
    token: String,
    run: String,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let http = client_from([127, 0, 3, 1]);
    let query = (0..40)
        .map(|i| format!("r{i}: run(id: \"{run}\") {{ logs(limit: 5000) {{ text }} }}"))
        .collect::<Vec<_>>()
        .join(" ");
    let query = format!("{{ {query} }}");
    while !stop.load(Ordering::Relaxed) {
        let answer = http
            .post(format!("{url}/graphql"))
            .bearer_auth(&token)
            .json(&json!({ "query": query }))
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => {
                let status = answer.status().as_u16();
                match answer.bytes().await {
                    Ok(body) => {
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let code = value["errors"][0]["extensions"]["code"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| format!("HTTP {status}"));
                        format!("{code} ({} MiB answers)", body.len() >> 20)
                    }
                    Err(_) => "cut".into(),
                }
            }
            Err(_) => "connection error".into(),
        };
        tally.count("VIEWER: 40 aliases × logs(limit: 5000)", answer);
    }
}

/// One of the VIEWER's 50 sockets: 100 `runLogs` subscriptions (each replays 5,000
/// lines), never read, held until the attack ends.
async fn subscriptions(
    url: String,
    token: String,
    run: String,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    const ATTACK: &str = "VIEWER: 50 sockets × 100 runLogs";
    let ws = format!("{}/graphql/ws", url.replace("http://", "ws://"));
    let mut request = ws.into_client_request().expect("a WebSocket URL");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await else {
        tally.count(ATTACK, "socket refused");
        return;
    };
    let init = json!({ "type": "connection_init", "payload": { "accessToken": token } });
    if socket
        .send(Message::Text(init.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
        Ok(Some(Ok(Message::Text(text)))) if text.contains("connection_ack") => {
            tally.count(ATTACK, "socket acknowledged");
        }
        Ok(Some(Ok(Message::Close(frame)))) => {
            let code = frame.map_or(0, |f| u16::from(f.code));
            tally.count(ATTACK, format!("socket closed {code}"));
            return;
        }
        _ => {
            tally.count(ATTACK, "no acknowledgement");
            return;
        }
    }
    let mut sent = 0;
    for i in 0..100 {
        let subscribe = json!({
            "id": format!("s{i}"),
            "type": "subscribe",
            "payload": {
                "query": "subscription($r: ID!) { runLogs(runId: $r, fromOffset: 0) { offset text } }",
                "variables": { "r": run },
            },
        });
        if socket
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    tally.count(ATTACK, format!("{sent} subscriptions sent on a socket"));
    // Held open, unread, until the attack ends.
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
