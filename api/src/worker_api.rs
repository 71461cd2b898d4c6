//! The worker-facing endpoints (`/worker/*`; bodies in `cloudtask_core::protocol`). A
//! worker joins its cluster with the join token, then presents the credential it got on
//! every other request: [`ClusterWorker`] verifies it and hands the endpoint the cluster's
//! catalogue handle, the only data it may reach. Errors answer through [`HttpError`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Extension, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::{get, post};
use cloudtask_catalogue::ClusterHandle;
use cloudtask_core::Error;
use cloudtask_core::ids::{RunId, TaskId, WorkerId};
use cloudtask_core::protocol::{
    Claim, ClaimAnswer, ClaimAnswers, ClaimBatch, Claimed, FireCursor, JoinRequest, JoinedCluster,
    MAX_CLAIM_BATCH, MAX_REPORT_BODY_BYTES, ReportBatch, StartRequest, Started, TaskEnv,
    ZooKeeperIdentity,
};
use cloudtask_core::run::RunStatus;

use crate::AppState;
use crate::auth::{WorkerIdentity, bearer, token_hash};
use crate::budget::Caller;
use crate::client_addr::ClientAddr;
use crate::cluster_view::ClusterView;
use crate::download::{PackageSha, archive};
use crate::error::HttpError;

type Answer<T> = Result<T, HttpError>;

/// The worker endpoints, with their state.
pub fn routes(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/worker/join", post(join))
        .route("/worker/packages/{sha256}", get(package))
        .route("/worker/claims", post(claim))
        .route("/worker/claims/batch", post(claim_batch))
        .route("/worker/tasks/{task_id}/cursor", get(fire_cursor))
        .route("/worker/runs/{run_id}/start", post(start))
        .route(
            "/worker/reports",
            post(reports).layer(DefaultBodyLimit::max(MAX_REPORT_BODY_BYTES)),
        )
        .with_state(state)
}

/// A worker whose credential was verified: it acts for this one cluster.
pub struct ClusterWorker {
    pub identity: WorkerIdentity,
    pub cluster: ClusterHandle,
}

impl FromRequestParts<Arc<AppState>> for ClusterWorker {
    type Rejection = HttpError;

    /// A missing or wrong credential spends its address's anonymous request budget
    /// (`rate_anonymous_requests_per_minute`): past it, RATE_LIMITED instead of
    /// UNAUTHENTICATED. A valid credential is never throttled here.
    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Answer<Self> {
        let verified = bearer(&parts.headers)
            .ok_or_else(|| Error::Unauthenticated("no credential".into()))
            .and_then(|token| state.keys.verify_worker(token));
        let identity = match verified {
            Ok(identity) => identity,
            Err(refused) => {
                if let Some(ClientAddr(ip)) = parts.extensions.get::<ClientAddr>()
                    && let Err(over) = state.budget.request(Caller::anonymous(*ip))
                {
                    return Err(Error::RateLimited {
                        retry_after_secs: over.retry_after.as_secs().max(1),
                    }
                    .into());
                }
                return Err(refused.into());
            }
        };
        Ok(ClusterWorker {
            identity,
            cluster: state.catalogue.cluster(identity.cluster_id),
        })
    }
}

/// The limiter's one "account" for every join.
const JOIN_ACCOUNT: &str = "join tokens";

/// A worker exchanges its cluster's join token for a credential scoped to that cluster.
/// Join tokens are guessed like passwords: a wrong one counts against the client's
/// address (`login_max_attempts` per `login_window_secs`, then RATE_LIMITED, which a
/// worker retries later); all joins share one "account", so a stranger's guessing slows
/// joins down (at most `login_account_max_delay_secs`) but never refuses a right token.
async fn join(
    State(state): State<Arc<AppState>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    Json(request): Json<JoinRequest>,
) -> Answer<Json<JoinedCluster>> {
    let attempt = state.joins.start(JOIN_ACCOUNT, client)?;
    tokio::time::sleep(attempt.delay()).await;
    let cluster = match state
        .catalogue
        .cluster_by_join_token(&token_hash(&request.token))
        .await
    {
        Ok(Some(cluster)) => {
            attempt.succeeded();
            cluster
        }
        // Dropped unsettled, the attempt stays counted as a failure.
        Ok(None) => return Err(Error::Unauthenticated("unknown join token".into()).into()),
        Err(e) => {
            attempt.unchecked();
            return Err(e.into());
        }
    };
    let issued =
        state
            .keys
            .issue_worker(cluster.tenant_id, cluster.id, chrono::Duration::hours(12))?;
    // The cluster's ZooKeeper identity for its current token (the scheduler derives the
    // same one for the cluster's ACLs).
    let zookeeper = state
        .zookeeper
        .worker_credential(cluster.id, cluster.token_rotated_at)
        .zip(state.zookeeper.owner_id())
        .map(|(credential, owner_id)| ZooKeeperIdentity {
            user: credential.user().to_owned(),
            password: credential.password().to_owned(),
            owner_id: owner_id.to_owned(),
        });
    Ok(Json(JoinedCluster {
        credential: issued.token,
        expires_at: issued.expires_at,
        tenant_id: cluster.tenant_id,
        cluster_id: cluster.id,
        zookeeper,
    }))
}

/// A worker downloads a package used by a task of its own cluster.
async fn package(PackageSha(sha256): PackageSha, worker: ClusterWorker) -> Answer<Response> {
    let content = worker
        .cluster
        .package_content(&sha256)
        .await?
        .ok_or(Error::NotFound("package"))?;
    Ok(archive(content))
}

/// A worker claims one fire before it starts a process: the run is inserted under its
/// unique key, or the claim is refused (CONFLICT: claimed already, paused, stale version,
/// or the task is not this worker's any more).
async fn claim(
    State(state): State<Arc<AppState>>,
    worker: ClusterWorker,
    Json(claim): Json<Claim>,
) -> Answer<Json<Claimed>> {
    let (run_id, env) = claim_all(&state.cluster_view, &worker, vec![claim])
        .await?
        .pop()
        .expect("one answer per claim")?;
    Ok(Json(Claimed { run_id, env }))
}

/// Many claims in one request and one transaction, each answered on its own.
async fn claim_batch(
    State(state): State<Arc<AppState>>,
    worker: ClusterWorker,
    Json(batch): Json<ClaimBatch>,
) -> Answer<Json<ClaimAnswers>> {
    if batch.claims.len() > MAX_CLAIM_BATCH {
        return Err(Error::bad_input(
            "claims",
            format!("at most {MAX_CLAIM_BATCH} claims per request"),
        )
        .into());
    }
    let answers = claim_all(&state.cluster_view, &worker, batch.claims)
        .await?
        .into_iter()
        .map(|answer| match answer {
            Ok((run_id, env)) => ClaimAnswer::Claimed { run_id, env },
            Err(e) => ClaimAnswer::Refused {
                code: e.code().to_owned(),
                message: e.to_string(),
            },
        })
        .collect();
    Ok(Json(ClaimAnswers { answers }))
}

/// Claims of a cluster's worker. A stale owner (the task moved while it was cut off) must
/// not start a fire: RUNNING claims of tasks not assigned to the claiming worker are
/// refused; when ZooKeeper cannot be asked, the unique key alone still keeps each fire
/// single. Records of fires that were not run (SKIPPED) are accounting, taken from any
/// worker of the cluster: the task may have moved since (paused, failed over), and the
/// unique key still keeps one record per fire. A claimed fire's answer carries its task's
/// environment (at the claimed version: a claim of another version is refused).
async fn claim_all(
    cluster_view: &ClusterView,
    worker: &ClusterWorker,
    claims: Vec<Claim>,
) -> Result<Vec<Result<(RunId, TaskEnv), Error>>, Error> {
    let tasks: Vec<TaskId> = claims
        .iter()
        .filter(|c| c.status == RunStatus::Running)
        .map(|c| c.task_id)
        .collect();
    let answers = claim_runs(cluster_view, worker, claims).await?;
    let mut envs = worker.cluster.task_envs(&tasks).await?;
    Ok(answers
        .into_iter()
        .map(|answer| {
            answer.map(|(run_id, task)| {
                let env = task
                    .and_then(|task| envs.get_mut(&task))
                    .map(|(_, env)| std::mem::take(env))
                    .unwrap_or_default();
                (run_id, env)
            })
        })
        .collect())
}

/// A claimed fire's run, and its task when the claim starts it (RUNNING).
type ClaimedRun = (RunId, Option<TaskId>);

/// The runs of `claims`, or why each was refused.
async fn claim_runs(
    cluster_view: &ClusterView,
    worker: &ClusterWorker,
    claims: Vec<Claim>,
) -> Result<Vec<Result<ClaimedRun, Error>>, Error> {
    let cluster = worker.identity.cluster_id;
    // Refusals first; the rest is answered by the catalogue.
    let mut answers: Vec<Option<Result<ClaimedRun, Error>>> = claims.iter().map(|_| None).collect();
    let mut by_worker: HashMap<&WorkerId, Vec<TaskId>> = HashMap::new();
    for claim in claims.iter().filter(|c| c.status == RunStatus::Running) {
        by_worker
            .entry(&claim.worker)
            .or_default()
            .push(claim.task_id);
    }
    for (name, tasks) in by_worker {
        match cluster_view.owned(cluster, name, &tasks).await {
            Ok(owned) => {
                for (claim, answer) in claims.iter().zip(answers.iter_mut()) {
                    if claim.status == RunStatus::Running
                        && &claim.worker == name
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
        let recorded = worker.cluster.claim_runs(&asked).await?;
        for ((position, answer), claim) in positions.into_iter().zip(recorded).zip(&asked) {
            let running = (claim.status == RunStatus::Running).then_some(claim.task_id);
            answers[position] = Some(answer.map(|run| (run.id, running)));
        }
    }
    let answers = answers
        .into_iter()
        .map(|a| a.expect("every claim answered"))
        .collect();
    Ok(answers)
}

/// Where a worker taking a task over starts accounting for missed fires.
async fn fire_cursor(
    worker: ClusterWorker,
    Path(task_id): Path<String>,
) -> Answer<Json<FireCursor>> {
    let task_id = task_id.parse().map_err(|_| Error::NotFound("task"))?;
    let since = worker.cluster.fire_cursor(task_id).await?;
    Ok(Json(FireCursor { since }))
}

/// A worker starts a queued run it was handed (QUEUED → RUNNING, once): a manual run,
/// or the next attempt of a fire lost with its worker.
async fn start(
    worker: ClusterWorker,
    Path(run_id): Path<String>,
    Json(request): Json<StartRequest>,
) -> Answer<Json<Started>> {
    let run_id: RunId = run_id.parse().map_err(|_| Error::NotFound("run"))?;
    let run = worker
        .cluster
        .start_queued_run(run_id, &request.worker)
        .await?;
    let env = worker
        .cluster
        .task_envs(&[run.task_id])
        .await?
        .remove(&run.task_id)
        .map(|(_, env)| env)
        .unwrap_or_default();
    Ok(Json(Started {
        run_id: run.id,
        scheduled_at: run.scheduled_at,
        attempt: run.attempt,
        trigger: run.trigger,
        env,
    }))
}

/// Log lines and outcomes of any of the cluster's runs, in one request and one
/// transaction; idempotent like the per-run endpoints. Bodies up to
/// `MAX_REPORT_BODY_BYTES` (413 past it: the worker splits the batch and sends it again).
async fn reports(worker: ClusterWorker, Json(batch): Json<ReportBatch>) -> Answer<StatusCode> {
    worker.cluster.ingest_reports(&batch.reports).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use cloudtask_catalogue::Catalogue;
    use cloudtask_coord::memory::MemoryCoordinator;
    use cloudtask_core::config::Config;
    use cloudtask_core::ids::{ClusterId, TenantId, UserId};
    use tower::ServiceExt;

    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    async fn state() -> Arc<AppState> {
        let catalogue = Catalogue::connect("sqlite::memory:").await.unwrap();
        let config = Config {
            jwt_secret: Some("a test secret of at least 32 bytes".into()),
            ..Config::default()
        };
        AppState::with_coordinator(catalogue, config, Arc::new(MemoryCoordinator::default()))
            .unwrap()
    }

    /// The answer's status and body text.
    async fn send(state: &Arc<AppState>, request: Request<Body>) -> (u16, String) {
        let response = routes(state.clone()).oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn get(uri: &str, bearer: Option<&str>) -> Request<Body> {
        let mut request = Request::get(uri);
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn refusals_keep_their_status_and_body() {
        let state = state().await;
        let unauthenticated = (
            401,
            r#"{"code":"UNAUTHENTICATED","error":"authentication required"}"#.to_owned(),
        );
        // A malformed hash is not found before the credential is looked at.
        assert_eq!(
            send(&state, get("/worker/packages/nothex", None)).await,
            (
                404,
                r#"{"code":"NOT_FOUND","error":"package not found"}"#.to_owned()
            )
        );
        let package = format!("/worker/packages/{SHA}");
        assert_eq!(send(&state, get(&package, None)).await, unauthenticated);
        let user = state
            .keys
            .issue_access(UserId::new(), None, false, None)
            .unwrap();
        assert_eq!(
            send(&state, get(&package, Some(&user.token))).await,
            unauthenticated
        );

        let worker = state
            .keys
            .issue_worker(
                TenantId::new(),
                ClusterId::new(),
                chrono::Duration::hours(1),
            )
            .unwrap();
        assert_eq!(
            send(
                &state,
                get("/worker/tasks/nope/cursor", Some(&worker.token))
            )
            .await,
            (
                404,
                r#"{"code":"NOT_FOUND","error":"task not found"}"#.to_owned()
            )
        );
        let claim = Claim {
            task_id: TaskId::new(),
            scheduled_at: chrono::Utc::now(),
            attempt: 0,
            task_version: 1,
            worker: "w1".parse().unwrap(),
            trigger: cloudtask_core::run::RunTrigger::Schedule,
            status: RunStatus::Skipped,
            reason: None,
        };
        let too_many = ClaimBatch {
            claims: vec![claim; MAX_CLAIM_BATCH + 1],
        };
        let request = Request::post("/worker/claims/batch")
            .header("authorization", format!("Bearer {}", worker.token))
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&too_many).unwrap()))
            .unwrap();
        assert_eq!(
            send(&state, request).await,
            (
                400,
                r#"{"code":"BAD_USER_INPUT","error":"invalid claims: at most 1000 claims per request"}"#
                    .to_owned()
            )
        );
    }
}
