//! Claims go to the API in batches: the fires due together (a second's worth of a
//! thousand tasks) are claimed in a few requests and transactions, not one each. Each
//! caller still gets its own answer, and retries on its own terms.
//!
//! A claimed fire's answer carries its task's environment (env values never go to
//! ZooKeeper): kept here by task and version, for the run that starts from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::protocol::{Claim, ClaimAnswer, MAX_CLAIM_BATCH, TaskEnv};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::client::{ApiClient, CallError};

/// Batches sent at once; more claims wait for one of them to come back.
const IN_FLIGHT: usize = 4;

type Pending = (Claim, oneshot::Sender<Result<RunId, CallError>>);

/// Each task's environment, by the version it was handed for (the latest only).
#[derive(Clone, Default)]
pub struct TaskEnvs(Arc<Mutex<HashMap<TaskId, (u32, TaskEnv)>>>);

impl TaskEnvs {
    pub fn remember(&self, task: TaskId, version: u32, env: TaskEnv) {
        let mut envs = self.0.lock().expect("task envs");
        match envs.get(&task) {
            Some((known, _)) if *known > version => {}
            _ => {
                envs.insert(task, (version, env));
            }
        }
    }

    /// The environment handed for `task` at `version` (empty when none was: a task
    /// without env, or an API of an earlier version that kept env in the mirror).
    pub fn of(&self, task: TaskId, version: u32) -> TaskEnv {
        match self.0.lock().expect("task envs").get(&task) {
            Some((known, env)) if *known == version => env.clone(),
            _ => TaskEnv::new(),
        }
    }
}

/// Hands claims to the batching task. Cheap to clone.
#[derive(Clone)]
pub struct Claims {
    tx: mpsc::UnboundedSender<Pending>,
    envs: TaskEnvs,
}

impl Claims {
    /// Starts the batching task; it ends when every handle is dropped.
    pub fn spawn(client: Arc<ApiClient>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let envs = TaskEnvs::default();
        tokio::spawn(batch_claims(client, rx, envs.clone()));
        Claims { tx, envs }
    }

    /// The environments handed with claims (and starts).
    pub fn envs(&self) -> &TaskEnvs {
        &self.envs
    }

    /// Claims one fire: its run, `Refused` (final), or `Unavailable` (try again).
    pub async fn claim(&self, claim: Claim) -> Result<RunId, CallError> {
        let gone = || CallError::Unavailable("the worker is shutting down".into());
        let (reply, answer) = oneshot::channel();
        self.tx.send((claim, reply)).map_err(|_| gone())?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

async fn batch_claims(
    client: Arc<ApiClient>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    envs: TaskEnvs,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // The fires due together are handed over in one go by the engine: let them all
        // queue behind the first.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_CLAIM_BATCH {
            match rx.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let client = client.clone();
        let envs = envs.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let claims: Vec<Claim> = batch.iter().map(|(claim, _)| claim.clone()).collect();
            match client.claims(&claims).await {
                Ok(answers) => {
                    for ((claim, reply), answer) in batch.into_iter().zip(answers) {
                        let _ = reply.send(match answer {
                            ClaimAnswer::Claimed { run_id, env } => {
                                envs.remember(claim.task_id, claim.task_version, env);
                                Ok(run_id)
                            }
                            ClaimAnswer::Refused { code, message } => {
                                Err(CallError::Refused(format!("{code}: {message}")))
                            }
                        });
                    }
                }
                Err(e) => {
                    for (_, reply) in batch {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
