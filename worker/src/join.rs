//! Joining a cluster: the worker trades its cluster's join token for a credential scoped
//! to that cluster alone (`POST /worker/join`, DESIGN §8).

use std::time::Duration;

pub use cloudtask_core::protocol::JoinedCluster;
use cloudtask_core::protocol::{ErrorBody, JoinRequest};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token is unknown (mistyped, rotated, or its cluster deleted). Retrying cannot
    /// help.
    #[error(
        "the API at {api_url} refused the cluster join token ({reason}); set \
         CLOUDTASK_CLUSTER_TOKEN to the token shown when the cluster was created or its \
         token was last rotated"
    )]
    BadToken { api_url: String, reason: String },
    /// Any other refusal that retrying cannot fix (a wrong `api_url` answering 404, …).
    #[error("the API at {api_url} refused the join with HTTP {status}: {message}")]
    Refused {
        api_url: String,
        status: u16,
        message: String,
    },
    #[error("the API at {api_url} answered the join with an unexpected body: {detail}")]
    BadResponse { api_url: String, detail: String },
    /// The request could not even be built (a malformed `api_url`).
    #[error("cannot send a join request to {api_url}: {detail}")]
    Request { api_url: String, detail: String },
    #[error("shut down while joining the cluster")]
    Cancelled,
}

const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(15);

/// Exchanges the cluster join token for a cluster-scoped credential. While the API is
/// unreachable or answers 5xx (or 408/429) it retries with capped exponential backoff
/// until `shutdown` is cancelled; a 401 is final ([`JoinError::BadToken`]).
pub async fn join(
    api_url: &str,
    token: &str,
    shutdown: &CancellationToken,
) -> Result<JoinedCluster, JoinError> {
    let endpoint = format!("{}/worker/join", api_url.trim_end_matches('/'));
    let request_error = |e: reqwest::Error| JoinError::Request {
        api_url: api_url.to_owned(),
        detail: e.to_string(),
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(request_error)?;
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    for attempt in 1u64.. {
        let sent = tokio::select! {
            _ = shutdown.cancelled() => return Err(JoinError::Cancelled),
            sent = attempt_join(&http, &endpoint, api_url, token) => sent,
        };
        let why = match sent {
            Ok(joined) => return Ok(joined),
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::Retry(why)) => why,
        };
        let delay = backoff.next_delay();
        tracing::warn!(%api_url, attempt, retry_in = ?delay, reason = %why,
            "cannot join the cluster yet; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Err(JoinError::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
    }
    unreachable!("the attempt counter does not run out")
}

enum Attempt {
    Retry(String),
    Final(JoinError),
}

async fn attempt_join(
    http: &reqwest::Client,
    endpoint: &str,
    api_url: &str,
    token: &str,
) -> Result<JoinedCluster, Attempt> {
    let response = http
        .post(endpoint)
        .json(&JoinRequest {
            token: token.to_owned(),
        })
        .send()
        .await
        .map_err(|e| {
            if e.is_builder() {
                Attempt::Final(JoinError::Request {
                    api_url: api_url.to_owned(),
                    detail: e.to_string(),
                })
            } else {
                Attempt::Retry(describe(&e))
            }
        })?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| Attempt::Retry(describe(&e)))?;
    if status.is_success() {
        return serde_json::from_str(&body).map_err(|e| {
            Attempt::Final(JoinError::BadResponse {
                api_url: api_url.to_owned(),
                detail: e.to_string(),
            })
        });
    }
    let message = serde_json::from_str::<ErrorBody>(&body)
        .map(|b| b.error)
        .unwrap_or_else(|_| body.chars().take(200).collect());
    if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        return Err(Attempt::Retry(format!("HTTP {status}: {message}")));
    }
    Err(Attempt::Final(if status == StatusCode::UNAUTHORIZED {
        JoinError::BadToken {
            api_url: api_url.to_owned(),
            reason: message,
        }
    } else {
        JoinError::Refused {
            api_url: api_url.to_owned(),
            status: status.as_u16(),
            message,
        }
    }))
}

/// reqwest's top-level message ("error sending request") hides the cause: add the chain.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
