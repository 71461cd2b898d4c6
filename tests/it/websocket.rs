//! GraphQL over WebSocket: `connection_init` carries the access token; without a valid
//! one the server closes the socket with the protocol's refusal, and with one, operations
//! run as that user, tenant isolation included. The session is checked again for every
//! operation and every event: a member removed (on any replica), a login logged out, or a
//! token expired closes the socket (4403) and stops its subscriptions; a demoted member's
//! operations have their new role.

use std::time::Duration;

use cloudtask_testkit::{Gql, GqlSocket, Reply, TestApi};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{CREATE_TASK, PASSWORD, World, task_input, task_names};

const WITHIN: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_socket_without_a_valid_token_is_closed_with_4403() {
    let world = World::new().await;
    // A token of the right key and a real user that expired two minutes ago.
    let owner = world
        .api
        .catalogue
        .user_credentials(&world.a.owner_email)
        .await
        .unwrap()
        .expect("the owner exists")
        .user
        .id;
    let expired = cloudtask_api::auth::TokenKeys::new(
        cloudtask_testkit::TEST_JWT_SECRET.as_bytes(),
        chrono::Duration::seconds(-120),
    )
    .issue_access(
        owner,
        Some((
            world.a.id.parse().unwrap(),
            cloudtask_core::roles::Role::Owner,
        )),
        false,
        None,
    )
    .unwrap()
    .token;
    for payload in [
        json!({}),
        json!({ "accessToken": "not-a-token" }),
        json!({ "accessToken": expired }),
    ] {
        let mut socket = GqlSocket::open(&world.api.url).await;
        socket
            .send(json!({ "type": "connection_init", "payload": payload }))
            .await;
        match socket.frame(WITHIN).await {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4403),
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn operations_over_the_socket_run_as_the_token_says() {
    let world = World::new().await;
    let token = world.b.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect(&world.api.url, &token).await;
    socket
        .subscribe(
            "1",
            "query($id: ID!) { own: task(id: $id) { name } }",
            json!({ "id": world.b.task_id }),
        )
        .await;
    match socket.reply("1", WITHIN).await {
        Reply::Next(own) => assert_eq!(own["data"]["own"]["name"], "beta-task", "{own}"),
        other => panic!("expected data, got {other:?}"),
    }
    socket
        .subscribe(
            "2",
            "query($id: ID!) { task(id: $id) { name } }",
            json!({ "id": world.a.task_id }),
        )
        .await;
    match socket.reply("2", WITHIN).await {
        Reply::Next(foreign) => assert_eq!(
            foreign["errors"][0]["extensions"]["code"], "NOT_FOUND",
            "{foreign}"
        ),
        other => panic!("expected an answer, got {other:?}"),
    }
}

#[tokio::test]
async fn the_legacy_graphql_ws_protocol_is_served_too() {
    let world = World::new().await;
    let token = world.b.owner.token.clone().unwrap();
    let mut socket = GqlSocket::open_with_protocol(&world.api.url, "graphql-ws").await;
    socket
        .send(json!({ "type": "connection_init", "payload": { "accessToken": token } }))
        .await;
    let ack = socket.message(WITHIN).await;
    assert_eq!(ack["type"], "connection_ack", "{ack}");
    socket
        .send(json!({ "id": "1", "type": "start", "payload": {
            "query": "query($id: ID!) { task(id: $id) { name } }",
            "variables": { "id": world.b.task_id },
        } }))
        .await;
    loop {
        let message = socket.message(WITHIN).await;
        if message["type"] == "ka" {
            continue; // keep-alive
        }
        assert_eq!(message["type"], "data", "{message}");
        assert_eq!(message["payload"]["data"]["task"]["name"], "beta-task");
        break;
    }
}

#[tokio::test]
async fn requests_refused_before_any_resolver_runs_carry_a_code_over_the_socket_too() {
    let world = World::new().await;
    let token = world.a.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect(&world.api.url, &token).await;
    let bad = [
        ("syntax", "subscription { runLogs(runId: ", json!({})),
        ("unknown field", "subscription { noSuchThing }", json!({})),
        (
            "wrong variable type",
            "subscription($id: ID!, $from: Int) { runLogs(runId: $id, fromOffset: $from) { text } }",
            json!({ "id": "x", "from": "not a number" }),
        ),
        (
            "query, unknown field",
            "query { me { noSuchField } }",
            json!({}),
        ),
    ];
    for (i, (what, query, variables)) in bad.into_iter().enumerate() {
        let id = i.to_string();
        socket.subscribe(&id, query, variables).await;
        let errors = match socket.reply(&id, WITHIN).await {
            Reply::Error(errors) => errors,
            Reply::Next(payload) => payload["errors"].clone(),
            Reply::Complete => panic!("{what}: completed without an error"),
        };
        assert_eq!(
            errors[0]["extensions"]["code"], "BAD_USER_INPUT",
            "{what}: {errors}"
        );
    }
}

#[tokio::test]
async fn the_graphql_url_upgrades_to_a_socket_too_and_still_serves_graphiql() {
    let world = World::new().await;
    let token = world.b.owner.token.clone().unwrap();
    let mut socket = GqlSocket::connect_at(&world.api.url, "/graphql", &token).await;
    socket
        .subscribe(
            "1",
            "query($id: ID!) { task(id: $id) { name } }",
            json!({ "id": world.b.task_id }),
        )
        .await;
    match socket.reply("1", WITHIN).await {
        Reply::Next(own) => assert_eq!(own["data"]["task"]["name"], "beta-task", "{own}"),
        other => panic!("expected data, got {other:?}"),
    }
    // A browser's GET is still GraphiQL.
    let page = reqwest::get(format!("{}/graphql", world.api.url))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("graphiql"));
}

const RUN_EVENTS: &str = "subscription($t: ID) { runEvents(taskId: $t) { id status } }";

/// A member of tenant alpha with `role`, signed in; and their user id.
async fn alpha_member(world: &World, name: &str, role: &str) -> (Gql, String) {
    let email = format!("{name}@alpha.example");
    let added = world
        .a
        .owner
        .run(
            "mutation($input: AddMemberInput!) { addMember(input: $input) { user { id } } }",
            json!({ "input": { "email": email, "role": role, "password": PASSWORD } }),
        )
        .await;
    let id = added.data()["addMember"]["user"]["id"]
        .as_str()
        .expect("a user id")
        .to_owned();
    (
        world.api.login(&email, PASSWORD, Some(&world.a.id)).await,
        id,
    )
}

fn token(client: &Gql) -> &str {
    client.token.as_deref().expect("signed in")
}

async fn run_now(client: &Gql, task: &str) {
    let queued = client
        .run(
            "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
            json!({ "id": task }),
        )
        .await;
    assert!(
        queued.data()["runTaskNow"]["id"].is_string(),
        "{}",
        queued.body
    );
}

/// Queues runs of `task` until subscription `id` hears of one: it has taken hold.
async fn until_heard(socket: &mut GqlSocket, id: &str, owner: &Gql, task: &str) {
    for _ in 0..5 {
        run_now(owner, task).await;
        let within = Duration::from_secs(5);
        if let Ok(reply) = tokio::time::timeout(within, socket.reply(id, WITHIN)).await {
            match reply {
                Reply::Next(payload) if payload["data"]["runEvents"]["id"].is_string() => return,
                other => panic!("expected a run event, got {other:?}"),
            }
        }
    }
    panic!("subscription {id} never heard of a run");
}

/// The first error's code of an operation's answer.
fn refusal(reply: Reply) -> String {
    let errors = match reply {
        Reply::Next(payload) => payload["errors"].clone(),
        Reply::Error(errors) => errors,
        Reply::Complete => panic!("completed without an answer"),
    };
    errors[0]["extensions"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {errors}"))
        .to_owned()
}

fn next_of(messages: &[Value], id: &str) -> Vec<Value> {
    messages
        .iter()
        .filter(|m| m["type"] == "next" && m["id"] == id)
        .cloned()
        .collect()
}

async fn remove_member(world: &World, user_id: &str) {
    let removed = world
        .a
        .owner
        .run(
            "mutation($id: ID!) { removeMember(userId: $id) }",
            json!({ "id": user_id }),
        )
        .await;
    assert_eq!(removed.data()["removeMember"], true, "{}", removed.body);
}

/// A member removed while their socket is open on the replica that removes them: the
/// socket closes with 4403 at once, and their subscription delivers nothing more, not
/// even the run queued right after.
#[tokio::test]
async fn a_removed_members_socket_is_closed_at_once() {
    let world = World::new().await;
    let (member, member_id) = alpha_member(&world, "leaver", "OPERATOR").await;
    let mut socket = GqlSocket::connect(&world.api.url, token(&member)).await;
    socket
        .subscribe("events", RUN_EVENTS, json!({ "t": world.a.task_id }))
        .await;
    until_heard(&mut socket, "events", &world.a.owner, &world.a.task_id).await;

    remove_member(&world, &member_id).await;
    run_now(&world.a.owner, &world.a.task_id).await;
    let closed = socket.until_close(WITHIN).await;
    assert_eq!(closed.code, 4403, "{closed:?}");
    assert!(
        next_of(&closed.messages, "events").is_empty(),
        "nothing is delivered after the removal: {closed:?}"
    );
}

/// On another replica the removal is heard of through the catalogue's events: the
/// socket there closes with 4403 at once, without waiting for its next operation, and
/// delivers nothing more; the same token cannot act over a new socket either.
#[tokio::test]
async fn a_removed_members_socket_on_another_replica_is_closed_at_once() {
    let world = World::new().await;
    let replica = world.api.replica().await;
    let (member, member_id) = alpha_member(&world, "leaver", "OPERATOR").await;
    let mut socket = GqlSocket::connect(&replica.url, token(&member)).await;
    socket
        .subscribe("events", RUN_EVENTS, json!({ "t": world.a.task_id }))
        .await;
    until_heard(&mut socket, "events", &world.a.owner, &world.a.task_id).await;

    remove_member(&world, &member_id).await;
    run_now(&world.a.owner, &world.a.task_id).await;
    let closed = socket.until_close(WITHIN).await;
    assert_eq!(closed.code, 4403, "{closed:?}");
    assert!(next_of(&closed.messages, "events").is_empty(), "{closed:?}");

    let mut again = GqlSocket::open(&replica.url).await;
    again
        .send(json!({ "type": "connection_init", "payload": { "accessToken": token(&member) } }))
        .await;
    let input = task_input(&world.a.cluster_id, "after-removal");
    again
        .send(json!({ "id": "create", "type": "subscribe",
                      "payload": { "query": CREATE_TASK, "variables": { "input": input } } }))
        .await;
    let refused = again.until_close(WITHIN).await;
    assert_eq!(refused.code, 4403, "{refused:?}");
    assert!(
        !task_names(&world.a.owner)
            .await
            .contains(&"after-removal".to_owned()),
        "nothing was created"
    );
}

/// A login with its refresh token, as a client keeps it.
async fn login_with_refresh(world: &World, email: &str) -> (String, String) {
    let answer = world
        .api
        .client()
        .run(
            "mutation($e: String!, $p: String!, $t: ID) {
                login(email: $e, password: $p, tenantId: $t) { accessToken refreshToken }
            }",
            json!({ "e": email, "p": PASSWORD, "t": world.a.id }),
        )
        .await;
    let login = &answer.data()["login"];
    (
        login["accessToken"].as_str().unwrap().to_owned(),
        login["refreshToken"].as_str().unwrap().to_owned(),
    )
}

/// Logging out ends that login's open sockets on every replica (4403), while the access
/// token itself has not expired; the same user's other login keeps its socket.
#[tokio::test]
async fn logging_out_closes_that_logins_sockets_on_every_replica() {
    let world = World::new().await;
    let replica = world.api.replica().await;
    let (access, refresh) = login_with_refresh(&world, &world.a.owner_email).await;
    let (other, _) = login_with_refresh(&world, &world.a.owner_email).await;
    let mut here = GqlSocket::connect(&world.api.url, &access).await;
    let mut there = GqlSocket::connect(&replica.url, &access).await;
    let mut kept = GqlSocket::connect(&replica.url, &other).await;
    for socket in [&mut here, &mut there, &mut kept] {
        socket
            .subscribe("events", RUN_EVENTS, json!({ "t": world.a.task_id }))
            .await;
        until_heard(socket, "events", &world.a.owner, &world.a.task_id).await;
    }

    let out = world
        .api
        .client()
        .with_token(&access)
        .run(
            "mutation($r: String!) { logout(refreshToken: $r) }",
            json!({ "r": refresh }),
        )
        .await;
    assert_eq!(out.data()["logout"], true);
    for socket in [&mut here, &mut there] {
        let closed = socket.until_close(WITHIN).await;
        assert_eq!(closed.code, 4403, "{closed:?}");
    }
    kept.subscribe("me", "{ me { email } }", json!({})).await;
    match kept.reply("me", WITHIN).await {
        Reply::Next(me) => assert_eq!(me["data"]["me"]["email"], world.a.owner_email.as_str()),
        other => panic!("the other login's socket still serves: {other:?}"),
    }
}

/// A member demoted to VIEWER keeps their socket (every role reads), but its next
/// mutation has the new role: FORBIDDEN, and nothing is created or queued.
#[tokio::test]
async fn a_demoted_members_next_mutation_over_the_old_socket_is_forbidden() {
    let world = World::new().await;
    let (member, member_id) = alpha_member(&world, "demoted", "OPERATOR").await;
    let mut socket = GqlSocket::connect(&world.api.url, token(&member)).await;
    let create = |name: &str| json!({ "input": task_input(&world.a.cluster_id, name) });
    socket
        .subscribe("before", CREATE_TASK, create("before-demotion"))
        .await;
    match socket.reply("before", WITHIN).await {
        Reply::Next(payload) => assert_eq!(
            payload["data"]["createTask"]["name"], "before-demotion",
            "{payload}"
        ),
        other => panic!("an operator creates tasks: {other:?}"),
    }
    let runs_before = run_count(&world).await;

    let demoted = world
        .a
        .owner
        .run(
            "mutation($id: ID!) { setMemberRole(userId: $id, role: VIEWER) { role } }",
            json!({ "id": member_id }),
        )
        .await;
    assert_eq!(demoted.data()["setMemberRole"]["role"], "VIEWER");

    socket
        .subscribe("after", CREATE_TASK, create("after-demotion"))
        .await;
    assert_eq!(refusal(socket.reply("after", WITHIN).await), "FORBIDDEN");
    socket
        .subscribe(
            "run",
            "mutation($id: ID!) { runTaskNow(id: $id) { id } }",
            json!({ "id": world.a.task_id }),
        )
        .await;
    assert_eq!(refusal(socket.reply("run", WITHIN).await), "FORBIDDEN");
    socket
        .subscribe(
            "read",
            "{ tasks(first: 5) { edges { node { id } } } }",
            json!({}),
        )
        .await;
    match socket.reply("read", WITHIN).await {
        Reply::Next(payload) => assert!(payload["data"]["tasks"].is_object(), "{payload}"),
        other => panic!("a viewer still reads: {other:?}"),
    }
    assert!(
        !task_names(&world.a.owner)
            .await
            .contains(&"after-demotion".to_owned())
    );
    assert_eq!(run_count(&world).await, runs_before, "no run was queued");
}

async fn run_count(world: &World) -> usize {
    let runs = world
        .a
        .owner
        .run("{ runs(first: 100) { edges { node { id } } } }", json!({}))
        .await;
    runs.data()["runs"]["edges"].as_array().expect("runs").len()
}

/// An access token that expires while its socket is open: the socket is closed with 4403
/// at the expiry, and no event is delivered after it, though runs keep being queued.
#[tokio::test]
async fn a_socket_is_closed_when_its_access_token_expires() {
    let api = TestApi::start_with(|c| c.access_token_ttl_secs = 3).await;
    let tenant = api.tenant_with_cluster("alpha", PASSWORD).await;
    let task = tenant
        .owner
        .run(
            CREATE_TASK,
            json!({ "input": task_input(&tenant.cluster_id, "ticking") }),
        )
        .await;
    let task: cloudtask_core::ids::TaskId = task.data()["createTask"]["id"]
        .as_str()
        .expect("a task id")
        .parse()
        .unwrap();
    let login = api
        .client()
        .run(
            "mutation($e: String!, $p: String!, $t: ID) {
                login(email: $e, password: $p, tenantId: $t) { accessToken accessTokenExpiresAt }
            }",
            json!({ "e": tenant.owner_email, "p": PASSWORD, "t": tenant.tenant_id }),
        )
        .await;
    let access = login.data()["login"]["accessToken"].as_str().unwrap();
    let expires_at: chrono::DateTime<chrono::Utc> = login.data()["login"]["accessTokenExpiresAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let mut socket = GqlSocket::connect(&api.url, access).await;
    socket
        .subscribe("events", RUN_EVENTS, json!({ "t": task.to_string() }))
        .await;
    // Runs are queued through the catalogue (HTTP tokens expire too) until the end.
    let owner = api
        .catalogue
        .user_credentials(&tenant.owner_email)
        .await
        .unwrap()
        .expect("the owner exists")
        .user
        .id;
    let handle = api
        .catalogue
        .tenant(cloudtask_catalogue::Scope {
            tenant_id: tenant.tenant_id.parse().unwrap(),
            user_id: owner,
            actor: "test".into(),
        })
        .await
        .unwrap();
    let queuing = tokio::spawn(async move {
        loop {
            handle.queue_run(task).await.expect("queued");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (code, closed_at) = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(frame) = tokio::time::timeout(left, socket.frame(WITHIN)).await else {
            panic!("the socket stayed open; its token expired at {expires_at}, events: {heard:?}");
        };
        match frame {
            Message::Text(text) => {
                let message: Value = serde_json::from_str(&text).unwrap();
                if message["type"] == "next" {
                    heard.push(chrono::Utc::now());
                }
            }
            Message::Close(frame) => {
                break (frame.map(|f| u16::from(f.code)), chrono::Utc::now());
            }
            _ => {}
        }
    };
    queuing.abort();
    assert_eq!(code, Some(4403));
    assert!(
        !heard.is_empty(),
        "the subscription was live before the expiry"
    );
    let grace = chrono::Duration::milliseconds(250);
    assert!(
        heard.iter().all(|at| *at <= expires_at + grace),
        "no event after the expiry at {expires_at}: {heard:?}"
    );
    assert!(
        closed_at >= expires_at - grace && closed_at <= expires_at + chrono::Duration::seconds(2),
        "closed at {closed_at}, the token expired at {expires_at}"
    );
}
