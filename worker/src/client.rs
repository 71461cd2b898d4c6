//! The worker's side of the worker endpoints: claims, fire cursors, log batches,
//! outcomes and package downloads, with the cluster credential (renewed by joining again
//! when the API says it expired).

use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{RunId, TaskId, WorkerId};
use cloudtask_core::protocol::{
    Claim, ClaimAnswer, ClaimAnswers, ClaimBatch, Claimed, FireCursor, Report, ReportBatch,
    StartRequest, Started,
};
use reqwest::StatusCode;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::join::{JoinError, join};

/// Why a call did not go through.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The API answered and said no (a claim refused, a task that is not ours): final.
    #[error("refused: {0}")]
    Refused(String),
    /// The API could not be reached or failed: try again later.
    #[error("API unavailable: {0}")]
    Unavailable(String),
}

impl CallError {
    /// The API refused the request's body as too large (413): the same content may go
    /// through in smaller requests.
    pub fn too_large(&self) -> bool {
        matches!(self, CallError::Refused(detail)
            if detail.starts_with(StatusCode::PAYLOAD_TOO_LARGE.as_str()))
    }
}

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    join_token: String,
    credential: RwLock<String>,
    shutdown: CancellationToken,
}

impl ApiClient {
    pub fn new(
        api_url: &str,
        join_token: &str,
        credential: String,
        shutdown: CancellationToken,
    ) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a TLS backend is compiled in");
        ApiClient {
            http,
            base: api_url.trim_end_matches('/').to_owned(),
            join_token: join_token.to_owned(),
            credential: RwLock::new(credential),
            shutdown,
        }
    }

    /// Sends a request built by `build` with the credential; on 401, joins again for a
    /// fresh credential and sends it once more.
    async fn send(
        &self,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CallError> {
        for renewed in [false, true] {
            let credential = self.credential.read().await.clone();
            let response = build(&self.http, &self.base)
                .bearer_auth(&credential)
                .send()
                .await
                .map_err(|e| CallError::Unavailable(e.to_string()))?;
            if response.status() != StatusCode::UNAUTHORIZED || renewed {
                return classify(response).await;
            }
            self.renew(&credential).await?;
        }
        unreachable!("the loop returns on its second pass")
    }

    async fn renew(&self, stale: &str) -> Result<(), CallError> {
        let mut credential = self.credential.write().await;
        if *credential != stale {
            return Ok(()); // someone renewed it meanwhile
        }
        match join(&self.base, &self.join_token, &self.shutdown).await {
            Ok(joined) => {
                *credential = joined.credential;
                Ok(())
            }
            Err(JoinError::Cancelled) => Err(CallError::Unavailable("shutting down".into())),
            Err(e) => Err(CallError::Refused(e.to_string())),
        }
    }

    /// Claims many fires in one request; an answer per claim, in order.
    pub async fn claims(&self, claims: &[Claim]) -> Result<Vec<ClaimAnswer>, CallError> {
        let batch = ClaimBatch {
            claims: claims.to_vec(),
        };
        let sent = self
            .send(|http, base| {
                http.post(format!("{base}/worker/claims/batch"))
                    .json(&batch)
            })
            .await;
        let response = match sent {
            Ok(response) => response,
            // An API from before batched claims (workers upgraded first): one by one.
            Err(CallError::Refused(detail))
                if detail.starts_with("404") || detail.starts_with("405") =>
            {
                return self.claims_one_by_one(claims).await;
            }
            Err(e) => return Err(e),
        };
        let answers = json::<ClaimAnswers>(response).await?.answers;
        if answers.len() != claims.len() {
            return Err(CallError::Unavailable(format!(
                "{} answers to {} claims",
                answers.len(),
                claims.len()
            )));
        }
        Ok(answers)
    }

    async fn claims_one_by_one(&self, claims: &[Claim]) -> Result<Vec<ClaimAnswer>, CallError> {
        let mut answers = Vec::with_capacity(claims.len());
        for claim in claims {
            let sent = self
                .send(|http, base| http.post(format!("{base}/worker/claims")).json(claim))
                .await;
            answers.push(match sent {
                Ok(response) => {
                    let claimed = json::<Claimed>(response).await?;
                    ClaimAnswer::Claimed {
                        run_id: claimed.run_id,
                        env: claimed.env,
                    }
                }
                Err(CallError::Refused(message)) => ClaimAnswer::Refused {
                    code: "REFUSED".into(),
                    message,
                },
                Err(e) => return Err(e),
            });
        }
        Ok(answers)
    }

    /// Starts a queued run handed to this worker (manual, or a lost fire's retry).
    pub async fn start(&self, run: RunId, worker: &WorkerId) -> Result<Started, CallError> {
        let body = StartRequest {
            worker: worker.clone(),
        };
        let response = self
            .send(|http, base| {
                http.post(format!("{base}/worker/runs/{run}/start"))
                    .json(&body)
            })
            .await?;
        json::<Started>(response).await
    }

    pub async fn fire_cursor(&self, task: TaskId) -> Result<DateTime<Utc>, CallError> {
        let response = self
            .send(|http, base| http.get(format!("{base}/worker/tasks/{task}/cursor")))
            .await?;
        Ok(json::<FireCursor>(response).await?.since)
    }

    /// Delivers reports of any runs in one request.
    pub async fn reports(&self, reports: &[Report]) -> Result<(), CallError> {
        let batch = ReportBatch {
            reports: reports.to_vec(),
        };
        self.send(|http, base| http.post(format!("{base}/worker/reports")).json(&batch))
            .await
            .map(drop)
    }

    pub async fn package(&self, sha256: &str) -> Result<Vec<u8>, CallError> {
        let response = self
            .send(|http, base| http.get(format!("{base}/worker/packages/{sha256}")))
            .await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| CallError::Unavailable(e.to_string()))?;
        Ok(bytes.to_vec())
    }
}

/// The body of a 2xx answer; one that cannot be read is worth retrying.
async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, CallError> {
    response
        .json()
        .await
        .map_err(|e| CallError::Unavailable(e.to_string()))
}

/// 2xx passes; 5xx, 429 and 408 are worth retrying; any other answer is final.
async fn classify(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    let detail = format!("{status}: {body}");
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        Err(CallError::Unavailable(detail))
    } else {
        Err(CallError::Refused(detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtask_core::ids::TaskId;
    use cloudtask_core::run::{RunStatus, RunTrigger};

    /// An API from before batched claims: no batch route; single claims take the first
    /// fire and refuse the second.
    async fn old_api(run: RunId) -> String {
        let mut claims = 0;
        cloudtask_testkit::stand_in_api(move |line| {
            if line.starts_with("POST /worker/claims/batch ") {
                ("404 Not Found", String::new())
            } else if line.starts_with("POST /worker/claims ") {
                claims += 1;
                if claims == 1 {
                    (
                        "200 OK",
                        serde_json::to_string(&Claimed {
                            run_id: run,
                            env: Default::default(),
                        })
                        .unwrap(),
                    )
                } else {
                    (
                        "409 Conflict",
                        r#"{"error":"this fire is claimed already","code":"CONFLICT"}"#.to_owned(),
                    )
                }
            } else {
                ("500 Internal Server Error", String::new())
            }
        })
        .await
    }

    #[tokio::test]
    async fn claims_fall_back_to_one_by_one_on_an_api_without_batches() {
        let run = RunId::new();
        let url = old_api(run).await;
        let client = ApiClient::new(&url, "token", "credential".into(), CancellationToken::new());
        let claim = Claim {
            task_id: TaskId::new(),
            scheduled_at: Utc::now(),
            attempt: 0,
            task_version: 1,
            worker: "w1".parse().unwrap(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Running,
            reason: None,
        };
        let answers = client.claims(&[claim.clone(), claim]).await.unwrap();
        assert_eq!(
            answers[0],
            ClaimAnswer::Claimed {
                run_id: run,
                env: Default::default()
            }
        );
        assert!(
            matches!(&answers[1], ClaimAnswer::Refused { message, .. } if message.starts_with("409")),
            "{answers:?}"
        );
    }
}
