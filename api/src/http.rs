//! HTTP routes around the GraphQL schema: request parsing with size limits, GraphiQL,
//! the console, health and users' package downloads; the worker endpoints are merged in
//! from `worker_api`.

use std::sync::Arc;

use async_graphql::http::{GraphiQLSource, MultipartOptions, receive_batch_body};
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse};
use axum::Json;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cloudtask_core::Error;
use serde_json::json;

use crate::AppState;
use crate::auth::{Identity, bearer};
use crate::client_addr::ClientAddr;
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
        state.verify_user(token).map_err(|e| match e {
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

/// Every `POST /graphql` has an id: the caller's `X-Request-Id` when it is a plain token
/// (1 to 64 letters, digits, `.`, `_`, `-`, `:`), a new one otherwise. It is in the span
/// of everything logged while the request is served, in the answer's `X-Request-Id`
/// header, and in the `extensions.requestId` of each of its GraphQL errors.
async fn graphql(
    http: State<Http>,
    client: Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    use tracing::Instrument;
    let id = crate::graphql::RequestId::from_header(
        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
    );
    let span = tracing::info_span!("graphql", request_id = %id.0);
    let mut response = graphql_request(http, client, headers, body, id.clone())
        .instrument(span)
        .await;
    if let Ok(value) = header::HeaderValue::from_str(&id.0) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn graphql_request(
    State(http): State<Http>,
    Extension(ClientAddr(client_ip)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
    id: crate::graphql::RequestId,
) -> Response {
    let config = &http.state.config;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let auth = verify_user(&http.state, &headers);
    let caller = crate::budget::Caller::of(&auth, client_ip);
    if let Err(over) = http.state.budget.request(caller) {
        return rate_limited(&over);
    }
    let batch = if content_type.is_some_and(|ct| ct.starts_with("multipart/")) {
        receive_upload(&http.state, &auth, content_type, body).await
    } else {
        receive_query(config, content_type, body).await
    };
    let batch = match batch {
        Ok(batch) => batch,
        Err(refusal) => return refusal,
    };
    if let async_graphql::BatchRequest::Batch(items) = &batch
        && items.len() > config.query_max_batch
    {
        return graphql_refusal(
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
            format!(
                "a batch of {} operations; at most {} are allowed",
                items.len(),
                config.query_max_batch
            ),
        );
    }
    let schema = match auth {
        Some(Ok(_)) => &http.schema,
        _ => &http.anonymous,
    };
    let spent = crate::graphql::cost::Spent::default();
    let batch = batch
        .data(RequestContext::new(auth, client_ip))
        .data(spent.clone())
        .data(id);
    let response = schema.execute_batch(batch).await;
    // A big answer is written off the async workers (other requests go on meanwhile),
    // within the caller's turn when it was heavy (`spent` holds it until then).
    let written = if spent.answer_bytes() < BIG_ANSWER {
        GraphQLResponse::from(response).into_response()
    } else {
        tokio::task::spawn_blocking(move || GraphQLResponse::from(response).into_response())
            .await
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    };
    drop(spent);
    written
}

/// Answers with more text than this are written on a blocking thread.
const BIG_ANSWER: usize = 1 << 20;

/// A caller past its requests per minute: 429 with when to retry.
fn rate_limited(over: &crate::budget::OverBudget) -> Response {
    let secs = over.retry_after.as_secs().max(1);
    let mut answer = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({ "errors": [{
            "message": over.message(),
            "extensions": { "code": "RATE_LIMITED", "retryAfterSeconds": secs },
        }] })),
    )
        .into_response();
    answer
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    answer
}

/// A query: small (`max_request_bytes`), read whole.
async fn receive_query(
    config: &cloudtask_core::config::Config,
    content_type: Option<&str>,
    body: Body,
) -> Result<async_graphql::BatchRequest, Response> {
    let limit = config.max_request_bytes as usize;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(e) if stalled(&e) => {
            return Err(graphql_refusal(
                StatusCode::REQUEST_TIMEOUT,
                "BAD_USER_INPUT",
                "the request body stalled".into(),
            ));
        }
        Err(_) => {
            return Err(graphql_refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BAD_USER_INPUT",
                format!("request body larger than {limit} bytes"),
            ));
        }
    };
    receive_batch_body(content_type, &bytes[..], MultipartOptions::default())
        .await
        .map_err(|e| graphql_refusal(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", e.to_string()))
}

/// An upload (a GraphQL multipart request). Only a signed-in caller's body is read at
/// all, at most `max_uploads_in_flight` at once, and it is streamed: async-graphql writes
/// each file part to a temporary file as it arrives, so memory does not grow with the
/// body. The body may be as large as a package plus the operations part; a package above
/// its limit but within this one is refused by the resolver with BAD_USER_INPUT naming
/// the field.
async fn receive_upload(
    state: &Arc<AppState>,
    auth: &Option<Result<Identity, String>>,
    content_type: Option<&str>,
    body: Body,
) -> Result<async_graphql::BatchRequest, Response> {
    use futures_util::{StreamExt, TryStreamExt};
    if !matches!(auth, Some(Ok(_))) {
        return Err(graphql_refusal(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "authentication required: uploads need a valid access token".into(),
        ));
    }
    let Ok(_slot) = state.uploads.clone().try_acquire_owned() else {
        return Err(graphql_refusal(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            "too many uploads in flight; try again shortly".into(),
        ));
    };
    let limit = (state.config.max_package_bytes as usize)
        .saturating_mul(2)
        .saturating_add(1 << 20);
    // Why the body stopped, when it did: over the limit, or stalled.
    let mut read = 0usize;
    let stopped_at = std::sync::Arc::new(std::sync::Mutex::new(None));
    let why = stopped_at.clone();
    let stream = body.into_data_stream().map(move |chunk| {
        let status = match chunk {
            Ok(chunk) if read + chunk.len() <= limit => {
                read += chunk.len();
                return Ok(chunk);
            }
            Ok(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Err(e) if stalled(&e) => StatusCode::REQUEST_TIMEOUT,
            Err(_) => StatusCode::BAD_REQUEST,
        };
        *why.lock().expect("upload status") = Some(status);
        Err(std::io::Error::other("the upload's body stopped"))
    });
    let options = MultipartOptions::default()
        .max_file_size(limit)
        .max_num_files(4);
    let received = receive_batch_body(content_type, stream.into_async_read(), options).await;
    received.map_err(|e| match *stopped_at.lock().expect("upload status") {
        Some(StatusCode::PAYLOAD_TOO_LARGE) => graphql_refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BAD_USER_INPUT",
            format!("request body larger than {limit} bytes"),
        ),
        Some(StatusCode::REQUEST_TIMEOUT) => graphql_refusal(
            StatusCode::REQUEST_TIMEOUT,
            "BAD_USER_INPUT",
            "the request body stalled".into(),
        ),
        _ => graphql_refusal(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", e.to_string()),
    })
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

/// The largest message a client may send on a socket: what a GraphQL request over HTTP
/// may carry (axum's body limit). A larger one ends the connection; the default (64 MiB a
/// message, held in memory whole) let every socket cost that much.
const SOCKET_MAX_MESSAGE: usize = 2 << 20;
/// How much a socket reads at once. Clients say little (operations, pongs), while every
/// event sent polls the reader: with the default (128 KiB, zeroed before each read) a
/// followed log at 50,000 lines/s spent a tenth of the server's time clearing buffers.
const SOCKET_READ_BUFFER: usize = 8 << 10;

/// GraphQL over WebSocket: see [`crate::sockets`]. `_protocol` refuses (400) an upgrade
/// that asks for no GraphQL subprotocol.
async fn graphql_ws(
    State(http): State<Http>,
    Extension(ClientAddr(client_ip)): Extension<ClientAddr>,
    _protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    let state = http.state.clone();
    let schema = http.schema.clone();
    upgrade
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(SOCKET_MAX_MESSAGE)
        .max_frame_size(SOCKET_MAX_MESSAGE)
        .read_buffer_size(SOCKET_READ_BUFFER)
        .on_upgrade(move |socket| crate::sockets::serve(socket, state, schema, client_ip))
}

/// `GET /graphql`: GraphiQL for a browser; a WebSocket upgrade is served as on
/// `/graphql/ws`, for clients that use one URL for queries and subscriptions.
async fn graphql_get(
    http: State<Http>,
    client: Extension<ClientAddr>,
    protocol: Result<GraphQLProtocol, StatusCode>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match (upgrade, protocol) {
        (Err(_), _) => graphiql().await.into_response(),
        (Ok(upgrade), Ok(protocol)) => graphql_ws(http, client, protocol, upgrade).await,
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
    let handle = http.state.tenant(&identity, tenant_id).await?;
    Ok(archive(handle.package_content(&sha256).await?))
}
