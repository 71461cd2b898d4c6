//! Cluster membership: the worker's ephemeral node under `/clusters/{c}/workers`, the
//! assignments the scheduler writes for it, and what happens to both as the coordination
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

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::{CoordError, Coordinator, NodeKind, Op, Session, SessionState, WatchEvent};
use cloudtask_core::ids::{ClusterId, TaskId};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

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

type WatchFuture = Pin<Box<dyn Future<Output = WatchEvent> + Send>>;

/// One worker's membership of one cluster. Configure, then [`Membership::run`].
pub struct Membership {
    coordinator: Arc<dyn Coordinator>,
    cluster: ClusterId,
    me: WorkerNode,
    previous_incarnation_wait: Duration,
    leave_timeout: Duration,
    fence_after: Option<Duration>,
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

    pub fn status(&self) -> watch::Receiver<MembershipStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown`; returns an error only when starting over cannot help (an
    /// unusable name, or a name held by another live worker).
    pub async fn run(
        self,
        assignments: watch::Sender<Assignments>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            layout::valid_worker_name(&self.me.name),
            "worker name {:?} cannot be used: use 1 to 128 letters, digits, '-', '_' or '.' \
             (CLOUDTASK_WORKER_NAME)",
            self.me.name
        );
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
            let mut live = Live {
                membership: &self,
                session: session.as_ref(),
                state: session.state(),
                shutdown: &shutdown,
                epoch,
                assignments: &assignments,
                registered_at: None,
                disconnected_at: None,
                fenced: false,
                reread: false,
            };
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

/// Which of `follow`'s two watches fired.
enum Fired {
    Own(WatchEvent),
    Assigned(WatchEvent),
}

/// Sleeps until `at`; never without.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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

/// One session's work: register, then follow the assignments.
struct Live<'a> {
    membership: &'a Membership,
    session: &'a dyn Session,
    state: watch::Receiver<SessionState>,
    shutdown: &'a CancellationToken,
    epoch: u64,
    assignments: &'a watch::Sender<Assignments>,
    registered_at: Option<Instant>,
    /// Since when the connection is lost, if it is.
    disconnected_at: Option<Instant>,
    /// Fenced off during the current disconnection.
    fenced: bool,
    /// Fenced off since the assignments were last read: read them again.
    reread: bool,
}

impl Live<'_> {
    async fn serve(&mut self) -> Stop {
        if let Err(stop) = self.register().await {
            return stop;
        }
        self.registered_at = Some(Instant::now());
        self.set_status(MembershipStatus::Registered { epoch: self.epoch });
        tracing::info!(worker = %self.membership.me.name, cluster = %self.membership.cluster,
            epoch = self.epoch, "registered");
        match self.follow().await {
            Ok(never) => match never {},
            Err(stop) => stop,
        }
    }

    fn set_status(&self, status: MembershipStatus) {
        self.membership.status.send_replace(status);
    }

    /// The connection is lost (again): the fence delay runs from the first notice.
    fn disconnected(&mut self) {
        if self.disconnected_at.is_none() {
            self.disconnected_at = Some(Instant::now());
            tracing::warn!(
                epoch = self.epoch,
                "coordination connection lost; keeping current assignments"
            );
        }
        if !self.fenced {
            self.set_status(MembershipStatus::Disconnected { epoch: self.epoch });
        }
    }

    /// The session is connected again (the same session: it did not expire).
    fn reconnected(&mut self) {
        self.fenced = false;
        if self.disconnected_at.take().is_some() && self.registered_at.is_some() {
            tracing::info!(epoch = self.epoch, "coordination connection back");
            self.set_status(MembershipStatus::Registered { epoch: self.epoch });
        }
    }

    /// When to fence ourselves off, while disconnected and not fenced yet: after the
    /// configured delay, or sooner when the server granted a shorter session timeout
    /// than was asked for (the delay is a fifth of the timeout asked for, see
    /// `fence_after`; a fifth of the granted one then).
    fn fence_at(&self) -> Option<Instant> {
        let mut after = self.membership.fence_after?;
        if let Some(granted) = self.session.granted_timeout() {
            after = after.min(granted / 5);
        }
        (!self.fenced).then_some(self.disconnected_at? + after)
    }

    /// Drops every assignment under the next epoch: the engine stops what runs, in a
    /// hurry, before the session can expire and our tasks go to another worker.
    fn fence(&mut self) {
        if *self.state.borrow() == SessionState::Connected {
            return; // back in the meantime: `observe` takes it in next
        }
        self.fenced = true;
        self.reread = true;
        self.epoch += 1;
        publish(self.assignments, self.epoch, BTreeSet::new());
        self.set_status(MembershipStatus::Fenced { epoch: self.epoch });
        tracing::warn!(epoch = self.epoch, after = ?self.membership.fence_after,
            "coordination connection lost for too long: dropped all assignments \
             before the session can expire");
    }

    /// Runs one coordination call; a lost connection waits for the session to resume and
    /// tries again. While the call is pending (a request made on a lost connection waits
    /// for it to come back), the session's state is followed, the fence kept, and
    /// shutdown heard.
    async fn call<T, F, Fut>(&mut self, mut op: F) -> Result<T, Stop>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = cloudtask_coord::Result<T>>,
    {
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            let attempt = op();
            tokio::pin!(attempt);
            let result = loop {
                if let Some(result) = self.alongside(attempt.as_mut()).await? {
                    break result;
                }
            };
            match result {
                Ok(value) => return Ok(value),
                Err(CoordError::ConnectionLoss) => self.await_connection(&mut pause).await?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// After a call failed on a lost connection: waits until the session is connected
    /// again. The state may not say `Disconnected` yet, hence a short pause first.
    async fn await_connection(&mut self, pause: &mut Backoff) -> Result<(), Stop> {
        if !pause.wait(self.shutdown).await {
            return Err(Stop::Shutdown);
        }
        while self.observe()? != SessionState::Connected {
            self.alongside(std::pin::pin!(std::future::pending::<()>()))
                .await?;
        }
        Ok(())
    }

    /// Waits for `work` while following the session: shutdown heard, the state taken in
    /// as it changes (see [`Live::observe`]), the fence kept. `None` when the state
    /// changed first (`work` is still pending then).
    async fn alongside<T>(
        &mut self,
        work: Pin<&mut impl Future<Output = T>>,
    ) -> Result<Option<T>, Stop> {
        let fence_at = self.fence_at();
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(Stop::Shutdown),
            changed = self.state.changed() => {
                if changed.is_err() {
                    return Err(Stop::SessionEnded);
                }
                self.observe()?;
                Ok(None)
            }
            done = work => Ok(Some(done)),
            _ = until(fence_at) => {
                self.fence();
                Ok(None)
            }
        }
    }

    /// Takes in the session's current state: a lost connection starts the fence delay, a
    /// connection back ends it; an ended session is an error.
    fn observe(&mut self) -> Result<SessionState, Stop> {
        let state = *self.state.borrow_and_update();
        match state {
            SessionState::Connected => self.reconnected(),
            SessionState::Disconnected => self.disconnected(),
            SessionState::Expired | SessionState::Closed => return Err(Stop::SessionEnded),
        }
        Ok(state)
    }

    /// Creates our ephemeral node, first waiting (bounded) for a node left under our
    /// name by an earlier incarnation to vanish with its session.
    async fn register(&mut self) -> Result<(), Stop> {
        let membership = self.membership;
        let session = self.session;
        let workers = layout::workers(membership.cluster);
        let path = layout::worker(membership.cluster, &membership.me.name);
        let payload = layout::encode(&membership.me);
        let deadline = Instant::now() + membership.previous_incarnation_wait;
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        // Set when a create's answer was lost: the node may be ours already.
        let mut maybe_created = false;
        let mut announced = false;
        self.call(|| session.ensure_path(&workers)).await?;
        loop {
            match session.create(&path, &payload, NodeKind::Ephemeral).await {
                Ok(_) => return Ok(()),
                Err(CoordError::ConnectionLoss) => {
                    maybe_created = true;
                    self.await_connection(&mut pause).await?;
                }
                Err(CoordError::NoNode(_)) => self.call(|| session.ensure_path(&workers)).await?,
                Err(CoordError::NodeExists(_)) => {
                    let (holder, watch) = self.call(|| session.get_and_watch(&path)).await?;
                    let Some(holder) = holder else {
                        continue; // vanished in between: create again
                    };
                    if maybe_created && holder.data == payload {
                        // Ours, from the create whose answer was lost. (Were it an older
                        // session's after all, our own-node watch notices it vanish.)
                        return Ok(());
                    }
                    let held_by = layout::decode::<WorkerNode>(&path, &holder.data)
                        .map(|w| format!("{} started at {}", w.hostname, w.started_at))
                        .unwrap_or_else(|_| "an unreadable payload".into());
                    if Instant::now() >= deadline {
                        return Err(Stop::Fatal(anyhow::anyhow!(
                            "worker name {:?} is in use in cluster {} by a live worker ({held_by}) \
                             that has held it for longer than {:?}; give each worker its own \
                             name (CLOUDTASK_WORKER_NAME)",
                            membership.me.name,
                            membership.cluster,
                            membership.previous_incarnation_wait
                        )));
                    }
                    if !announced {
                        announced = true;
                        tracing::info!(worker = %membership.me.name, %held_by,
                            wait_at_most = ?membership.previous_incarnation_wait,
                            "our name is still held by the node of a previous incarnation; \
                             waiting for its session to end");
                    }
                    self.set_status(MembershipStatus::WaitingForPreviousIncarnation {
                        epoch: self.epoch,
                    });
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                        event = watch.fired() => {
                            if event == WatchEvent::SessionEnded {
                                return Err(Stop::SessionEnded);
                            }
                        }
                        changed = self.state.changed() => {
                            if changed.is_err() || self.state.borrow().is_terminal() {
                                return Err(Stop::SessionEnded);
                            }
                        }
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Follows our assignments until the session ends or shutdown: every change is read
    /// and published, the watch re-armed each time. Also watches our own node, so that a
    /// registration removed behind our back is noticed.
    async fn follow(&mut self) -> Result<std::convert::Infallible, Stop> {
        let membership = self.membership;
        let session = self.session;
        let own_path = layout::worker(membership.cluster, &membership.me.name);
        let mut own: Option<WatchFuture> = None;
        let mut assigned: Option<WatchFuture> = None;
        loop {
            if std::mem::take(&mut self.reread) {
                // Back on the same session after a fence: read everything again (under the
                // epoch the fence began).
                own = None;
                assigned = None;
            }
            if own.is_none() {
                let (node, watch) = self.call(|| session.get_and_watch(&own_path)).await?;
                if node.is_none() {
                    return Err(Stop::RegistrationLost);
                }
                own = Some(Box::pin(watch.fired()));
            }
            if assigned.is_none() {
                let (tasks, watch) = self.read_assignments().await?;
                publish(self.assignments, self.epoch, tasks);
                assigned = Some(watch);
            }
            let (Some(own_fired), Some(assigned_fired)) = (own.as_mut(), assigned.as_mut()) else {
                unreachable!("both watches are armed above");
            };
            let fired = async {
                tokio::select! {
                    event = own_fired => Fired::Own(event),
                    event = assigned_fired => Fired::Assigned(event),
                }
            };
            let fired = self.alongside(std::pin::pin!(fired)).await?;
            let event = match fired {
                Some(Fired::Own(event)) => {
                    own = None;
                    event
                }
                Some(Fired::Assigned(event)) => {
                    assigned = None;
                    event
                }
                None => {
                    // The state changed (or we fenced). Disconnected: keep the last known
                    // assignments, the session may resume. Resumed: read everything
                    // again rather than trust that no change slipped by while away.
                    if *self.state.borrow() == SessionState::Connected {
                        own = None;
                        assigned = None;
                    }
                    continue;
                }
            };
            if event == WatchEvent::SessionEnded {
                return Err(Stop::SessionEnded);
            }
        }
    }

    /// Our assigned task ids and a watch on them. The scheduler creates our folder with
    /// the first assignment (and removes it once we are gone and it holds nothing); while
    /// it is absent nothing is assigned, and the watch waits for its creation. The worker
    /// does not create it: the scheduler writes assignment folders in fenced batches and
    /// must be the only one that does.
    async fn read_assignments(&mut self) -> Result<(BTreeSet<TaskId>, WatchFuture), Stop> {
        let session = self.session;
        let dir = layout::worker_assignments(self.membership.cluster, &self.membership.me.name);
        loop {
            match self.call(|| session.children_and_watch(&dir)).await {
                Ok((names, watch)) => {
                    let tasks = names
                        .iter()
                        .filter_map(|name| match name.parse::<TaskId>() {
                            Ok(task) => Some(task),
                            Err(_) => {
                                tracing::warn!(%dir, %name, "ignoring an assignment that names no task");
                                None
                            }
                        })
                        .collect();
                    return Ok((tasks, Box::pin(watch.fired())));
                }
                Err(Stop::Failed(CoordError::NoNode(_))) => {
                    let (folder, watch) = self.call(|| session.get_and_watch(&dir)).await?;
                    if folder.is_none() {
                        return Ok((BTreeSet::new(), Box::pin(watch.fired())));
                    }
                    // Created in between: list it.
                }
                Err(stop) => return Err(stop),
            }
        }
    }
}
