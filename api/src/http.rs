//! HTTP routes around the GraphQL schema: request parsing with size limits, GraphiQL,
//! the console, health and users' package downloads; the worker endpoints are merged in
//! from `worker_api`.

use std::net::SocketAddr;
use std::sync::Arc;

use async_graphql::http::{GraphiQLSource, MultipartOptions, receive_batch_body};
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse, GraphQLWebSocket};
use axum::Json;
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cloudtask_catalogue::Scope;
use cloudtask_core::Error;
use serde_json::json;

use crate::AppState;
use crate::auth::{Identity, bearer};
use crate::download::{PackageSha, archive};
use crate::error::HttpError;
use crate::graphql::{AppSchema, Audience, RequestContext, build_schema};

#[derive(Clone)]
struct Http {
    state: Arc<AppState>,
    schema: AppSchema,
    /// For requests without a valid access token (see [`Audience`]).
    anonymous: AppSchema,
}

/// Every route of the API.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let http = Http {
        schema: build_schema(Some(state.clone()), Audience::SignedIn),
        anonymous: build_schema(Some(state.clone()), Audience::Anonymous),
        state: state.clone(),
    };
    axum::Router::new()
        .route("/graphql", post(graphql).get(graphql_get))
        .route("/graphql/ws", get(graphql_ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/packages/{sha256}", get(user_package))
        .merge(crate::console::routes())
        .with_state(http)
        .merge(crate::worker_api::routes(state))
}

fn verify_user(state: &AppState, headers: &HeaderMap) -> Option<Result<Identity, String>> {
    bearer(headers).map(|token| {
        state.keys.verify_access(token).map_err(|e| match e {
            Error::Unauthenticated(why) => why,
            other => other.to_string(),
        })
    })
}

/// A GraphQL-shaped error for requests refused before they reach the schema.
fn graphql_refusal(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(json!({ "errors": [{ "message": message, "extensions": { "code": code } }] })),
    )
        .into_response()
}

async fn graphql(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let config = &http.state.config;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let multipart = content_type.is_some_and(|ct| ct.starts_with("multipart/"));
    // Uploads may be as large as a package (plus the operations part); anything else is
    // a query and stays small. A package above its limit but within this one is read and
    // refused by the resolver with BAD_USER_INPUT naming the field.
    let limit = if multipart {
        (config.max_package_bytes as usize)
            .saturating_mul(2)
            .saturating_add(1 << 20)
    } else {
        config.max_request_bytes as usize
    };
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) if stalled(&e) => {
            return graphql_refusal(
                StatusCode::REQUEST_TIMEOUT,
                "BAD_USER_INPUT",
                "the request body stalled".into(),
            );
        }
        Err(_) => {
            return graphql_refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BAD_USER_INPUT",
                format!("request body larger than {limit} bytes"),
            );
        }
    };
    let options = MultipartOptions::default()
        .max_file_size(limit)
        .max_num_files(4);
    let batch = match receive_batch_body(content_type, &bytes[..], options).await {
        Ok(batch) => batch,
        Err(e) => {
            return graphql_refusal(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", e.to_string());
        }
    };
    let auth = verify_user(&http.state, &headers);
    let schema = match auth {
        Some(Ok(_)) => &http.schema,
        _ => &http.anonymous,
    };
    let batch = batch.data(RequestContext::new(auth, peer.ip()));
    let response = schema.execute_batch(batch).await;
    GraphQLResponse::from(response).into_response()
}

/// Whether reading a body failed because the client stopped sending it
/// (`http_body_idle_timeout_secs`, see `serve`).
fn stalled(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// GraphQL over WebSocket (`graphql-transport-ws`, and the legacy `graphql-ws`). The
/// access token comes in `connection_init` (`{"accessToken": "…"}` or
/// `{"authorization": "Bearer …"}`); without a valid one the socket is closed with the
/// protocol's refusal (4403 on `graphql-transport-ws`) before any operation runs.
async fn graphql_ws(
    State(http): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    let state = http.state.clone();
    let schema = http.schema.clone();
    upgrade
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        .on_upgrade(move |socket| {
            use futures_util::{SinkExt, StreamExt};
            let (sink, stream) = socket.split();
            // async-graphql closes a refused `connection_init` with 1002; the protocol
            // says 4403 (Forbidden).
            let sink = sink.with(|message: Message| async move {
                Ok::<_, axum::Error>(match message {
                    Message::Close(Some(frame))
                        if frame.code == 1002 && frame.reason.starts_with(REFUSED) =>
                    {
                        Message::Close(Some(CloseFrame {
                            code: 4403,
                            reason: frame.reason,
                        }))
                    }
                    other => other,
                })
            });
            let sink = batched(sink);
            GraphQLWebSocket::new_with_pair(sink, stream, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let refused = |why: &str| async_graphql::Error::new(format!("{REFUSED}{why}"));
                    let token = payload
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
                        .ok_or_else(|| refused("no access token"))?;
                    let identity = state
                        .keys
                        .verify_access(token)
                        .map_err(|_| refused("invalid or expired access token"))?;
                    let mut data = async_graphql::Data::default();
                    data.insert(RequestContext::new(Some(Ok(identity)), peer.ip()));
                    Ok(data)
                })
                .serve()
        })
}

/// Messages a socket may have queued for its writer.
const SOCKET_QUEUE: usize = 256;

/// A sink that hands messages to a writer task, which writes whatever is queued and then
/// flushes once. async-graphql flushes after every message; a subscription that
/// delivers a burst of log lines would cost a write to the socket per line.
fn batched<S>(sink: S) -> tokio_util::sync::PollSender<Message>
where
    S: futures_util::Sink<Message> + Send + 'static,
{
    use futures_util::SinkExt;
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

/// The reason prefix of a refused `connection_init`.
const REFUSED: &str = "forbidden: ";

/// `GET /graphql`: GraphiQL for a browser; a WebSocket upgrade is served as on
/// `/graphql/ws`, for clients that use one URL for queries and subscriptions.
async fn graphql_get(
    http: State<Http>,
    peer: ConnectInfo<SocketAddr>,
    protocol: Result<GraphQLProtocol, StatusCode>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match (upgrade, protocol) {
        (Err(_), _) => graphiql().await.into_response(),
        (Ok(upgrade), Ok(protocol)) => graphql_ws(http, peer, protocol, upgrade).await,
        (Ok(_), Err(status)) => status.into_response(),
    }
}

/// GraphiQL loads its scripts and styles from unpkg and talks to this origin only.
const GRAPHIQL_CSP: &str = "default-src 'none'; script-src https://unpkg.com 'unsafe-inline'; \
    style-src https://unpkg.com 'unsafe-inline'; img-src https://graphql.org data:; \
    font-src https://unpkg.com data:; connect-src 'self' ws: wss:; frame-ancestors 'none'";

async fn graphiql() -> Response {
    let page = GraphiQLSource::build()
        .endpoint("/graphql")
        .subscription_endpoint("/graphql/ws")
        .finish();
    (
        [(header::CONTENT_SECURITY_POLICY, GRAPHIQL_CSP)],
        Html(page),
    )
        .into_response()
}

async fn readyz(State(http): State<Http>) -> Response {
    match http.state.catalogue.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response(),
    }
}

/// A user downloads one of their tenant's packages with their access token.
async fn user_package(
    State(http): State<Http>,
    headers: HeaderMap,
    PackageSha(sha256): PackageSha,
) -> Result<Response, HttpError> {
    let identity = match verify_user(&http.state, &headers) {
        None => return Err(Error::Unauthenticated("no access token".into()).into()),
        Some(Err(why)) => return Err(Error::Unauthenticated(why).into()),
        Some(Ok(identity)) => identity,
    };
    let tenant_id = identity
        .tenant_id
        .ok_or_else(|| Error::Forbidden("this token names no tenant".into()))?;
    let handle = http
        .state
        .catalogue
        .tenant(Scope {
            tenant_id,
            user_id: identity.user_id,
            actor: identity.user_id.to_string(),
        })
        .await?;
    Ok(archive(handle.package_content(&sha256).await?))
}
