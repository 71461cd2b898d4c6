//! HTTP routes around the GraphQL schema: request parsing with size limits, GraphiQL,
//! the console, health, package downloads, and the worker endpoints.

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::http::{GraphiQLSource, MultipartOptions, receive_batch_body};
use async_graphql_axum::{GraphQLProtocol, GraphQLResponse};
use axum::Json;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cloudtask_catalogue::Scope;
use cloudtask_core::Error;
use cloudtask_core::ids::{ClusterId, RunId, TaskId};
use cloudtask_core::protocol::{
    Claim, ClaimAnswer, ClaimAnswers, ClaimBatch, Claimed, ErrorBody, FireCursor, JoinRequest,
    JoinedCluster, MAX_CLAIM_BATCH, ReportBatch, StartRequest, Started,
};
use cloudtask_core::run::RunStatus;
use cloudtask_core::task::is_sha256_hex;
use serde::Serialize;
use serde_json::json;

use crate::AppState;
use crate::auth::{Identity, WorkerIdentity, token_hash};
use crate::client_addr::ClientAddr;
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
        state,
    };
    axum::Router::new()
        .route("/graphql", post(graphql).get(graphql_get))
        .route("/graphql/ws", get(graphql_ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/packages/{sha256}", get(user_package))
        .route("/worker/join", post(worker_join))
        .route("/worker/packages/{sha256}", get(worker_package))
        .route("/worker/claims", post(worker_claim))
        .route("/worker/claims/batch", post(worker_claims))
        .route("/worker/tasks/{task_id}/cursor", get(worker_fire_cursor))
        .route("/worker/runs/{run_id}/start", post(worker_start))
        .route("/worker/reports", post(worker_reports))
        .merge(crate::console::routes())
        .with_state(http)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
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
    Extension(ClientAddr(client_ip)): Extension<ClientAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let config = &http.state.config;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let auth = verify_user(&http.state, &headers);
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
    let batch = batch
        .data(RequestContext::new(auth, client_ip))
        .data(crate::graphql::cost::Spent::default());
    let response = schema.execute_batch(batch).await;
    GraphQLResponse::from(response).into_response()
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

fn error_response(e: Error) -> Response {
    let status = match &e {
        Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::BadInput { .. } => StatusCode::BAD_REQUEST,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    let message = match &e {
        Error::Internal(_) => "internal error".to_owned(),
        other => other.to_string(),
    };
    let body = ErrorBody {
        code: e.code().to_owned(),
        error: message,
    };
    (status, Json(body)).into_response()
}

/// A JSON answer, or the error's status and code.
fn json_or_error<T: Serialize>(result: Result<T, Error>) -> Response {
    result
        .map(|r| Json(r).into_response())
        .unwrap_or_else(error_response)
}

fn archive_response(content: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response()
}

fn check_sha(sha256: &str) -> Result<(), Error> {
    if is_sha256_hex(sha256) {
        Ok(())
    } else {
        Err(Error::NotFound("package"))
    }
}

/// A user downloads one of their tenant's packages with their access token.
async fn user_package(
    State(http): State<Http>,
    headers: HeaderMap,
    Path(sha256): Path<String>,
) -> Response {
    let result = async {
        check_sha(&sha256)?;
        let identity = match verify_user(&http.state, &headers) {
            None => return Err(Error::Unauthenticated("no access token".into())),
            Some(Err(why)) => return Err(Error::Unauthenticated(why)),
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
        handle.package_content(&sha256).await
    }
    .await;
    result.map(archive_response).unwrap_or_else(error_response)
}

/// A worker exchanges its cluster's join token for a credential scoped to that cluster.
async fn worker_join(State(http): State<Http>, Json(request): Json<JoinRequest>) -> Response {
    let result = async {
        let cluster = http
            .state
            .catalogue
            .cluster_by_join_token(&token_hash(&request.token))
            .await?
            .ok_or_else(|| Error::Unauthenticated("unknown join token".into()))?;
        let issued = http.state.keys.issue_worker(
            cluster.tenant_id,
            cluster.id,
            chrono::Duration::hours(12),
        )?;
        Ok(JoinedCluster {
            credential: issued.token,
            expires_at: issued.expires_at,
            tenant_id: cluster.tenant_id,
            cluster_id: cluster.id,
        })
    }
    .await;
    json_or_error(result)
}

/// A worker downloads a package used by a task of its own cluster.
async fn worker_package(
    State(http): State<Http>,
    headers: HeaderMap,
    Path(sha256): Path<String>,
) -> Response {
    let result = async {
        check_sha(&sha256)?;
        let worker = verify_worker(&http.state, &headers)?;
        http.state
            .catalogue
            .cluster(worker.cluster_id)
            .package_content(&sha256)
            .await?
            .ok_or(Error::NotFound("package"))
    }
    .await;
    result.map(archive_response).unwrap_or_else(error_response)
}

fn verify_worker(state: &AppState, headers: &HeaderMap) -> Result<WorkerIdentity, Error> {
    let token = bearer(headers).ok_or_else(|| Error::Unauthenticated("no credential".into()))?;
    state.keys.verify_worker(token)
}

fn parse_run_id(text: &str) -> Result<RunId, Error> {
    text.parse().map_err(|_| Error::NotFound("run"))
}

/// A worker claims one fire before it starts a process: the run is inserted under its
/// unique key, or the claim is refused (CONFLICT: claimed already, paused, stale version,
/// or the task is not this worker's any more).
async fn worker_claim(
    State(http): State<Http>,
    headers: HeaderMap,
    Json(claim): Json<Claim>,
) -> Response {
    let result = async {
        let worker = verify_worker(&http.state, &headers)?;
        let run_id = claim_all(&http.state, worker.cluster_id, vec![claim])
            .await?
            .pop()
            .expect("one answer per claim")?;
        Ok(Claimed { run_id })
    }
    .await;
    json_or_error(result)
}

/// Many claims in one request and one transaction, each answered on its own.
async fn worker_claims(
    State(http): State<Http>,
    headers: HeaderMap,
    Json(batch): Json<ClaimBatch>,
) -> Response {
    let result = async {
        let worker = verify_worker(&http.state, &headers)?;
        if batch.claims.len() > MAX_CLAIM_BATCH {
            return Err(Error::bad_input(
                "claims",
                format!("at most {MAX_CLAIM_BATCH} claims per request"),
            ));
        }
        let answers = claim_all(&http.state, worker.cluster_id, batch.claims)
            .await?
            .into_iter()
            .map(|answer| match answer {
                Ok(run_id) => ClaimAnswer::Claimed { run_id },
                Err(e) => ClaimAnswer::Refused {
                    code: e.code().to_owned(),
                    message: e.to_string(),
                },
            })
            .collect();
        Ok(ClaimAnswers { answers })
    }
    .await;
    json_or_error(result)
}

/// Claims of a cluster's worker. A stale owner (the task moved while it was cut off) must
/// not start a fire: RUNNING claims of tasks not assigned to the claiming worker are
/// refused; when ZooKeeper cannot be asked, the unique key alone still keeps each fire
/// single. Records of fires that were not run (SKIPPED) are accounting, taken from any
/// worker of the cluster: the task may have moved since (paused, failed over), and the
/// unique key still keeps one record per fire.
async fn claim_all(
    state: &AppState,
    cluster: ClusterId,
    claims: Vec<Claim>,
) -> Result<Vec<Result<RunId, Error>>, Error> {
    // Refusals first; the rest is answered by the catalogue.
    let mut answers: Vec<Option<Result<RunId, Error>>> = claims.iter().map(|_| None).collect();
    let mut by_worker: HashMap<&str, Vec<TaskId>> = HashMap::new();
    for claim in claims.iter().filter(|c| c.status == RunStatus::Running) {
        by_worker
            .entry(claim.worker.as_str())
            .or_default()
            .push(claim.task_id);
    }
    for (worker, tasks) in by_worker {
        match state.cluster_view.owned(cluster, worker, &tasks).await {
            Ok(owned) => {
                for (claim, answer) in claims.iter().zip(answers.iter_mut()) {
                    if claim.status == RunStatus::Running
                        && claim.worker == worker
                        && !owned.contains(&claim.task_id)
                    {
                        *answer = Some(Err(Error::Conflict(
                            "the task is not assigned to this worker".into(),
                        )));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "claims accepted without an ownership check"),
        }
    }
    let (asked, positions): (Vec<Claim>, Vec<usize>) = claims
        .into_iter()
        .enumerate()
        .filter(|(i, _)| answers[*i].is_none())
        .map(|(i, claim)| (claim, i))
        .unzip();
    if !asked.is_empty() {
        let recorded = state.catalogue.cluster(cluster).claim_runs(&asked).await?;
        for (position, answer) in positions.into_iter().zip(recorded) {
            answers[position] = Some(answer.map(|run| run.id));
        }
    }
    let answers = answers
        .into_iter()
        .map(|a| a.expect("every claim answered"))
        .collect();
    Ok(answers)
}

/// Where a worker taking a task over starts accounting for missed fires.
async fn worker_fire_cursor(
    State(http): State<Http>,
    headers: HeaderMap,
    Path(task_id): Path<String>,
) -> Response {
    let result = async {
        let worker = verify_worker(&http.state, &headers)?;
        let task_id = task_id.parse().map_err(|_| Error::NotFound("task"))?;
        let since = http
            .state
            .catalogue
            .cluster(worker.cluster_id)
            .fire_cursor(task_id)
            .await?;
        Ok(FireCursor { since })
    }
    .await;
    json_or_error(result)
}

/// A worker starts a queued run it was handed (QUEUED → RUNNING, once): a manual run,
/// or the next attempt of a fire lost with its worker.
async fn worker_start(
    State(http): State<Http>,
    headers: HeaderMap,
    Path(run_id): Path<String>,
    Json(request): Json<StartRequest>,
) -> Response {
    let result = async {
        let worker = verify_worker(&http.state, &headers)?;
        let run_id = parse_run_id(&run_id)?;
        let run = http
            .state
            .catalogue
            .cluster(worker.cluster_id)
            .start_queued_run(run_id, &request.worker)
            .await?;
        Ok(Started {
            run_id: run.id,
            scheduled_at: run.scheduled_at,
            attempt: run.attempt,
            trigger: run.trigger,
        })
    }
    .await;
    json_or_error(result)
}

/// Log lines and outcomes of any of the cluster's runs, in one request and one
/// transaction; idempotent like the per-run endpoints.
async fn worker_reports(
    State(http): State<Http>,
    headers: HeaderMap,
    Json(batch): Json<ReportBatch>,
) -> Response {
    let result = async {
        let worker = verify_worker(&http.state, &headers)?;
        http.state
            .catalogue
            .cluster(worker.cluster_id)
            .ingest_reports(&batch.reports)
            .await
    }
    .await;
    result
        .map(|()| StatusCode::NO_CONTENT.into_response())
        .unwrap_or_else(error_response)
}
