//! Hostile clients, tried as an attacker would: each test sends the hostile request to the
//! real server, expects a clear error code, and checks that nothing changed and that the
//! process still answers.

use std::time::Duration;

use cloudtask_testkit::{Gql, GqlResponse, GqlSocket, Reply, TestApi};
use serde_json::{Value, json};

use crate::support::{World, task_names};

/// Still serving: an anonymous question gets its usual answer.
async fn still_answers(client: &Gql) {
    let answer = client.run("{ me { id } }", json!({})).await;
    assert_eq!(
        answer.code(),
        Some("UNAUTHENTICATED"),
        "the server still answers: {}",
        answer.body
    );
}

fn assert_limit(response: &GqlResponse, limit: &str, what: &str) {
    let body: String = response.body.to_string().chars().take(2_000).collect();
    assert_eq!(response.code(), Some("BAD_USER_INPUT"), "{what}: {body}");
    assert_eq!(
        response.body["errors"][0]["extensions"]["limit"], limit,
        "{what}: the limit is named: {body}"
    );
    assert!(response.body["data"].is_null(), "{what}: no data: {body}");
}

/// Argument values nested deep (lists, input objects) used to overflow a thread's stack
/// in async-graphql's parser and abort the whole process (the API, and in standalone the
/// scheduler and worker with it): its grammar stops itself near the stack's end, but what
/// walks the parsed value afterwards does not. They are refused before parsing, on every
/// transport, at every depth, and the server answers on. (On tokio's worker threads, as
/// the binary serves: without the bounds, 500 levels abort this test's process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_values_nested_deep_are_refused_and_the_server_lives() {
    let world = World::new().await;
    let anonymous = world.api.client();
    let owner = &world.a.owner;
    let tasks_before = task_names(owner).await;
    let mut socket = GqlSocket::connect(&world.api.url, owner.token.as_deref().unwrap()).await;
    for levels in [200, 500, 800, 1_200, 2_000, 3_000] {
        let lists = format!(
            "{{ tasks(first: {}1{}) {{ edges {{ node {{ id }} }} }} }}",
            "[".repeat(levels),
            "]".repeat(levels)
        );
        let objects = format!(
            "{{ tasks(filter: {}1{}) {{ edges {{ node {{ id }} }} }} }}",
            "{a: ".repeat(levels),
            "}".repeat(levels)
        );
        let mutation = format!(
            "mutation {{ createTask(input: {{ clusterId: \"{}\", name: \"deep\", \
             schedule: \"* * * * *\", command: \"true\", env: {}1{} }}) {{ id }} }}",
            world.a.cluster_id,
            "[".repeat(levels),
            "]".repeat(levels)
        );
        for (what, client, query) in [
            ("lists", &anonymous, &lists),
            ("input objects", &anonymous, &objects),
            ("a member's mutation", owner, &mutation),
        ] {
            let answer = client.run(query, json!({})).await;
            assert_limit(
                &answer,
                "query_max_nesting",
                &format!("{what}, {levels} deep"),
            );
            still_answers(&anonymous).await;
        }

        // A batch: every item is refused on its own; none reaches the parser.
        let batch = json!([{ "query": lists }, { "query": objects }]);
        let body: Value = post(&anonymous, batch.to_string())
            .await
            .json()
            .await
            .expect("JSON");
        for item in body.as_array().expect("one answer per item") {
            assert_eq!(
                item["errors"][0]["extensions"]["limit"], "query_max_nesting",
                "{body}"
            );
        }

        // Variables nested as deep: JSON's own depth bound refuses them. (Built as text:
        // a serde_json value this deep would overflow the test's own stack.)
        let deep = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
        let body = format!(
            r#"{{"query":"query($v: Int) {{ tasks(first: $v) {{ edges {{ node {{ id }} }} }} }}","variables":{{"v":{deep}}}}}"#
        );
        assert_eq!(
            post(&anonymous, body).await.status(),
            400,
            "deep variables, {levels} deep"
        );

        // Over the socket too.
        let id = format!("deep-{levels}");
        socket.subscribe(&id, &lists, json!({})).await;
        let errors = match socket.reply(&id, Duration::from_secs(10)).await {
            Reply::Error(errors) => errors,
            Reply::Next(payload) => payload["errors"].clone(),
            Reply::Complete => panic!("expected the socket to refuse the operation"),
        };
        assert_eq!(
            errors[0]["extensions"]["limit"], "query_max_nesting",
            "{errors}"
        );
    }
    still_answers(&anonymous).await;
    assert_eq!(task_names(owner).await, tasks_before, "no task was created");
}

async fn post(client: &Gql, body: String) -> reqwest::Response {
    client
        .http
        .post(format!("{}/graphql", client.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent")
}

const SET_WEBHOOK: &str = "mutation($input: NotificationSettingsInput!) {
    setNotificationSettings(input: $input) { webhookUrl }
}";

/// A webhook is a request the platform makes to an address the tenant chose. Loopback,
/// private, link-local and metadata addresses are refused when the URL is set (written
/// in it, or what its name resolves to now), and nothing is stored.
#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_when_set() {
    let world = World::new().await;
    let owner = &world.a.owner;
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = internal.local_addr().unwrap().port();
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        format!("http://localhost:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        "http://10.0.0.1/hook".to_owned(),
        format!("http://2130706433:{port}/hook"),
        "http://[fd00:ec2::254]/latest/".to_owned(),
        "file:///etc/passwd".to_owned(),
    ] {
        let answer = owner
            .run(
                SET_WEBHOOK,
                json!({ "input": { "notifyEmails": [], "webhookUrl": url,
                    "webhookSecret": "a-webhook-secret-of-some-length" } }),
            )
            .await;
        assert_eq!(
            answer.code(),
            Some("BAD_USER_INPUT"),
            "{url}: {}",
            answer.body
        );
        assert_eq!(
            answer.body["errors"][0]["extensions"]["field"], "webhookUrl",
            "{url}: {}",
            answer.body
        );
    }
    let settings = owner
        .run("{ notificationSettings { webhookUrl } }", json!({}))
        .await;
    assert!(
        settings.data()["notificationSettings"]["webhookUrl"].is_null(),
        "nothing was stored: {}",
        settings.body
    );
    // A public address is accepted as before.
    let answer = owner
        .run(
            SET_WEBHOOK,
            json!({ "input": { "notifyEmails": [], "webhookUrl": "https://93.184.216.34/hook",
                "webhookSecret": "a-webhook-secret-of-some-length" } }),
        )
        .await;
    assert_eq!(
        answer.data()["setNotificationSettings"]["webhookUrl"],
        "https://93.184.216.34/hook"
    );
    still_answers(&world.api.client()).await;
}

/// A URL that passed when it was set can reach an internal address later (its name now
/// resolves elsewhere, or it was stored before the rule): the sender checks again at
/// connect time and never POSTs there; the delivery stays unsent with its attempts
/// counted.
#[tokio::test]
async fn a_stored_webhook_that_now_points_inside_is_never_posted() {
    use crate::harness::Cluster;
    use crate::notifications::{failing_task, outbox, tenant_id, wait_outbox, webhook_receiver};
    use sea_orm::ConnectionTrait;

    let (url, got) = webhook_receiver().await;
    let mut cluster = Cluster::start().await;
    cluster.start_worker("w1");
    let tenant = tenant_id(&cluster).await;
    cluster
        .api
        .catalogue
        .connection()
        .execute_unprepared(&format!(
            "UPDATE tenants SET webhook_url = '{url}', \
             webhook_secret = 'a-webhook-secret-of-some-length'"
        ))
        .await
        .unwrap();
    let task = failing_task(&cluster, "hooked").await;
    cluster.run_now(&task).await;
    wait_outbox(&cluster, tenant, "two refused attempts", |rows| {
        rows.iter()
            .any(|(_, channel, attempts, sent)| channel == "webhook" && *attempts >= 2 && !sent)
    })
    .await;
    assert!(
        got.lock().unwrap().is_empty(),
        "nothing reached the internal receiver: {:?}",
        outbox(&cluster, tenant).await
    );
}

/// Reads from `tcp` until the server closes it, or until what it sent satisfies `done`,
/// within `within` (panicking past it); what it sent.
async fn read_until(
    tcp: &mut tokio::net::TcpStream,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    got.extend_from_slice(&buffer[..n]);
                    if done(&String::from_utf8_lossy(&got)) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed within {within:?}; it sent {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// What the server sent before closing the connection.
async fn until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> String {
    read_until(tcp, within, |_| false).await
}

/// One whole HTTP answer (head and a JSON body), without waiting for the close.
async fn read_answer(tcp: &mut tokio::net::TcpStream, within: Duration) -> String {
    read_until(tcp, within, |text| {
        text.contains("\r\n\r\n") && text.trim_end().ends_with('}')
    })
    .await
}

/// Shutting the API down lets a request in flight finish: its body, sent after the
/// shutdown began, is read and answered, and the server then ends. (Each connection's task
/// used to poll its finished shutdown signal again and panic, dropping the request.)
#[tokio::test]
async fn a_request_in_flight_is_answered_when_the_api_shuts_down() {
    use tokio::io::AsyncWriteExt;
    let api = cloudtask_testkit::TestApi::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(cloudtask_api::run(
        api.state.clone(),
        listener,
        shutdown.clone(),
    ));
    let within = Duration::from_secs(10);
    let body = r#"{"query":"{ __typename }"}"#;
    let mut tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    tcp.write_all(
        format!(
            "POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The handler is reading the body: the request is in flight.
    let go_on = read_until(&mut tcp, within, |t| t.contains("\r\n\r\n")).await;
    assert!(go_on.starts_with("HTTP/1.1 100"), "{go_on}");

    shutdown.cancel();
    tcp.write_all(body.as_bytes()).await.unwrap();
    let answer = until_closed(&mut tcp, within).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""__typename":"Query""#), "{answer}");
    tokio::time::timeout(within, server)
        .await
        .expect("the server ends once its connections have")
        .expect("the server task ends without a panic")
        .expect("the server ends cleanly");
}

/// Slow clients cannot hold connections: a request head sent halfway, a body that stops,
/// and a kept-alive connection that goes quiet are all closed after their timeouts.
#[tokio::test]
async fn half_sent_requests_and_idle_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let api = cloudtask_testkit::TestApi::start_with(|c| {
        c.http_header_timeout_secs = 1;
        c.http_body_idle_timeout_secs = 1;
    })
    .await;
    let address = api.url.trim_start_matches("http://").to_owned();
    let within = Duration::from_secs(10);

    let mut head = tokio::net::TcpStream::connect(&address).await.unwrap();
    head.write_all(b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        .await
        .unwrap();
    until_closed(&mut head, within).await;

    let mut body = tokio::net::TcpStream::connect(&address).await.unwrap();
    body.write_all(
        b"POST /graphql HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"query\":",
    )
    .await
    .unwrap();
    let answer = until_closed(&mut body, within).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("BAD_USER_INPUT"), "{answer}");

    let mut idle = tokio::net::TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut idle, within).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    still_answers(&api.client()).await;
}

/// Every answer carries nosniff, no framing, no referrer and a Content-Security-Policy:
/// GraphQL's JSON, GraphiQL (its own policy), health, errors.
#[tokio::test]
async fn every_answer_carries_security_headers() {
    let api = cloudtask_testkit::TestApi::start().await;
    let http = reqwest::Client::new();
    let answers = [
        (
            "POST /graphql",
            http.post(format!("{}/graphql", api.url))
                .json(&json!({ "query": "{ me { id } }" })),
        ),
        ("GraphiQL", http.get(format!("{}/graphql", api.url))),
        ("/healthz", http.get(format!("{}/healthz", api.url))),
        (
            "a missing package",
            http.get(format!("{}/packages/{}", api.url, "0".repeat(64))),
        ),
        ("the console", http.get(format!("{}/", api.url))),
    ];
    for (what, request) in answers {
        let answer = request.send().await.unwrap();
        let headers = answer.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{what}");
        assert_eq!(headers["x-frame-options"], "DENY", "{what}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{what}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(
            policy.contains("frame-ancestors 'none'"),
            "{what}: {policy}"
        );
        if what == "POST /graphql" || what == "/healthz" {
            assert!(policy.starts_with("default-src 'none'"), "{what}: {policy}");
        }
    }
}

/// Anonymous callers may only sign in: no introspection, no "Did you mean…" that spells
/// out the schema. A signed-in member gets both (GraphiQL works once a token is set).
#[tokio::test]
async fn anonymous_callers_get_no_introspection_and_no_suggestions() {
    let world = World::new().await;
    let anonymous = world.api.client();
    let introspection = "{ __schema { types { name } } }";
    let typo = "{ tsks(first: 1) { edges { node { id } } } }";

    // async-graphql answers a disabled introspection with null, not an error.
    let answer = anonymous.run(introspection, json!({})).await;
    assert!(
        answer.body["data"].is_null() || answer.body["data"]["__schema"].is_null(),
        "{}",
        answer.body
    );
    assert!(!answer.body.to_string().contains("Task"), "{}", answer.body);
    let answer = anonymous
        .run("{ __type(name: \"Task\") { fields { name } } }", json!({}))
        .await;
    assert!(
        answer.body["data"].is_null() || answer.body["data"]["__type"].is_null(),
        "{}",
        answer.body
    );
    let answer = anonymous.run(typo, json!({})).await;
    assert_eq!(answer.code(), Some("BAD_USER_INPUT"), "{}", answer.body);
    assert!(
        !answer.message().contains("Did you mean"),
        "{}",
        answer.body
    );
    assert!(
        !answer.body.to_string().contains("tasks"),
        "{}",
        answer.body
    );
    // A refused token is anonymous too.
    let forged = anonymous.clone().with_token("not-a-token");
    let answer = forged.run(introspection, json!({})).await;
    assert!(
        answer.body["data"].is_null() || answer.body["data"]["__schema"].is_null(),
        "{}",
        answer.body
    );

    let member = &world.a.owner;
    let answer = member.run(introspection, json!({})).await;
    assert!(
        answer.data()["__schema"]["types"]
            .as_array()
            .is_some_and(|t| t.len() > 10),
        "{}",
        answer.body
    );
    let answer = member.run(typo, json!({})).await;
    assert!(answer.message().contains("Did you mean"), "{}", answer.body);
    // Signing in still works anonymously.
    let login = anonymous
        .run(
            "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }",
            json!({ "e": world.a.owner_email, "p": crate::support::PASSWORD }),
        )
        .await;
    assert!(
        login.data()["login"]["accessToken"].is_string(),
        "{}",
        login.body
    );
}

/// A run of the world's task with `lines` log lines of `width` characters each.
async fn run_with_lines(world: &World, lines: u64, width: usize) -> String {
    world
        .api
        .run_with_lines(&world.a.cluster_id, &world.a.task_id, lines, width)
        .await
}

/// 600 aliases of a run's logs (24 KB, any member) asked for 3 million lines and once
/// produced a 1.09 GB answer: lists now cost their requested size, and such a query is
/// refused before anything runs (the text bounds refuse 600 plain aliases already; 300
/// with a fragment fit them).
#[tokio::test]
async fn a_small_query_for_a_huge_answer_is_refused_before_it_runs() {
    let world = World::new().await;
    let run = run_with_lines(&world, 10, 100).await;
    // The attack as it came: 600 aliases of 5,000 lines each (now over the text bounds).
    let aliases = (0..600)
        .map(|i| format!("r{i}: run(id: $run) {{ ...L }}"))
        .collect::<Vec<_>>()
        .join(" ");
    let query = format!(
        "query($run: ID!) {{ {aliases} }} fragment L on Run {{ logs(limit: 5000) {{ text }} }}"
    );
    let started = std::time::Instant::now();
    let answer = world.a.owner.run(&query, json!({ "run": run })).await;
    assert_eq!(answer.code(), Some("BAD_USER_INPUT"), "{}", answer.body);
    assert!(answer.body["data"].is_null(), "{}", answer.body);
    // Nested pages in a few bytes: 200 tasks × 200 runs × 5,000 lines.
    let nested = "{ tasks(first: 200) { edges { node { runs(first: 200) { edges { node {
        logs(limit: 5000) { text } } } } } } } }";
    let answer = world.a.owner.run(nested, json!({})).await;
    assert_limit(&answer, "query_max_complexity", "nested pages of logs");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    // Control: the same run's logs, asked once, are served.
    let one = world
        .a
        .owner
        .run(
            &format!("{{ run(id: \"{run}\") {{ logs(limit: 5000) {{ text }} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(one.data()["run"]["logs"].as_array().unwrap().len(), 10);
    still_answers(&world.api.client()).await;
}

/// Within the cost budget, an answer can still be large (long lines): its text is counted
/// as it is resolved and stops at `query_max_answer_bytes`, with a handful of errors, not
/// one per field.
#[tokio::test]
async fn an_answer_stops_at_its_size_limit_with_few_errors() {
    let world = World::new().await;
    let run = run_with_lines(&world, 200, 10_000).await; // 2 MB of text
    let aliases = (0..20)
        .map(|i| format!("r{i}: run(id: \"{run}\") {{ logs {{ text }} }}"))
        .collect::<Vec<_>>()
        .join(" ");
    // 20 × 2 MB = 40 MB asked; the limit is 16 MiB.
    let answer = world
        .a
        .owner
        .run(&format!("{{ {aliases} }}"), json!({}))
        .await;
    let errors = answer.body["errors"].as_array().expect("errors");
    assert!(
        errors.len() <= 11,
        "at most 10 errors and a summary: {}",
        errors.len()
    );
    assert_eq!(
        errors[0]["extensions"]["limit"], "query_max_answer_bytes",
        "{}",
        errors[0]
    );
    let size = answer.body.to_string().len();
    assert!(
        size < 18 << 20,
        "the answer stopped near the limit: {size} bytes"
    );

    // The same query over a socket stops at the same limit.
    let token = world.a.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect(&world.api.url, &token).await;
    socket
        .subscribe("big", &format!("{{ {aliases} }}"), json!({}))
        .await;
    match socket.reply("big", Duration::from_secs(60)).await {
        Reply::Next(payload) => {
            let errors = payload["errors"].as_array().expect("errors");
            assert!(errors.len() <= 11, "few errors: {}", errors.len());
            assert_eq!(errors[0]["extensions"]["limit"], "query_max_answer_bytes");
            let size = payload.to_string().len();
            assert!(size < 18 << 20, "stopped near the limit: {size} bytes");
        }
        other => panic!("expected an answer, got {other:?}"),
    }
    still_answers(&world.api.client()).await;
}

/// A socket message is held to what an HTTP request may carry (2 MiB): a larger one ends
/// the connection before it is read whole. Sockets took messages of up to 64 MiB, each
/// held in memory until parsed; this 3 MiB `connection_init` was acknowledged.
#[tokio::test]
async fn a_socket_message_larger_than_a_request_ends_the_connection() {
    let world = World::new().await;
    let token = world.a.owner.token.clone().unwrap();
    let mut socket = GqlSocket::open(&world.api.url).await;
    socket
        .send(json!({
            "type": "connection_init",
            "payload": { "accessToken": token, "padding": "x".repeat(3 << 20) },
        }))
        .await;
    let said = socket.until_gone(Duration::from_secs(10)).await;
    assert!(said.is_empty(), "nothing acknowledged: {said:?}");
    // A message within the limit is served as before.
    let mut socket = GqlSocket::open(&world.api.url).await;
    socket
        .send(json!({
            "type": "connection_init",
            "payload": { "accessToken": token, "padding": "x".repeat(1 << 20) },
        }))
        .await;
    let ack = socket.message(Duration::from_secs(10)).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    still_answers(&world.api.client()).await;
}

/// The events of a subscription are answers of their own: the size limit holds for each,
/// not for all of them together. A followed log was cut with `query_max_answer_bytes`
/// once its lines together passed 16 MiB (about 350,000 short lines).
#[tokio::test]
async fn a_followed_log_is_not_cut_when_its_lines_together_pass_the_answer_limit() {
    let world = World::with_config(|c| c.query_max_answer_bytes = 16 << 10).await;
    // 100 lines of 1,000 characters: six times the limit together, each far below it.
    let run = run_with_lines(&world, 100, 1_000).await;
    let token = world.a.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect(&world.api.url, &token).await;
    socket
        .subscribe(
            "follow",
            "subscription($r: ID!) { runLogs(runId: $r) { offset text } }",
            json!({ "r": run }),
        )
        .await;
    for offset in 0..100 {
        match socket.reply("follow", Duration::from_secs(20)).await {
            Reply::Next(payload) => {
                assert!(payload.get("errors").is_none(), "line {offset}: {payload}");
                assert_eq!(payload["data"]["runLogs"]["offset"], offset, "{payload}");
            }
            other => panic!("line {offset}: expected it, got {other:?}"),
        }
    }
    // One answer holding them all is still held to the limit.
    let all = world
        .a
        .owner
        .run(
            &format!("{{ run(id: \"{run}\") {{ logs(limit: 100) {{ text }} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(all.expect_code(), "BAD_USER_INPUT", "{}", all.body);
    assert_eq!(
        all.body["errors"][0]["extensions"]["limit"],
        "query_max_answer_bytes"
    );
}

/// Batches are bounded in count (10,000 operations once starved the pool) and share one
/// cost budget (each item used to get a fresh one).
#[tokio::test]
async fn batches_are_bounded_and_share_one_budget() {
    let world = World::new().await;
    let anonymous = world.api.client();
    let huge: Vec<Value> = (0..10_000)
        .map(|_| json!({ "query": "{ me { id } }" }))
        .collect();
    let started = std::time::Instant::now();
    let answer = post(&anonymous, Value::Array(huge).to_string()).await;
    assert_eq!(answer.status(), 400);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );

    // Each item costs 30 × 5,001 (+1) ≈ 150,000 of the budget of 1,000,000: alone, each
    // fits; ten of them in one batch share the budget, and the seventh is refused.
    let run = run_with_lines(&world, 1, 10).await;
    let item = (0..30)
        .map(|i| format!("r{i}: run(id: \"{run}\") {{ logs(limit: 5000) {{ text }} }}"))
        .collect::<Vec<_>>()
        .join(" ");
    let item = format!("{{ {item} }}");
    let batch: Vec<Value> = (0..10).map(|_| json!({ "query": item })).collect();
    let answer = world
        .a
        .owner
        .http
        .post(format!("{}/graphql", world.api.url))
        .bearer_auth(world.a.owner.token.as_deref().unwrap())
        .json(&batch)
        .send()
        .await
        .unwrap();
    let body: Value = answer.json().await.unwrap();
    let answers = body.as_array().expect("one answer per item");
    let refused = answers
        .iter()
        .filter(|a| a["errors"][0]["extensions"]["limit"] == "query_max_complexity")
        .count();
    assert!(
        refused >= 1,
        "the batch ran out of its shared budget: {body}"
    );
    assert!(
        answers[0]["errors"].is_null(),
        "the first items ran: {}",
        answers[0]
    );
}

/// The head of a multipart request announcing `length` bytes of body, and its first bytes.
fn upload_head(host: &str, token: Option<&str>, length: u64) -> Vec<u8> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /graphql HTTP/1.1\r\nHost: {host}\r\n{auth}\
         Content-Type: multipart/form-data; boundary=XYZ\r\nContent-Length: {length}\r\n\r\n\
         --XYZ\r\nContent-Disposition: form-data; name=\"operations\"\r\n\r\n"
    )
    .into_bytes()
}

/// Uploads used to be read whole into memory before the token was looked at: four
/// anonymous 128 MiB bodies took 1.2 GB. An anonymous upload is now answered before its
/// body is read, and a member's uploads are limited in number at once.
#[tokio::test]
async fn uploads_are_read_only_for_members_and_only_a_few_at_once() {
    use tokio::io::AsyncWriteExt;
    let world = World::new().await;
    let address = world.api.url.trim_start_matches("http://").to_owned();
    let within = Duration::from_secs(5);

    // Anonymous: 128 MiB announced, a few bytes sent, the answer comes at once.
    let mut anonymous = tokio::net::TcpStream::connect(&address).await.unwrap();
    anonymous
        .write_all(&upload_head(&address, None, 128 << 20))
        .await
        .unwrap();
    let answer = read_answer(&mut anonymous, within).await;
    assert!(answer.contains("UNAUTHENTICATED"), "{answer}");

    // A member: the uploads in flight (4) hold their slots while their bodies come in
    // slowly; the next one is refused at once.
    let token = world.a.owner.token.clone().unwrap();
    let mut slow = Vec::new();
    for _ in 0..world.api.state.config.max_uploads_in_flight {
        let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        tcp.write_all(&upload_head(&address, Some(&token), 64 << 20))
            .await
            .unwrap();
        slow.push(tcp);
    }
    // The slots are taken once the server has read those heads: wait until a fifth is
    // refused (bounded).
    let deadline = tokio::time::Instant::now() + within;
    let refused = loop {
        let mut tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        tcp.write_all(&upload_head(&address, Some(&token), 64 << 20))
            .await
            .unwrap();
        let answer = read_answer(&mut tcp, within).await;
        if answer.contains("RATE_LIMITED") || tokio::time::Instant::now() > deadline {
            break answer;
        }
    };
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");

    // The slow uploads go away; their slots come back and a real upload works.
    drop(slow);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let uploaded = world
            .a
            .owner
            .upload(
                "mutation($id: ID!, $file: Upload!) { uploadPackage(taskId: $id, file: $file) { id } }",
                json!({ "id": world.a.task_id, "file": null }),
                vec![("variables.file", "run.sh", b"#!/bin/sh\necho hi\n".to_vec())],
            )
            .await;
        if uploaded.code() != Some("RATE_LIMITED") {
            // Read and judged by the resolver (it is no archive).
            assert_eq!(
                uploaded.body["errors"][0]["extensions"]["field"], "file",
                "{}",
                uploaded.body
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_answers(&world.api.client()).await;
}

/// Aliases and directives are bounded as written (10,000 duplicate directives once made a
/// 1.2 MB error answer; now the token bound refuses those, and a few hundred are refused
/// by count with one short error).
#[tokio::test]
async fn aliases_and_directives_are_bounded() {
    let api = cloudtask_testkit::TestApi::start().await;
    let anonymous = api.client();
    let aliases = (0..60)
        .map(|i| format!("a{i}: me {{ id }}"))
        .collect::<Vec<_>>()
        .join(" ");
    let answer = anonymous.run(&format!("{{ {aliases} }}"), json!({})).await;
    assert_limit(&answer, "query_max_aliases", "60 aliases");
    let directives = "@include(if: true) ".repeat(100);
    let answer = anonymous
        .run(&format!("{{ me {directives} {{ id }} }}"), json!({}))
        .await;
    assert_limit(&answer, "query_max_directives", "100 directives");
    assert!(answer.body.to_string().len() < 1_000, "{}", answer.body);
    let directives = "@include(if: true) ".repeat(10_000);
    let answer = anonymous
        .run(&format!("{{ me {directives} {{ id }} }}"), json!({}))
        .await;
    assert_eq!(answer.code(), Some("BAD_USER_INPUT"));
    assert!(answer.body.to_string().len() < 1_000, "a short answer");
    still_answers(&anonymous).await;
}

const LOGIN: &str =
    "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { accessToken } }";
const VICTIM: &str = "victim@example.com";

/// A login sent from the loopback address `from` (the TCP peer the server sees), with an
/// `X-Forwarded-For` header when given.
async fn login_from(
    api_url: &str,
    from: [u8; 4],
    forwarded_for: Option<&str>,
    email: &str,
    password: &str,
) -> GqlResponse {
    let http = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap();
    let mut request = http
        .post(format!("{api_url}/graphql"))
        .json(&json!({ "query": LOGIN, "variables": { "e": email, "p": password } }));
    if let Some(forwarded_for) = forwarded_for {
        request = request.header("x-forwarded-for", forwarded_for);
    }
    let answer = request.send().await.expect("sent");
    GqlResponse {
        status: answer.status().as_u16(),
        body: answer.json().await.expect("JSON"),
    }
}

/// How many of `answers` failed with `code`; each RATE_LIMITED one must say when to retry,
/// and none may carry a token.
fn count_codes(answers: &[Value], code: &str) -> usize {
    for answer in answers {
        assert!(answer["data"]["login"].is_null(), "{answer}");
        if answer["errors"][0]["extensions"]["code"] == "RATE_LIMITED" {
            let retry = answer["errors"][0]["extensions"]["retryAfterSeconds"].as_u64();
            assert!(retry.is_some_and(|s| s >= 1), "{answer}");
        }
    }
    answers
        .iter()
        .filter(|a| a["errors"][0]["extensions"]["code"] == code)
        .count()
}

fn assert_code(answer: &GqlResponse, code: &str, what: &str) {
    assert_eq!(answer.code(), Some(code), "{what}: {}", answer.body);
}

/// A JSON batch of `login` operations with wrong passwords for one account, anonymous (a
/// batch of 200 used to check all of them, ~19 MiB of argon2 each; batches now hold at
/// most `query_max_batch`, 10): attempts are counted before any hashing, so the
/// address's budget (`login_max_attempts`, 5) is checked and the rest are RATE_LIMITED. The account is not locked: its owner, from another address, signs in.
#[tokio::test]
async fn a_batch_of_logins_gets_no_more_checks_than_the_address_budget() {
    let api = TestApi::start().await;
    api.create_user(VICTIM, crate::support::PASSWORD, false)
        .await;
    let batch: Vec<Value> = (0..10)
        .map(|i| json!({ "query": LOGIN, "variables": { "e": VICTIM, "p": format!("guess {i}") } }))
        .collect();
    let answers: Value = post(&api.client(), Value::Array(batch).to_string())
        .await
        .json()
        .await
        .expect("JSON");
    let answers = answers.as_array().expect("one answer per operation");
    assert_eq!(answers.len(), 10);
    assert_eq!(count_codes(answers, "UNAUTHENTICATED"), 5, "{answers:?}");
    assert_eq!(count_codes(answers, "RATE_LIMITED"), 5, "{answers:?}");

    still_answers(&api.client()).await;
    let same_address = login_from(
        &api.url,
        [127, 0, 0, 1],
        None,
        VICTIM,
        crate::support::PASSWORD,
    );
    assert_code(
        &same_address.await,
        "RATE_LIMITED",
        "the same address, right password",
    );
    let owner = login_from(
        &api.url,
        [127, 0, 0, 3],
        None,
        VICTIM,
        crate::support::PASSWORD,
    )
    .await;
    assert!(
        owner.data()["login"]["accessToken"].is_string(),
        "the owner from another address: {}",
        owner.body
    );
}

/// 40 wrong logins in parallel (they used to pass the check together and be hashed
/// together): no more than the address's budget are checked.
#[tokio::test]
async fn parallel_logins_get_no_more_checks_than_the_address_budget() {
    let api = TestApi::start().await;
    api.create_user(VICTIM, crate::support::PASSWORD, false)
        .await;
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let client = api.client();
        attempts.spawn(async move {
            client
                .run(LOGIN, json!({ "e": VICTIM, "p": format!("guess {i}") }))
                .await
                .body
        });
    }
    let answers = attempts.join_all().await;
    assert_eq!(count_codes(&answers, "UNAUTHENTICATED"), 5, "{answers:?}");
    assert_eq!(count_codes(&answers, "RATE_LIMITED"), 35, "{answers:?}");
    still_answers(&api.client()).await;
}

/// Right passwords in parallel, from addresses with budget to spare: each check holds ~19
/// MiB of argon2, so only `password_hash_concurrency` run at once and
/// `password_hash_queue` more wait; the rest are refused at once (RATE_LIMITED with when to
/// retry), never queued without bound. Without the bound all 60 would be checked together
/// (~1.1 GiB).
#[tokio::test]
async fn password_checks_past_the_hashing_queue_are_refused_at_once() {
    let api = TestApi::start_with(|c| {
        c.login_max_attempts = 1_000;
        c.rate_anonymous_requests_per_minute = 1_000_000;
        c.password_hash_concurrency = 1;
        c.password_hash_queue = 2;
    })
    .await;
    api.create_user(VICTIM, crate::support::PASSWORD, false)
        .await;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(60));
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let client = api.client();
        let start = start.clone();
        attempts.spawn(async move {
            start.wait().await;
            client
                .run(LOGIN, json!({ "e": VICTIM, "p": crate::support::PASSWORD }))
                .await
                .body
        });
    }
    let answers = attempts.join_all().await;
    let signed_in = answers
        .iter()
        .filter(|a| a["data"]["login"]["accessToken"].is_string())
        .count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|a| a["errors"][0]["extensions"]["code"] == "RATE_LIMITED")
        .collect();
    assert_eq!(signed_in + refused.len(), 60, "{answers:?}");
    assert!(signed_in >= 3, "the first callers are checked: {answers:?}");
    assert!(
        refused.len() >= 30,
        "most of 60 simultaneous checks are refused, not queued: {signed_in} signed in"
    );
    for answer in refused {
        let retry = answer["errors"][0]["extensions"]["retryAfterSeconds"].as_u64();
        assert!(retry.is_some_and(|s| s >= 1), "{answer}");
    }
    // Once the checks in flight end, the next login is served.
    let later = login_from(
        &api.url,
        [127, 0, 0, 1],
        None,
        VICTIM,
        crate::support::PASSWORD,
    )
    .await;
    assert!(
        later.data()["login"]["accessToken"].is_string(),
        "{}",
        later.body
    );
}

/// Strangers behind the load balancer fail on the owner's account from many addresses
/// (five would have locked it for everyone before): each stranger's own address runs out,
/// and the account only slows down, so the owner, from their own address, signs in with
/// the right password within the longest delay (`login_account_max_delay_secs`).
#[tokio::test]
async fn strangers_failing_from_many_addresses_do_not_lock_the_owner_out() {
    const PROXY: [u8; 4] = [127, 0, 0, 2];
    let api = TestApi::start_with(|c| {
        c.trusted_proxies = "127.0.0.2".into();
        c.login_max_attempts = 3;
        c.login_account_max_delay_secs = 2;
    })
    .await;
    api.create_user(VICTIM, crate::support::PASSWORD, false)
        .await;
    let strangers: Vec<String> = (1..=5).map(|i| format!("198.51.100.{i}")).collect();
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..15 {
        let stranger = strangers[i % strangers.len()].clone();
        let api_url = api.url.clone();
        attempts.spawn(async move {
            login_from(&api_url, PROXY, Some(&stranger), VICTIM, "wrong password").await
        });
    }
    for answer in attempts.join_all().await {
        assert_code(&answer, "UNAUTHENTICATED", "a stranger within its budget");
    }
    for stranger in &strangers {
        let answer = login_from(&api.url, PROXY, Some(stranger), VICTIM, "wrong password").await;
        assert_code(&answer, "RATE_LIMITED", "a stranger past its budget");
    }

    let started = std::time::Instant::now();
    let owner = login_from(
        &api.url,
        PROXY,
        Some("203.0.113.7"),
        VICTIM,
        crate::support::PASSWORD,
    )
    .await;
    let took = started.elapsed();
    assert!(
        owner.data()["login"]["accessToken"].is_string(),
        "the owner signs in: {}",
        owner.body
    );
    assert!(
        took >= Duration::from_millis(1_900),
        "slowed down: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "within the bound: {took:?}");
    still_answers(&api.client()).await;
}

/// `X-Forwarded-For` counts only from a trusted proxy (127.0.0.2 here), and only its
/// right-most untrusted entry: a client that writes the header itself, directly or through
/// the proxy, keeps the budget of the address it really has.
#[tokio::test]
async fn a_forged_forwarded_for_does_not_dodge_the_address_budget() {
    const DIRECT: [u8; 4] = [127, 0, 0, 1];
    const PROXY: [u8; 4] = [127, 0, 0, 2];
    let api = TestApi::start_with(|c| {
        c.trusted_proxies = "127.0.0.2".into();
        c.login_max_attempts = 3;
    })
    .await;
    // A fresh account each time, so no account slow-down is involved.
    let mut n = 0;
    let mut attempt = |from: [u8; 4], forwarded_for: String| {
        n += 1;
        let (url, email) = (api.url.clone(), format!("nobody{n}@example.com"));
        async move { login_from(&url, from, Some(&forwarded_for), &email, "wrong password").await }
    };

    // An untrusted peer names a new address each time: ignored, its own runs out.
    for i in 1..=3 {
        let answer = attempt(DIRECT, format!("198.51.100.{i}")).await;
        assert_code(&answer, "UNAUTHENTICATED", "direct, within the budget");
    }
    let answer = attempt(DIRECT, "198.51.100.4".into()).await;
    assert_code(&answer, "RATE_LIMITED", "direct, a forged header");

    // Behind the proxy, the client is what the proxy appended, whatever it wrote before:
    // 198.51.100.1 (named in the forgeries above) still has its whole budget.
    for i in 1..=3 {
        let answer = attempt(PROXY, format!("203.0.113.{i}, 198.51.100.1")).await;
        assert_code(
            &answer,
            "UNAUTHENTICATED",
            "a proxied client within its budget",
        );
    }
    let answer = attempt(PROXY, "203.0.113.9, 198.51.100.1".into()).await;
    assert_code(
        &answer,
        "RATE_LIMITED",
        "a proxied client, a forged first entry",
    );
    // Another client behind the same proxy has its own budget.
    let answer = attempt(PROXY, "198.51.100.2".into()).await;
    assert_code(
        &answer,
        "UNAUTHENTICATED",
        "another client behind the proxy",
    );
    still_answers(&api.client()).await;
}

/// Common and trivial passwords (and the email itself) are refused as new passwords, on
/// `createTenant` and `addMember`, with BAD_USER_INPUT naming the field and zxcvbn's
/// reason; nothing is created.
#[tokio::test]
async fn common_and_trivial_new_passwords_are_refused() {
    let world = World::new().await;
    let tenants = || async {
        world
            .admin
            .run("{ tenants { name } }", json!({}))
            .await
            .data()["tenants"]
            .clone()
    };
    let members = || async {
        world
            .a
            .owner
            .run("{ members { user { email } } }", json!({}))
            .await
            .data()["members"]
            .clone()
    };
    let (tenants_before, members_before) = (tenants().await, members().await);
    let new_owner = "owner@gamma.example";
    let new_member = "viewer@alpha.example";
    let create_tenant = |password: &str| {
        world.admin.run(
            "mutation($input: CreateTenantInput!) { createTenant(input: $input) { id } }",
            json!({ "input": { "name": "gamma", "ownerEmail": new_owner, "ownerPassword": password } }),
        )
    };
    let add_member = |password: &str| {
        world.a.owner.run(
            "mutation($input: AddMemberInput!) { addMember(input: $input) { role } }",
            json!({ "input": { "email": new_member, "role": "VIEWER", "password": password } }),
        )
    };
    let mut refusals = Vec::new();
    for (weak, reason) in [
        ("password", "common password"),
        ("12345678", "common password"),
        ("        ", "Repeats"),
    ] {
        refusals.push((create_tenant(weak).await, "ownerPassword", weak, reason));
        refusals.push((add_member(weak).await, "password", weak, reason));
    }
    refusals.push((
        create_tenant(new_owner).await,
        "ownerPassword",
        new_owner,
        "email",
    ));
    refusals.push((
        add_member(new_member).await,
        "password",
        new_member,
        "email",
    ));
    for (answer, field, weak, reason) in &refusals {
        assert_eq!(
            answer.code(),
            Some("BAD_USER_INPUT"),
            "{weak:?}: {}",
            answer.body
        );
        assert_eq!(
            answer.body["errors"][0]["extensions"]["field"], *field,
            "{weak:?}: {}",
            answer.body
        );
        assert!(
            answer.message().contains(reason),
            "{weak:?}: {}",
            answer.body
        );
    }
    assert_eq!(tenants().await, tenants_before, "no tenant was created");
    assert_eq!(members().await, members_before, "no member was added");
    still_answers(&world.api.client()).await;
}

/// A socket that never sends `connection_init` is closed with 4408 once
/// `ws_init_timeout_secs` has passed, on both protocols; one that signed in stays.
#[tokio::test]
async fn sockets_that_never_say_connection_init_are_closed_with_4408() {
    let api = cloudtask_testkit::TestApi::start_with(|c| c.ws_init_timeout_secs = 1).await;
    let tenant = api
        .tenant_with_cluster("alpha", crate::support::PASSWORD)
        .await;
    let opened = tokio::time::Instant::now();
    let mut signed_in = GqlSocket::connect(&api.url, tenant.owner.token.as_deref().unwrap()).await;
    for protocol in ["graphql-transport-ws", "graphql-ws"] {
        let mut silent = GqlSocket::open_with_protocol(&api.url, protocol).await;
        let closed = silent.until_close(Duration::from_secs(10)).await;
        assert_eq!(closed.code, 4408, "{protocol}: {closed:?}");
    }
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "not before the timeout"
    );
    signed_in
        .subscribe("me", "{ me { email } }", json!({}))
        .await;
    match signed_in.reply("me", Duration::from_secs(10)).await {
        Reply::Next(me) => assert!(me["data"]["me"]["email"].is_string(), "{me}"),
        other => panic!("the signed-in socket still answers: {other:?}"),
    }
    still_answers(&api.client()).await;
}

const WORKER_EVENTS: &str = "subscription { workerEvents { worker kind } }";

fn assert_rate_limited(payload: &Value) {
    let error = &payload["payload"]["errors"][0];
    assert_eq!(error["extensions"]["code"], "RATE_LIMITED", "{payload}");
    assert_eq!(
        error["extensions"]["limit"], "ws_max_subscriptions",
        "{payload}"
    );
}

/// At most `ws_max_subscriptions` operations at once on a socket: the one over it is
/// answered RATE_LIMITED and the socket stays (a freed place is taken again); a flood of
/// 5,000 is refused one by one. At most `ws_max_sockets_per_user` sockets per user: the
/// next `connection_init` is closed with 4429 until one of them goes.
#[tokio::test]
async fn subscriptions_per_socket_and_sockets_per_user_are_limited() {
    let api = cloudtask_testkit::TestApi::start_with(|c| {
        c.ws_max_subscriptions = 3;
        c.ws_max_sockets_per_user = 2;
    })
    .await;
    let tenant = api
        .tenant_with_cluster("alpha", crate::support::PASSWORD)
        .await;
    let token = tenant.owner.token.clone().unwrap();
    let within = Duration::from_secs(10);
    let mut socket = GqlSocket::connect(&api.url, &token).await;
    for id in ["1", "2", "3"] {
        socket.subscribe(id, WORKER_EVENTS, json!({})).await;
    }
    socket
        .subscribe("over", "{ me { email } }", json!({}))
        .await;
    match socket.reply("over", within).await {
        Reply::Next(payload) => assert_rate_limited(&json!({ "payload": payload })),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(socket.reply("over", within).await, Reply::Complete);

    let flood = 5_000;
    for i in 0..flood {
        socket
            .subscribe(&format!("flood-{i}"), WORKER_EVENTS, json!({}))
            .await;
    }
    let mut refused = 0;
    while refused < flood {
        let message = socket.message(within).await;
        if message["type"] == "next" {
            assert_rate_limited(&message);
            refused += 1;
        }
    }

    socket.send(json!({ "id": "1", "type": "complete" })).await;
    socket
        .subscribe("after", "{ me { email } }", json!({}))
        .await;
    match socket.reply("after", within).await {
        Reply::Next(me) => assert!(me["data"]["me"]["email"].is_string(), "{me}"),
        other => panic!("a freed place is taken again: {other:?}"),
    }

    let _second = GqlSocket::connect(&api.url, &token).await;
    let init = json!({ "type": "connection_init", "payload": { "accessToken": token } });
    let mut third = GqlSocket::open(&api.url).await;
    third.send(init.clone()).await;
    let closed = third.until_close(within).await;
    assert_eq!(closed.code, 4429, "{closed:?}");
    assert!(closed.reason.contains("too many"), "{closed:?}");

    // Once the server has seen the first socket go, its place is free.
    drop(socket);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut again = GqlSocket::open(&api.url).await;
        again.send(init.clone()).await;
        match again.frame(within).await {
            tokio_tungstenite::tungstenite::Message::Text(ack)
                if ack.contains("connection_ack") =>
            {
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the place was never released: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_answers(&api.client()).await;
}

/// Join tokens are guessed like passwords: wrong ones count against the address, which is
/// then RATE_LIMITED (the right token from elsewhere still joins, and is not locked out).
#[tokio::test]
async fn join_token_guessing_is_throttled_per_address() {
    let world = World::new().await;
    let join_from = |ip: [u8; 4], token: String| {
        let url = format!("{}/worker/join", world.api.url);
        async move {
            let client = reqwest::Client::builder()
                .local_address(std::net::IpAddr::from(ip))
                .build()
                .unwrap();
            client
                .post(url)
                .json(&json!({ "token": token }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let budget = world.api.state.config.login_max_attempts;
    for i in 0..budget {
        let status = join_from([127, 0, 0, 1], format!("guess-{i}")).await;
        assert_eq!(status, 401, "guess {i} is checked and refused");
    }
    for i in 0..5 {
        let status = join_from([127, 0, 0, 1], format!("more-{i}")).await;
        assert_eq!(status, 429, "past the budget, guesses are not even checked");
    }
    assert_eq!(
        join_from([127, 0, 0, 1], world.a.join_token.clone()).await,
        429,
        "the guessing address is throttled for any token"
    );
    let started = std::time::Instant::now();
    assert_eq!(
        join_from([127, 0, 0, 4], world.a.join_token.clone()).await,
        200,
        "a worker elsewhere joins"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "slowed at most"
    );
}

/// Forged worker credentials spend their address's anonymous budget: past it they are
/// answered RATE_LIMITED without a check, while a real credential from the same address
/// is served as always.
#[tokio::test]
async fn forged_worker_credentials_are_throttled_per_address() {
    let api = TestApi::start_with(|c| c.rate_anonymous_requests_per_minute = 5).await;
    let tenant = api
        .tenant_with_cluster("alpha", crate::support::PASSWORD)
        .await;
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, last]))
            .build()
            .unwrap()
    };
    let joined: Value = from(3)
        .post(format!("{}/worker/join", api.url))
        .json(&json!({ "token": tenant.join_token }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let credential = joined["credential"]
        .as_str()
        .expect("a credential")
        .to_owned();
    let cursor = format!("{}/worker/tasks/{}/cursor", api.url, uuid::Uuid::now_v7());
    let attacker = from(2);
    let mut statuses = Vec::new();
    for i in 0..12 {
        let status = attacker
            .get(&cursor)
            .bearer_auth(format!("forged-{i}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        statuses.push(status);
    }
    assert!(statuses[..5].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses[6..].iter().all(|s| *s == 429), "{statuses:?}");
    let real = attacker
        .get(&cursor)
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_ne!(real, 401, "a real credential is checked and accepted");
    assert_ne!(real, 429, "a real credential is not throttled");
}

async fn clusters(api: &TestApi) -> i64 {
    use sea_orm::ConnectionTrait;
    let row = api
        .catalogue
        .connection()
        .query_one_raw(sea_orm::Statement::from_string(
            api.catalogue.backend(),
            "SELECT count(*) AS n FROM clusters",
        ))
        .await
        .unwrap()
        .expect("a count");
    row.try_get::<i64>("", "n").unwrap()
}

/// Asks `client` for `{ me { email } }` until it is refused (at most `tries` times);
/// returns how many were answered and the refusal.
async fn until_refused(client: &Gql, tries: usize) -> (usize, GqlResponse) {
    for answered in 0..tries {
        let answer = client.run("{ me { email } }", json!({})).await;
        if answer.status == 429 {
            return (answered, answer);
        }
    }
    panic!("{tries} requests in a row were all answered");
}

/// Each caller has a budget over time beside each request's bounds: a signed-in user's
/// requests per minute (over HTTP and sockets alike) and query cost per minute, an
/// anonymous client's by its address. Past it: RATE_LIMITED (HTTP 429 with Retry-After),
/// nothing runs, and every other caller is served as before.
#[tokio::test]
async fn each_caller_has_a_budget_over_time_and_others_are_served() {
    let api = TestApi::start_with(|c| {
        c.rate_requests_per_minute = 8;
        c.rate_anonymous_requests_per_minute = 6;
        c.rate_cost_per_minute = 2_000;
    })
    .await;
    let alpha = api
        .tenant_with_cluster("alpha", crate::support::PASSWORD)
        .await;
    let beta = api
        .tenant_with_cluster("beta", crate::support::PASSWORD)
        .await;

    // A user's minute of requests, whatever the requests are.
    let (answered, refused) = until_refused(&alpha.owner, 20).await;
    assert!(answered <= 8, "at most a minute's budget: {answered}");
    assert_eq!(refused.code(), Some("RATE_LIMITED"), "{}", refused.body);
    let retry = refused.body["errors"][0]["extensions"]["retryAfterSeconds"]
        .as_u64()
        .unwrap_or_default();
    assert!((1..=60).contains(&retry), "{}", refused.body);
    let raw = alpha
        .owner
        .http
        .post(format!("{}/graphql", api.url))
        .bearer_auth(alpha.owner.token.as_deref().unwrap())
        .json(&json!({ "query": "{ me { email } }" }))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 429);
    assert!(raw.headers().contains_key("retry-after"));

    // Nothing runs past the budget: a refused mutation changes nothing.
    let before = clusters(&api).await;
    let create = alpha
        .owner
        .run(
            "mutation { createCluster(name: \"over-budget\") { cluster { id } } }",
            json!({}),
        )
        .await;
    assert_eq!(create.code(), Some("RATE_LIMITED"), "{}", create.body);
    assert_eq!(clusters(&api).await, before, "no cluster made");

    // A socket's operations spend the same budget.
    let token = alpha.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect(&api.url, &token).await;
    socket.subscribe("me", "{ me { email } }", json!({})).await;
    match socket.reply("me", Duration::from_secs(10)).await {
        Reply::Next(payload) => assert_eq!(
            payload["errors"][0]["extensions"]["code"], "RATE_LIMITED",
            "{payload}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Another user is served: budgets are per caller.
    let me = beta.owner.run("{ me { email } }", json!({})).await;
    assert_eq!(me.data()["me"]["email"], "owner@beta.example");

    // Query cost is a budget too: three pages of 200 runs cost more than 2,000.
    let mut refused_for_cost = None;
    for _ in 0..3 {
        let answer = beta
            .owner
            .run(
                "{ runs(first: 200) { edges { node { id status } } } }",
                json!({}),
            )
            .await;
        if answer.code() == Some("RATE_LIMITED") {
            refused_for_cost = Some(answer);
            break;
        }
        answer.data();
    }
    let refused = refused_for_cost.expect("the cost budget ran out");
    assert!(refused.message().contains("query cost"), "{}", refused.body);

    // Anonymous callers, by address: the logins above spent part of the minute.
    let anonymous = api.client();
    let (answered, refused) = until_refused(&anonymous, 20).await;
    assert!(answered <= 6, "{answered}");
    assert_eq!(refused.code(), Some("RATE_LIMITED"), "{}", refused.body);
    assert_eq!(refused.status, 429);
}

/// Two tenants' owners on an API whose audit log this test holds locked: every read of it
/// waits, holding its catalogue connection, until [`LockedAuditLog::unlock`].
struct LockedAuditLog {
    _api: TestApi,
    alpha: Gql,
    beta: Gql,
    db: sea_orm::DatabaseConnection,
    lock: sea_orm::DatabaseTransaction,
}

const WITHIN: Duration = Duration::from_secs(20);

impl LockedAuditLog {
    async fn start(adjust: impl FnOnce(&mut cloudtask_core::config::Config)) -> Self {
        use sea_orm::{ConnectionTrait, TransactionTrait};
        let api = TestApi::start_with(adjust).await;
        let password = crate::support::PASSWORD;
        let alpha = api.tenant_with_cluster("alpha", password).await.owner;
        let beta = api.tenant_with_cluster("beta", password).await.owner;
        let db = sea_orm::Database::connect(&api.state.config.database_url)
            .await
            .expect("connect");
        let lock = db.begin().await.expect("begin");
        lock.execute_unprepared("LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("lock");
        LockedAuditLog {
            _api: api,
            alpha,
            beta,
            db,
            lock,
        }
    }

    /// Reads of the locked table waiting now: the connections they hold.
    async fn waiting(&self) -> i64 {
        use sea_orm::{ConnectionTrait, Statement};
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                self.db.get_database_backend(),
                "SELECT count(*) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            ))
            .await
            .expect("pg_stat_activity")
            .expect("a row");
        row.try_get("", "n").expect("a count")
    }

    async fn until_waiting(&self, n: i64) {
        let deadline = tokio::time::Instant::now() + WITHIN;
        while self.waiting().await < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {n} reads waiting ({} are)",
                self.waiting().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn unlock(self) {
        self.lock.rollback().await.expect("unlock");
    }
}

/// `query` by `caller`, in a task of its own.
fn spawn_query(caller: &Gql, query: &'static str) -> tokio::task::JoinHandle<GqlResponse> {
    let caller = caller.clone();
    tokio::spawn(async move { caller.run(query, json!({})).await })
}

/// The answer of a spawned query, once it comes: data under `field`, no error.
async fn answered(query: tokio::task::JoinHandle<GqlResponse>, field: &str) {
    let answer = tokio::time::timeout(WITHIN, query)
        .await
        .expect("answered once the table is unlocked")
        .expect("the task");
    assert_listed(&answer, field);
}

fn assert_listed(answer: &GqlResponse, field: &str) {
    assert!(answer.code().is_none(), "{}", answer.body);
    assert!(answer.data()[field]["edges"].is_array(), "{}", answer.body);
}

/// One user's fan-out holds only their own catalogue connections
/// (`db_connections_per_user`): with 20 of their requests stuck on a locked table, only 4
/// connections wait and another tenant's user is served at once. With lanes as wide as the
/// pool (20), the same fan-out takes every connection (19: one listens for the catalogue's
/// changes) and the other user waits: what every user saw before the lanes.
#[tokio::test]
async fn one_users_fan_out_leaves_catalogue_connections_to_everybody_else() {
    const AUDIT: &str = "{ auditLog(first: 5) { edges { node { id } } } }";
    const TASKS: &str = "{ tasks(first: 5) { edges { node { name } } } }";
    for (lanes, held, served) in [(4, 4, true), (20, 19, false)] {
        let locked = LockedAuditLog::start(|c| c.db_connections_per_user = lanes).await;
        let fan_out: Vec<_> = (0..20).map(|_| spawn_query(&locked.alpha, AUDIT)).collect();
        locked.until_waiting(held).await;

        let mut tasks = spawn_query(&locked.beta, TASKS);
        let at_once = tokio::time::timeout(Duration::from_secs(3), &mut tasks).await;
        assert_eq!(
            at_once.is_ok(),
            served,
            "with {lanes} connections per user, another user is served at once: {served}"
        );
        assert_eq!(
            locked.waiting().await,
            held,
            "the fan-out holds no more than its lanes"
        );

        // Unlocked: nothing was lost on either side.
        locked.unlock().await;
        match at_once {
            Ok(listed) => assert_listed(&listed.expect("the task"), "tasks"),
            Err(_) => answered(tasks, "tasks").await,
        }
        for read in fan_out {
            answered(read, "auditLog").await;
        }
    }
}

/// A caller's heavy operations (costing `query_heavy_complexity` or more) run one at a time:
/// with three of one user's big reads stuck on a locked table only one of them holds a
/// connection, the others wait their turn; another user's heavy read takes its own turn, and
/// the first user's light requests are not held up.
#[tokio::test]
async fn a_callers_heavy_operations_take_turns() {
    const HEAVY: &str = "{ auditLog(first: 100) { edges { node { id } } } }";
    let locked = LockedAuditLog::start(|c| c.query_heavy_complexity = 50).await;
    let alphas: Vec<_> = (0..3).map(|_| spawn_query(&locked.alpha, HEAVY)).collect();
    locked.until_waiting(1).await;
    let beta = spawn_query(&locked.beta, HEAVY);
    locked.until_waiting(2).await;

    let me = tokio::time::timeout(
        Duration::from_secs(3),
        locked.alpha.run("{ me { email } }", json!({})),
    )
    .await
    .expect("a light request of the same user is not held up");
    assert!(me.data()["me"]["email"].is_string(), "{}", me.body);
    assert_eq!(
        locked.waiting().await,
        2,
        "one heavy read per user at a time"
    );

    locked.unlock().await;
    for read in alphas.into_iter().chain([beta]) {
        answered(read, "auditLog").await;
    }
}
