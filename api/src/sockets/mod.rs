//! GraphQL over WebSocket (`graphql-transport-ws`, and the legacy `graphql-ws`).
//! async-graphql speaks the protocol; this module keeps a socket within its session and
//! its limits:
//!
//! - `connection_init` must come within `ws_init_timeout_secs` (else close 4408) and carry
//!   a valid access token (`{"accessToken": "…"}` or `{"authorization": "Bearer …"}`) of a
//!   current member (else 4403). A user with `ws_max_sockets_per_user` sockets open on
//!   this replica is refused with 4429.
//! - The session is checked before every operation and every event delivered (see
//!   [`session`]); once it is over the socket is closed with 4403 and nothing more is
//!   delivered.
//! - At most `ws_max_subscriptions` operations run at once on a socket; one more is
//!   answered with a RATE_LIMITED error (`next`, then `complete`) and the socket stays.

mod registry;
mod session;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_graphql::futures_util::stream::{self, BoxStream};
use async_graphql::http::{WebSocketProtocols as Protocols, WsMessage};
use async_graphql::{Data, ErrorExtensions, Executor, Request, Response};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use cloudtask_catalogue::live_events::Event;
use cloudtask_core::Error;
use cloudtask_core::ids::UserId;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, watch};

pub use registry::SocketRegistry;
use session::{Session, error_response, graphql_error_response};

use crate::AppState;
use crate::graphql::AppSchema;

/// Close codes of `graphql-transport-ws`.
const FORBIDDEN: u16 = 4403;
const INIT_TIMEOUT: u16 = 4408;
const TOO_MANY: u16 = 4429;

/// Messages a socket may have queued for its writer.
const SOCKET_QUEUE: usize = 256;

/// Serves one upgraded socket until either side closes it.
/// The user's account changed here (role, membership, logout): their sockets on this
/// replica check their session now, and every other replica hears of it through the
/// catalogue's events.
pub fn account_changed(state: &AppState, user: UserId) {
    state.sockets.account_changed(user);
    state.catalogue.announce(Event::Account { user });
}

/// Hears account changes made on any replica: learns the logins they revoked, then has the
/// user's sockets here check their session; after missed events (and at start), learns
/// every recent revocation and every socket checks. Ends with the API.
pub async fn follow_accounts(state: std::sync::Weak<AppState>) {
    let Some(mut events) = (match state.upgrade() {
        Some(state) => state.catalogue.events().await.ok(),
        None => None,
    }) else {
        return;
    };
    // Subscribed first, then read: a revocation made meanwhile is heard as an event.
    if let Some(state) = state.upgrade() {
        learn_revoked(&state, None).await;
    }
    while let Some(event) = events.next().await {
        let Some(state) = state.upgrade() else { return };
        match event {
            Event::Account { user } => {
                learn_revoked(&state, Some(user)).await;
                state.sockets.account_changed(user);
            }
            Event::Resync => {
                learn_revoked(&state, None).await;
                state.sockets.all_changed();
            }
            _ => {}
        }
    }
}

async fn learn_revoked(state: &AppState, user: Option<UserId>) {
    if let Err(e) = state.revoked.learn(&state.catalogue, user).await {
        tracing::warn!(error = %e, "reading revoked logins");
    }
}

pub async fn serve(socket: WebSocket, state: Arc<AppState>, schema: AppSchema, client_ip: IpAddr) {
    // The subprotocol the upgrade agreed on (one of async-graphql's).
    let protocol = socket
        .protocol()
        .and_then(|p| p.to_str().ok())
        .and_then(|p| p.parse().ok())
        .unwrap_or(Protocols::GraphQLWS);
    let init_timeout = Duration::from_secs(state.config.ws_init_timeout_secs);
    let connection = Arc::new(Connection {
        operations: Arc::new(Semaphore::new(state.config.ws_max_subscriptions)),
        state,
        client_ip,
        phase: watch::channel(Phase::Waiting).0,
        refusal: OnceLock::new(),
    });
    let (sink, input) = socket.split();
    let mut sink = batched(sink);
    let input = input
        .take_while(|message| std::future::ready(message.is_ok()))
        .filter_map(|message| {
            std::future::ready(match message {
                Ok(message @ (Message::Text(_) | Message::Binary(_))) => Some(message.into_data()),
                _ => None,
            })
        });
    let executor = SocketExecutor {
        schema,
        connection: connection.clone(),
    };
    let init = {
        let connection = connection.clone();
        move |payload| async move { connection.init(payload).await }
    };
    let machine =
        async_graphql::http::WebSocket::new(executor, input, protocol).on_connection_init(init);
    let closed = connection.closed(init_timeout);
    tokio::pin!(machine, closed);
    loop {
        let message = tokio::select! {
            biased;
            (code, reason) = &mut closed => close(code, reason),
            message = machine.next() => match message {
                None => break,
                Some(WsMessage::Text(text)) => Message::Text(text.into()),
                Some(WsMessage::Close(code, reason)) => close(connection.close_code(code), reason),
            },
        };
        let last = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || last {
            break;
        }
    }
}

fn close(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

enum Phase {
    /// No `connection_init` yet.
    Waiting,
    /// `connection_init` came and is being checked (or was refused).
    InitReceived,
    Open(Arc<Session>),
}

/// What the parts of one socket share.
struct Connection {
    state: Arc<AppState>,
    client_ip: IpAddr,
    phase: watch::Sender<Phase>,
    /// The close code of a refused `connection_init` (async-graphql closes it with 1002).
    refusal: OnceLock<u16>,
    /// One permit per operation in flight.
    operations: Arc<Semaphore>,
}

impl Connection {
    /// Checks `connection_init`: the token, the user's place among their sockets, their
    /// membership.
    async fn init(&self, payload: serde_json::Value) -> async_graphql::Result<Data> {
        self.phase.send_replace(Phase::InitReceived);
        let token =
            access_token(&payload).ok_or_else(|| self.refuse(FORBIDDEN, "no access token"))?;
        let identity = self
            .state
            .verify_user(token)
            .map_err(|_| self.refuse(FORBIDDEN, "invalid, expired or revoked access token"))?;
        let slot = self.state.sockets.open(identity.user_id).map_err(|limit| {
            let why = format!("too many open sockets for this user (at most {limit})");
            self.refuse(TOO_MANY, &why)
        })?;
        let session = Arc::new(Session::new(
            self.state.clone(),
            identity,
            self.client_ip,
            slot,
        ));
        if let Err(e) = session.check().await {
            return Err(self.refuse(FORBIDDEN, &e.to_string()));
        }
        self.phase.send_replace(Phase::Open(session));
        Ok(Data::default())
    }

    fn refuse(&self, code: u16, why: &str) -> async_graphql::Error {
        let _ = self.refusal.set(code);
        async_graphql::Error::new(why)
    }

    fn close_code(&self, code: u16) -> u16 {
        match self.refusal.get() {
            Some(&refusal) if code == 1002 => refusal,
            _ => code,
        }
    }

    /// Resolves when the server closes the socket, with the code and reason: no
    /// `connection_init` in time, or the end of the session it opened.
    async fn closed(&self, init_timeout: Duration) -> (u16, String) {
        let mut phase = self.phase.subscribe();
        let received = phase.wait_for(|p| !matches!(p, Phase::Waiting));
        if tokio::time::timeout(init_timeout, received).await.is_err() {
            return (INIT_TIMEOUT, "Connection initialisation timeout".into());
        }
        let session = match &*phase
            .wait_for(|p| matches!(p, Phase::Open(_)))
            .await
            .expect("the connection keeps its phase")
        {
            Phase::Open(session) => session.clone(),
            _ => unreachable!("waited for an open session"),
        };
        (FORBIDDEN, session.ended().await)
    }

    /// Runs one operation within the socket's limit, after checking the session.
    fn operation(
        &self,
        schema: &AppSchema,
        request: Request,
        data: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        let session = match &*self.phase.borrow() {
            Phase::Open(session) => session.clone(),
            _ => {
                let error = Error::Unauthenticated("the connection is not initialised".into());
                return stream::once(std::future::ready(error_response(&error))).boxed();
            }
        };
        let Ok(permit) = self.operations.clone().try_acquire_owned() else {
            let limit = self.state.config.ws_max_subscriptions;
            return stream::once(std::future::ready(too_many_operations(limit))).boxed();
        };
        let caller = session.request_context(None).caller();
        if let Err(over) = self.state.budget.request(caller) {
            let error = Error::RateLimited {
                retry_after_secs: over.retry_after.as_secs().max(1),
            };
            return stream::once(std::future::ready(error_response(&error))).boxed();
        }
        let schema = schema.clone();
        stream::once(async move {
            match session.check().await {
                Ok(tenant) => {
                    let request = request.data(session.request_context(tenant));
                    session.guard(Executor::execute_stream(&schema, request, data))
                }
                Err(e) => session.refuse(e),
            }
        })
        .flatten()
        .map(move |answer| {
            let _in_flight = &permit;
            answer
        })
        .boxed()
    }
}

fn too_many_operations(limit: usize) -> Response {
    let error = async_graphql::Error::new(format!(
        "too many operations at once on this socket (at most {limit}); complete one first"
    ))
    .extend_with(|_, ext| {
        ext.set("code", "RATE_LIMITED");
        ext.set("limit", "ws_max_subscriptions");
    });
    graphql_error_response(error)
}

/// The token of a `connection_init` payload.
fn access_token(payload: &serde_json::Value) -> Option<&str> {
    payload
        .get("accessToken")
        .and_then(|v| v.as_str())
        .or_else(|| {
            payload
                .get("authorization")
                .or_else(|| payload.get("Authorization"))
                .and_then(|v| v.as_str())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
}

/// The schema, behind the socket's session and limits.
#[derive(Clone)]
struct SocketExecutor {
    schema: AppSchema,
    connection: Arc<Connection>,
}

impl Executor for SocketExecutor {
    async fn execute(&self, request: Request) -> Response {
        self.execute_stream(request, None)
            .next()
            .await
            .unwrap_or_default()
    }

    fn execute_stream(
        &self,
        request: Request,
        session_data: Option<Arc<Data>>,
    ) -> BoxStream<'static, Response> {
        self.connection
            .operation(&self.schema, request, session_data)
    }
}

/// A sink that hands messages to a writer task, which writes whatever is queued and then
/// flushes once. async-graphql flushes after every message; a subscription that
/// delivers a burst of log lines would cost a write to the socket per line.
fn batched<S>(sink: S) -> tokio_util::sync::PollSender<Message>
where
    S: futures_util::Sink<Message> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(SOCKET_QUEUE);
    tokio::spawn(async move {
        let mut sink = std::pin::pin!(sink);
        while let Some(message) = rx.recv().await {
            if sink.feed(message).await.is_err() {
                return;
            }
            while let Ok(message) = rx.try_recv() {
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    tokio_util::sync::PollSender::new(tx)
}
