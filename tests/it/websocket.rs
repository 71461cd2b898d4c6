//! GraphQL over WebSocket: `connection_init` carries the access token; without a valid
//! one the server closes the socket with the protocol's refusal, and with one, operations
//! run as that user, tenant isolation included.

use std::time::Duration;

use cloudtask_testkit::{GqlSocket, Reply};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::World;

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
