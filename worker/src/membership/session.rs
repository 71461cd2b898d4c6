//! One coordination session's work: register, then follow our node and assignments
//! (and commands, see [`super::commands`]) while keeping the fence.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::{CoordError, NodeKind, Session, SessionState, WatchEvent};
use cloudtask_core::ids::TaskId;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Assignments, Membership, MembershipStatus, Stop, publish};
use crate::backoff::Backoff;

pub(super) type WatchFuture = Pin<Box<dyn Future<Output = WatchEvent> + Send>>;

/// Which of `follow`'s watches fired.
enum Fired {
    Own(WatchEvent),
    Assigned(WatchEvent),
    Commands(WatchEvent),
}

/// Sleeps until `at`; never without.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One session's work: register, then follow the assignments.
pub(super) struct Live<'a> {
    pub(super) membership: &'a Membership,
    pub(super) session: &'a dyn Session,
    state: watch::Receiver<SessionState>,
    shutdown: &'a CancellationToken,
    pub(super) epoch: u64,
    pub(super) assignments: &'a watch::Sender<Assignments>,
    pub(super) registered_at: Option<Instant>,
    /// Since when the connection is lost, if it is.
    disconnected_at: Option<Instant>,
    /// Fenced off during the current disconnection.
    fenced: bool,
    /// Fenced off since the assignments were last read: read them again.
    reread: bool,
}

impl<'a> Live<'a> {
    pub(super) fn new(
        membership: &'a Membership,
        session: &'a dyn Session,
        shutdown: &'a CancellationToken,
        epoch: u64,
        assignments: &'a watch::Sender<Assignments>,
    ) -> Self {
        Live {
            membership,
            session,
            state: session.state(),
            shutdown,
            epoch,
            assignments,
            registered_at: None,
            disconnected_at: None,
            fenced: false,
            reread: false,
        }
    }

    pub(super) async fn serve(&mut self) -> Stop {
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
    pub(super) async fn call<T, F, Fut>(&mut self, mut op: F) -> Result<T, Stop>
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
        self.await_folder(&workers).await?;
        loop {
            match session.create(&path, &payload, NodeKind::Ephemeral).await {
                Ok(_) => return Ok(()),
                Err(CoordError::ConnectionLoss) => {
                    maybe_created = true;
                    self.await_connection(&mut pause).await?;
                }
                Err(CoordError::NoNode(_)) => self.await_folder(&workers).await?,
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

    /// Our cluster's folder at `path`. A worker with a cluster identity may not create
    /// it (the scheduler does, when it takes the cluster on): it waits for its creation.
    /// On an open tree the worker creates it itself, as before ACLs.
    async fn await_folder(&mut self, path: &str) -> Result<(), Stop> {
        let session = self.session;
        let mut announced = false;
        loop {
            let ensured = self
                .call(|| async {
                    match session.ensure_path(path).await {
                        Ok(()) => Ok(true),
                        Err(CoordError::NoAuth(_)) => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            if ensured {
                return Ok(());
            }
            let (folder, watch) = self.call(|| session.get_and_watch(path)).await?;
            if folder.is_some() {
                continue;
            }
            if !std::mem::replace(&mut announced, true) {
                tracing::info!(%path, "waiting for the scheduler to take the cluster on");
            }
            let mut fired = std::pin::pin!(watch.fired());
            loop {
                match self.alongside(fired.as_mut()).await? {
                    Some(WatchEvent::SessionEnded) => return Err(Stop::SessionEnded),
                    Some(_) => break,
                    // The state changed: a resumed session re-reads.
                    None if *self.state.borrow() == SessionState::Connected => break,
                    None => {}
                }
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
        let mut commands: Option<WatchFuture> = None;
        loop {
            if std::mem::take(&mut self.reread) {
                // Back on the same session after a fence: read everything again (under the
                // epoch the fence began).
                (own, assigned, commands) = (None, None, None);
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
            if commands.is_none() {
                let (watch, reread) = self.deliver_commands().await?;
                commands = Some(watch);
                assigned = reread.or(assigned);
            }
            let (Some(own_fired), Some(assigned_fired), Some(commands_fired)) =
                (own.as_mut(), assigned.as_mut(), commands.as_mut())
            else {
                unreachable!("every watch is armed above");
            };
            let fired = async {
                tokio::select! {
                    event = own_fired => Fired::Own(event),
                    event = assigned_fired => Fired::Assigned(event),
                    event = commands_fired => Fired::Commands(event),
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
                Some(Fired::Commands(event)) => {
                    commands = None;
                    event
                }
                None => {
                    // The state changed (or we fenced). Disconnected: keep the last known
                    // assignments, the session may resume. Resumed: read everything
                    // again rather than trust that no change slipped by while away.
                    if *self.state.borrow() == SessionState::Connected {
                        (own, assigned, commands) = (None, None, None);
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
    pub(super) async fn read_assignments(
        &mut self,
    ) -> Result<(BTreeSet<TaskId>, WatchFuture), Stop> {
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
