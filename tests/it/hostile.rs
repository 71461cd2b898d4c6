//! Hostile clients, tried as an attacker would: each test sends the hostile request to the
//! real server, expects a clear error code, and checks that nothing changed and that the
//! process still answers.

use std::time::Duration;

use cloudtask_testkit::{Gql, GqlResponse, GqlSocket, Reply};
use serde_json::{Value, json};

use crate::support::World;

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
    assert_eq!(
        response.code(),
        Some("BAD_USER_INPUT"),
        "{what}: {}",
        response.body
    );
    assert_eq!(
        response.body["errors"][0]["extensions"]["limit"], limit,
        "{what}: the limit is named: {}",
        response.body
    );
    assert!(
        response.body["data"].is_null(),
        "{what}: no data: {}",
        response.body
    );
}

async fn task_names(owner: &Gql) -> Vec<String> {
    let answer = owner
        .run(
            "{ tasks(first: 50) { edges { node { name } } } }",
            json!({}),
        )
        .await;
    answer.data()["tasks"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["node"]["name"].as_str().unwrap().to_owned())
        .collect()
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

/// Reads from `tcp` until the server closes it (or it answers and then closes), within
/// `within`; what it sent.
async fn until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buffer = [0u8; 4096];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open past {within:?}; it sent {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
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
