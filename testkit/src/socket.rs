//! A GraphQL-over-WebSocket client (`graphql-transport-ws`) for tests.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct GqlSocket {
    socket: Stream,
}

/// How the server closed a socket, and the messages it sent before.
#[derive(Debug)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
    pub messages: Vec<Value>,
}

/// What the server said about one operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A `next` message's payload.
    Next(Value),
    /// The operation failed: the `error` message's payload.
    Error(Value),
    Complete,
}

impl GqlSocket {
    /// Opens `/graphql/ws` of the API at `api_url` (http://…) without saying anything.
    pub async fn open(api_url: &str) -> GqlSocket {
        GqlSocket::open_with_protocol(api_url, "graphql-transport-ws").await
    }

    /// Opens the socket asking for `protocol` (`graphql-ws` is the legacy one).
    pub async fn open_with_protocol(api_url: &str, protocol: &str) -> GqlSocket {
        GqlSocket::open_at(api_url, "/graphql/ws", protocol).await
    }

    /// Opens `path` (`/graphql/ws`, or `/graphql`, which upgrades too) with `protocol`.
    pub async fn open_at(api_url: &str, path: &str, protocol: &str) -> GqlSocket {
        let url = format!("{}{path}", api_url.replace("http://", "ws://"));
        let mut request = url.into_client_request().expect("a WebSocket URL");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol.parse().expect("header"));
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("the API accepts a WebSocket");
        GqlSocket { socket }
    }

    /// Opens a socket and authenticates it with `token`; panics unless acknowledged.
    pub async fn connect(api_url: &str, token: &str) -> GqlSocket {
        GqlSocket::connect_at(api_url, "/graphql/ws", token).await
    }

    /// [`GqlSocket::connect`] on `path`.
    pub async fn connect_at(api_url: &str, path: &str, token: &str) -> GqlSocket {
        let mut socket = GqlSocket::open_at(api_url, path, "graphql-transport-ws").await;
        socket
            .send(json!({ "type": "connection_init", "payload": { "accessToken": token } }))
            .await;
        let ack = socket.message(Duration::from_secs(10)).await;
        assert_eq!(ack["type"], "connection_ack", "{ack}");
        socket
    }

    pub async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("the socket takes a message");
    }

    /// The next raw frame (close frames included), within `within`.
    pub async fn frame(&mut self, within: Duration) -> Message {
        tokio::time::timeout(within, self.socket.next())
            .await
            .unwrap_or_else(|_| panic!("the server said nothing within {within:?}"))
            .expect("the socket is open")
            .expect("a frame")
    }

    /// The next JSON message, within `within` (pings are answered and skipped).
    pub async fn message(&mut self, within: Duration) -> Value {
        loop {
            match self.frame(within).await {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text).expect("JSON");
                    if value["type"] == "ping" {
                        self.send(json!({ "type": "pong" })).await;
                        continue;
                    }
                    return value;
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes the socket, within `within` in all; panics when it
    /// stays open, or ends without a close frame.
    pub async fn until_close(&mut self, within: Duration) -> Closed {
        let (messages, close) = self.read_to_end(within).await;
        let (code, reason) = close.unwrap_or_else(|| {
            panic!("the socket ended without a close frame; it sent {messages:?}")
        });
        Closed {
            code,
            reason,
            messages,
        }
    }

    /// Reads until the connection ends, with a close frame or without one (as on a
    /// protocol error), within `within`; the messages the server sent before.
    pub async fn until_gone(&mut self, within: Duration) -> Vec<Value> {
        self.read_to_end(within).await.0
    }

    /// The messages until the connection ends (within `within`, else a panic), and the
    /// close frame's code and reason, if it ended with one.
    async fn read_to_end(&mut self, within: Duration) -> (Vec<Value>, Option<(u16, String)>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut messages = Vec::new();
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("the socket was not closed within {within:?}; it sent {messages:?}")
                });
            match frame {
                Some(Ok(Message::Text(text))) => {
                    messages.push(serde_json::from_str(&text).expect("JSON"));
                }
                Some(Ok(Message::Close(frame))) => {
                    let close = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return (messages, Some(close));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (messages, None),
            }
        }
    }

    /// Starts operation `id`.
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(json!({ "id": id, "type": "subscribe",
            "payload": { "query": query, "variables": variables } }))
            .await;
    }

    /// The next reply to operation `id` (replies to others are dropped), within `within`.
    pub async fn reply(&mut self, id: &str, within: Duration) -> Reply {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self.message(left).await;
            if message["id"] != id {
                continue;
            }
            return match message["type"].as_str() {
                Some("next") => Reply::Next(message["payload"].clone()),
                Some("error") => Reply::Error(message["payload"].clone()),
                Some("complete") => Reply::Complete,
                _ => panic!("unexpected message {message}"),
            };
        }
    }

    /// Every `next` payload of operation `id` until it completes, within `within` in all.
    pub async fn until_complete(&mut self, id: &str, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        let mut payloads = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.reply(id, left).await {
                Reply::Next(payload) => payloads.push(payload),
                Reply::Complete => return payloads,
                Reply::Error(e) => panic!("operation {id} failed: {e}"),
            }
        }
    }
}
