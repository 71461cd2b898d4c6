//! Cluster membership: the worker's ephemeral node under `/clusters/{c}/workers`, the
//! assignments the scheduler writes for it (and the commands, in order with them: see
//! [`commands`]), and what happens to both as the coordination
//! session comes and goes (DESIGN §2):
//!
//! - connection lost: keep going on the last known assignments; when the session resumes,
//!   read them again;
//! - connection lost for long (a network cut): fence ourselves off before the session can
//!   expire on the server, so that nothing of ours still runs when the scheduler hands
//!   our tasks, and the retries of our runs, to another worker: drop every assignment
//!   under the next epoch (see [`Membership::fence_after`]); if the same session resumes,
//!   read them again;
//! - session ended (expired, closed, or our node removed by someone else): drop every
//!   assignment at once, then register again from scratch on a new session, under a new
//!   epoch;
//! - shutdown: leave cleanly, writing a departure marker in the same batch that deletes
//!   our node, so the scheduler tells a leave from a failure.

mod commands;
mod session;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout::{self, CommandNode, WorkerNode};
use cloudtask_coord::{CoordError, Coordinator, NodeKind, Op, Session};
use cloudtask_core::ids::{ClusterId, TaskId};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use session::Live;

/// The tasks this worker owns, as read in one coordination session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignments {
    /// Increments with every session, and when the worker fences itself off. Assignments
    /// belong to the epoch that read them: when it ends, an empty set with the next epoch
    /// is published at once, so a consumer must never act on assignments of an epoch
    /// other than the latest.
    pub epoch: u64,
    pub tasks: BTreeSet<TaskId>,
}

/// Where membership stands, for logs, health checks and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipStatus {
    /// Opening a session: at start, and after a session ended.
    Connecting,
    /// Our name is held by the node of an earlier incarnation (a crashed process whose
    /// session has not expired yet); waiting for it to vanish.
    WaitingForPreviousIncarnation {
        epoch: u64,
    },
    Registered {
        epoch: u64,
    },
    /// Connection lost; the session may resume. Assignments are kept meanwhile.
    Disconnected {
        epoch: u64,
    },
    /// Connection lost for longer than the fence delay: every assignment dropped (under
    /// this new epoch); they are read again if the session resumes.
    Fenced {
        epoch: u64,
    },
    /// Shut down (after leaving cleanly when registered).
    Stopped,
}

/// Default bound on the wait for a previous incarnation's node: twice the default session
/// timeout, after which that node is not a crashed incarnation but a live worker with
/// the same name.
const DEFAULT_PREVIOUS_INCARNATION_WAIT: Duration = Duration::from_secs(20);
const DEFAULT_LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One worker's membership of one cluster. Configure, then [`Membership::run`].
pub struct Membership {
    coordinator: Arc<dyn Coordinator>,
    cluster: ClusterId,
    me: WorkerNode,
    previous_incarnation_wait: Duration,
    leave_timeout: Duration,
    fence_after: Option<Duration>,
    /// Where this worker's commands go, when it reads them (see [`commands`]).
    commands: Option<mpsc::UnboundedSender<CommandNode>>,
    status: watch::Sender<MembershipStatus>,
}

/// Registers `me` in `cluster` and publishes its assignments until `shutdown`, then
/// leaves cleanly. See [`Membership`] for the knobs.
pub async fn run_membership(
    coordinator: Arc<dyn Coordinator>,
    cluster: ClusterId,
    me: WorkerNode,
    assignments: watch::Sender<Assignments>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Membership::new(coordinator, cluster, me)
        .run(assignments, shutdown)
        .await
}

/// Why one session's work stopped.
enum Stop {
    Shutdown,
    /// The session expired or was closed: start over on a new one.
    SessionEnded,
    /// Our node vanished while the session lives (deleted by someone else): start over.
    RegistrationLost,
    /// An unexpected coordination error: start over on a new session.
    Failed(CoordError),
    /// Starting over cannot help.
    Fatal(anyhow::Error),
}

impl From<CoordError> for Stop {
    fn from(e: CoordError) -> Self {
        match e {
            CoordError::SessionExpired => Stop::SessionEnded,
            // Our identity no longer reaches our cluster: the join token was rotated
            // (the identity derives from it) or the cluster deleted. A new session with
            // the same identity cannot help; the worker must join again with the
            // current token.
            CoordError::NoAuth(path) => Stop::Fatal(anyhow::anyhow!(
                "ZooKeeper refused this worker's cluster identity at {path}: the cluster's \
                 join token was rotated (or the cluster deleted); restart the worker with \
                 the current CLOUDTASK_CLUSTER_TOKEN"
            )),
            other => Stop::Failed(other),
        }
    }
}

impl Membership {
    pub fn new(coordinator: Arc<dyn Coordinator>, cluster: ClusterId, me: WorkerNode) -> Self {
        Membership {
            coordinator,
            cluster,
            me,
            previous_incarnation_wait: DEFAULT_PREVIOUS_INCARNATION_WAIT,
            leave_timeout: DEFAULT_LEAVE_TIMEOUT,
            fence_after: None,
            commands: None,
            status: watch::channel(MembershipStatus::Connecting).0,
        }
    }

    /// How long a node left under our name by another session may block registration
    /// before we conclude that a live worker uses the name (about 2× the session timeout).
    pub fn previous_incarnation_wait(mut self, wait: Duration) -> Self {
        self.previous_incarnation_wait = wait;
        self
    }

    /// How long a clean leave may take on shutdown (e.g. while the connection is down);
    /// past it the worker just closes its session, which the scheduler sees as a failure.
    pub fn leave_timeout(mut self, timeout: Duration) -> Self {
        self.leave_timeout = timeout;
        self
    }

    /// How long the connection may stay lost before the worker fences itself off (drops
    /// every assignment, so the engine stops what runs). It must end before the session
    /// can expire on the server: the client notices a silent connection 2/5 of the
    /// session timeout after its last contact (9/20 at worst: it checks once a tick), so
    /// a fifth of the timeout leaves about a third of it for the runs to be stopped.
    /// Never fenced by default; never later than a fifth of the timeout the server
    /// granted.
    pub fn fence_after(mut self, after: Duration) -> Self {
        self.fence_after = Some(after);
        self
    }

    /// Reads this worker's commands (run now, stop) too, and hands them to `engine`, each
    /// after assignments at least as new as the command (see [`commands`]).
    pub fn deliver_commands(mut self, engine: mpsc::UnboundedSender<CommandNode>) -> Self {
        self.commands = Some(engine);
        self
    }

    pub fn status(&self) -> watch::Receiver<MembershipStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown`; returns an error only when starting over cannot help (an
    /// name held by another live worker).
    pub async fn run(
        self,
        assignments: watch::Sender<Assignments>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut epoch = assignments.borrow().epoch + 1;
        let mut reconnect = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            self.status.send_replace(MembershipStatus::Connecting);
            let connected = tokio::select! {
                _ = shutdown.cancelled() => None,
                connected = self.coordinator.connect() => Some(connected),
            };
            let session = match connected {
                None => return self.stopped(&assignments, epoch),
                Some(Ok(session)) => session,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot open a coordination session; retrying");
                    if !reconnect.wait(&shutdown).await {
                        return self.stopped(&assignments, epoch);
                    }
                    continue;
                }
            };
            let mut live = Live::new(&self, session.as_ref(), &shutdown, epoch, &assignments);
            let stop = live.serve().await;
            let registered_at = live.registered_at;
            epoch = live.epoch; // a fence moved it on
            let why = match stop {
                Stop::Shutdown => {
                    // Drop everything before the scheduler can hand it to someone else.
                    publish(&assignments, epoch, BTreeSet::new());
                    if registered_at.is_some() {
                        self.leave(session.as_ref()).await;
                    }
                    session.close().await;
                    return self.stopped(&assignments, epoch);
                }
                Stop::Fatal(e) => {
                    publish(&assignments, epoch + 1, BTreeSet::new());
                    session.close().await;
                    self.status.send_replace(MembershipStatus::Stopped);
                    return Err(e);
                }
                Stop::SessionEnded => "the coordination session ended".to_owned(),
                Stop::RegistrationLost => "our worker node was removed by someone else".to_owned(),
                Stop::Failed(e) => format!("coordination failed: {e}"),
            };
            // Everything owned went with the session: drop it now, under the next epoch,
            // before anything else.
            epoch += 1;
            publish(&assignments, epoch, BTreeSet::new());
            tracing::warn!(reason = %why, epoch, "dropped all assignments; registering again");
            session.close().await;
            // A session that held for a while earns a quick return; one that keeps
            // failing fast backs off.
            if registered_at.is_some_and(|at| at.elapsed() >= Duration::from_secs(30)) {
                reconnect.reset();
            }
            if !reconnect.wait(&shutdown).await {
                return self.stopped(&assignments, epoch);
            }
        }
    }

    /// The end of a run on shutdown: nothing owned any more.
    fn stopped(&self, assignments: &watch::Sender<Assignments>, epoch: u64) -> anyhow::Result<()> {
        publish(assignments, epoch, BTreeSet::new());
        self.status.send_replace(MembershipStatus::Stopped);
        Ok(())
    }

    /// One atomic batch: a departure marker (carrying the leaving incarnation's payload)
    /// and the deletion of our node. Best effort within `leave_timeout`.
    async fn leave(&self, session: &dyn Session) {
        let worker = layout::worker(self.cluster, &self.me.name);
        let marker = layout::departure(self.cluster, &self.me.name);
        let payload = layout::encode(&self.me);
        let attempt = async {
            loop {
                let result = async {
                    session
                        .ensure_path(&layout::departures(self.cluster))
                        .await?;
                    let marker_op = match session.get(&marker).await? {
                        Some(existing) => Op::Set {
                            path: marker.clone(),
                            data: payload.clone(),
                            version: Some(existing.version),
                        },
                        None => Op::Create {
                            path: marker.clone(),
                            data: payload.clone(),
                            kind: NodeKind::Persistent,
                        },
                    };
                    let delete_worker = Op::Delete {
                        path: worker.clone(),
                        version: None,
                    };
                    session.multi(vec![marker_op, delete_worker]).await
                }
                .await;
                match result {
                    Ok(()) => {
                        tracing::info!(worker = %self.me.name, "left the cluster");
                        return Ok(());
                    }
                    // Our node is already gone (a retried batch that had been applied,
                    // or a deletion by someone else): nothing left to leave.
                    Err(CoordError::NoNode(path)) if path == worker => return Ok(()),
                    // Raced with the scheduler consuming an older marker: read again.
                    Err(
                        CoordError::NodeExists(_)
                        | CoordError::BadVersion(_)
                        | CoordError::NoNode(_),
                    ) => {}
                    Err(CoordError::ConnectionLoss) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(self.leave_timeout, attempt).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e,
                "could not leave cleanly; the scheduler will see this worker fail"),
            Err(_) => tracing::warn!(timeout = ?self.leave_timeout,
                "could not leave cleanly in time; the scheduler will see this worker fail"),
        }
    }
}

/// Publishes `tasks` under `epoch`, waking consumers only on an actual change.
fn publish(assignments: &watch::Sender<Assignments>, epoch: u64, tasks: BTreeSet<TaskId>) {
    assignments.send_if_modified(|current| {
        if current.epoch == epoch && current.tasks == tasks {
            return false;
        }
        tracing::debug!(epoch, tasks = tasks.len(), "assignments published");
        *current = Assignments { epoch, tasks };
        true
    });
}
