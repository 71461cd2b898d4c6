//! GraphQL over WebSocket: `connection_init` carries the access token; without a valid
//! one the server closes the socket with the protocol's refusal, and with one, operations
//! run as that user, tenant isolation included.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::World;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(world: &World) -> Socket {
    let url = format!("{}/graphql/ws", world.api.url.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket
}

async fn next(socket: &mut Socket) -> Message {
    tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
        .await
        .expect("the server answers")
        .expect("the socket is open")
        .expect("a message")
}

async fn send(socket: &mut Socket, message: Value) {
    socket
        .send(Message::Text(message.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_socket_without_a_valid_token_is_closed_with_4403() {
    let world = World::new().await;
    for payload in [json!({}), json!({ "accessToken": "not-a-token" })] {
        let mut socket = open(&world).await;
        send(
            &mut socket,
            json!({ "type": "connection_init", "payload": payload }),
        )
        .await;
        match next(&mut socket).await {
            Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4403),
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn operations_over_the_socket_run_as_the_token_says() {
    let world = World::new().await;
    let mut socket = open(&world).await;
    let token = world.b.owner.token.clone().unwrap();
    send(
        &mut socket,
        json!({ "type": "connection_init", "payload": { "accessToken": token } }),
    )
    .await;
    let ack: Value = serde_json::from_str(next(&mut socket).await.to_text().unwrap()).unwrap();
    assert_eq!(ack["type"], "connection_ack");
    send(
        &mut socket,
        json!({ "id": "1", "type": "subscribe", "payload": {
            "query": "query($id: ID!) { own: task(id: $id) { name } }",
            "variables": { "id": world.b.task_id },
        } }),
    )
    .await;
    let own: Value = serde_json::from_str(next(&mut socket).await.to_text().unwrap()).unwrap();
    assert_eq!(own["payload"]["data"]["own"]["name"], "beta-task", "{own}");
    send(
        &mut socket,
        json!({ "id": "2", "type": "subscribe", "payload": {
            "query": "query($id: ID!) { task(id: $id) { name } }",
            "variables": { "id": world.a.task_id },
        } }),
    )
    .await;
    let mut foreign: Value =
        serde_json::from_str(next(&mut socket).await.to_text().unwrap()).unwrap();
    while foreign["id"] != "2" || foreign["type"] == "complete" {
        foreign = serde_json::from_str(next(&mut socket).await.to_text().unwrap()).unwrap();
    }
    assert_eq!(
        foreign["payload"]["errors"][0]["extensions"]["code"], "NOT_FOUND",
        "{foreign}"
    );
}
