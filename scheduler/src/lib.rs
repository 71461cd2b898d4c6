//! The scheduler: replicas elect one leader in ZooKeeper; the leader mirrors every
//! cluster's tasks from the catalogue into ZooKeeper, watches each cluster's workers, and
//! allocates tasks to workers on a consistent-hash ring, moving only what must move.

pub mod balance;
pub mod cluster;
pub mod election;
pub mod notify;
mod outbound;
pub mod retention;
pub mod ring;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use cloudtask_catalogue::live_events::{Event, Membership};
use cloudtask_catalogue::mirror_changes::Changes;
use cloudtask_catalogue::{Catalogue, Cluster, WorkerEvent};
use cloudtask_coord::layout::CommandNode;
use cloudtask_coord::{
    CoordError, Coordinator, Session, WatchEvent, acl, delete_recursive, layout,
};
use cloudtask_core::ids::{ClusterId, RunId, WorkerId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use cluster::{ClusterState, Fence, WorkerChanges};
pub use ring::{Member, Ring, allocate};

/// How often the leader reconciles everything, whatever it heard.
pub const SWEEP: Duration = Duration::from_secs(60);

pub struct Scheduler {
    pub catalogue: Catalogue,
    pub coordinator: Arc<dyn Coordinator>,
    /// Shown in the election node, for operators.
    pub identity: String,
    pub sweep: Duration,
    /// Znode writes made by this replica's leadership terms (for tests and benchmarks).
    pub writes: Arc<AtomicU64>,
    /// Delivers the notification outbox while this replica leads (None: not here).
    pub notifier: Option<notify::Notifier>,
    /// Prunes the tenants' history while this replica leads (None: not here).
    pub pruning: Option<retention::Pruning>,
}

/// Why a leadership term ended.
enum TermEnd {
    Shutdown,
    SessionLost,
}

impl Scheduler {
    /// Campaigns, leads when elected, and campaigns again after losing a session, until
    /// `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let session = match self.coordinator.connect().await {
                Ok(session) => session,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the coordination service; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            match self.term(session.clone(), &shutdown).await {
                Ok(TermEnd::Shutdown) => {
                    session.close().await;
                    return Ok(());
                }
                Ok(TermEnd::SessionLost) => tracing::warn!("session lost; campaigning again"),
                Err(e) => {
                    tracing::warn!(error = %e, "leadership term failed; campaigning again");
                    session.close().await;
                }
            }
        }
    }

    async fn term(
        &self,
        session: Arc<dyn Session>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<TermEnd> {
        let node = election::campaign(session.as_ref(), &self.identity).await?;
        let mut state = session.state();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(TermEnd::Shutdown),
            _ = session_ended(&mut state) => return Ok(TermEnd::SessionLost),
            won = election::wait_for_leadership(session.as_ref(), &node) => match won {
                Ok(()) => {}
                Err(CoordError::SessionExpired) => return Ok(TermEnd::SessionLost),
                Err(e) => return Err(e.into()),
            },
        }
        tracing::info!(%node, "leading");
        let term = shutdown.child_token();
        let _end_of_term = term.clone().drop_guard();
        if let Some(notifier) = &self.notifier {
            tokio::spawn(notifier.clone().run(term.clone()));
        }
        if let Some(pruning) = &self.pruning {
            tokio::spawn(pruning.clone().run(self.catalogue.clone(), term.clone()));
        }
        let changes = self.catalogue.listen_changes().await.ok();
        let fence = Fence {
            election_node: node,
            writes: self.writes.clone(),
        };
        Leader::new(self, session, fence, changes)
            .lead(shutdown)
            .await
    }
}

struct Leader<'a> {
    scheduler: &'a Scheduler,
    session: Arc<dyn Session>,
    fence: Fence,
    changes: Option<Changes>,
    clusters: BTreeMap<ClusterId, ClusterState>,
    watchers: BTreeMap<ClusterId, CancellationToken>,
    dirty_tx: mpsc::UnboundedSender<ClusterId>,
    dirty_rx: mpsc::UnboundedReceiver<ClusterId>,
    /// Commands written this term, by (run, worker, kind): a queued run or a stop is
    /// handed to a worker once (a new leader may hand it again; starting a queued run and
    /// stopping a run are both idempotent at the worker and the API).
    sent: HashSet<(RunId, WorkerId, &'static str)>,
}

impl<'a> Leader<'a> {
    fn new(
        scheduler: &'a Scheduler,
        session: Arc<dyn Session>,
        fence: Fence,
        changes: Option<Changes>,
    ) -> Self {
        let (dirty_tx, dirty_rx) = mpsc::unbounded_channel();
        Leader {
            scheduler,
            session,
            fence,
            changes,
            clusters: BTreeMap::new(),
            watchers: BTreeMap::new(),
            dirty_tx,
            dirty_rx,
            sent: HashSet::new(),
        }
    }

    async fn lead(mut self, shutdown: &CancellationToken) -> anyhow::Result<TermEnd> {
        let result = self.lead_inner(shutdown).await;
        for watcher in self.watchers.values() {
            watcher.cancel();
        }
        result
    }

    async fn lead_inner(&mut self, shutdown: &CancellationToken) -> anyhow::Result<TermEnd> {
        // A tree written before ACLs (or by an older version) is walled in now: the
        // election and the top; each cluster's part as it is reconciled.
        let access = self.scheduler.coordinator.access();
        let session = self.session.as_ref();
        session.ensure_path(layout::CLUSTERS).await?;
        let fixed = acl::enforce(session, access, "/scheduler").await?
            + acl::enforce_node(session, access, layout::CLUSTERS).await?;
        if fixed > 0 {
            tracing::info!(nodes = fixed, "coordination ACLs set");
        }
        if access.is_open() {
            tracing::warn!("no zookeeper_auth: the coordination tree is world-writable");
        }
        self.sweep().await?;
        let mut state = self.session.state();
        let mut sweep = tokio::time::interval(self.scheduler.sweep);
        sweep.tick().await;
        // Queued runs nobody took in time end (QUEUE_EXPIRED): checked a few times per
        // expiry period, at most once a second.
        let expiry = self.scheduler.catalogue.queue_expiry();
        let mut expire = tokio::time::interval(
            (expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(30)),
        );
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(TermEnd::Shutdown),
                _ = session_ended(&mut state) => return Ok(TermEnd::SessionLost),
                Some(cluster) = self.dirty_rx.recv() => self.workers_changed(cluster).await?,
                batch = next_changes(&mut self.changes) => match batch {
                    // An empty batch: notifications may have been missed.
                    Some(clusters) if clusters.is_empty() => self.sweep().await?,
                    Some(clusters) => {
                        for cluster in clusters {
                            self.reconcile(cluster).await?;
                        }
                    }
                    None => {
                        tracing::warn!("change notifications ended; relying on the sweep");
                        self.changes = None;
                    }
                },
                _ = sweep.tick() => self.sweep().await?,
                _ = expire.tick() => {
                    let expired = self.scheduler.catalogue.expire_queued_runs(expiry).await?;
                    if expired > 0 {
                        tracing::warn!(expired, "queued runs expired: no worker took them in time");
                    }
                }
            }
        }
    }

    /// Every cluster: mirror and allocate; forget clusters the catalogue no longer has.
    async fn sweep(&mut self) -> anyhow::Result<()> {
        let clusters = self.scheduler.catalogue.all_clusters().await?;
        let known: Vec<ClusterId> = clusters.iter().map(|c| c.id).collect();
        for cluster in clusters {
            self.reconcile_cluster(cluster).await?;
        }
        let gone: Vec<ClusterId> = self
            .clusters
            .keys()
            .filter(|c| !known.contains(c))
            .copied()
            .collect();
        for cluster in gone {
            self.remove_cluster(cluster).await?;
        }
        // Clusters in ZooKeeper that the catalogue no longer knows (deleted while no
        // leader was there).
        match self.session.children(layout::CLUSTERS).await {
            Ok(names) => {
                for name in names {
                    if let Ok(id) = name.parse::<ClusterId>()
                        && !known.contains(&id)
                    {
                        self.remove_cluster(id).await?;
                    }
                }
            }
            Err(CoordError::NoNode(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn reconcile(&mut self, cluster: ClusterId) -> anyhow::Result<()> {
        match self.scheduler.catalogue.cluster_by_id(cluster).await? {
            Some(cluster) => self.reconcile_cluster(cluster).await,
            None => self.remove_cluster(cluster).await,
        }
    }

    async fn reconcile_cluster(&mut self, cluster: Cluster) -> anyhow::Result<()> {
        let id = cluster.id;
        // Its workers' identity, before anything of it is written: new, or replaced by a
        // token rotation (then the old token's workers are cut off at once).
        let access = self.scheduler.coordinator.access();
        if access.admit_cluster(id, cluster.token_rotated_at) {
            let fixed = acl::enforce_cluster(self.session.as_ref(), access, id).await?;
            if fixed > 0 {
                tracing::info!(cluster = %id, nodes = fixed, "cluster ACLs set");
            }
        }
        let tasks = self.scheduler.catalogue.tasks_of_cluster(id).await?;
        if !self.clusters.contains_key(&id) {
            let state = ClusterState::load(self.session.as_ref(), cluster.clone()).await?;
            self.clusters.insert(id, state);
            self.watch_workers(id);
        }
        let pending = self.scheduler.catalogue.pending_commands(id).await?;
        let state = self.clusters.get_mut(&id).expect("loaded above");
        // Its default limits, which the mirror writes into its tasks, may have changed.
        state.cluster = cluster;
        state
            .mirror(self.session.as_ref(), &self.fence, &tasks)
            .await?;
        state.hold_for_manual_runs(pending.manual_tasks.clone());
        let moved = state.allocate(self.session.as_ref(), &self.fence).await?;
        if moved > 0 {
            tracing::info!(cluster = %id, moved, "allocation updated");
        }
        self.deliver(id, pending).await
    }

    /// Hands queued manual runs to their task's worker and stop requests to the run's.
    /// Always after `mirror` and `allocate`: a run-now command is written only once the
    /// spec and the assignment of its task are (`assignments()` holds what was written),
    /// on the same session, which the worker relies on to take commands in order with
    /// its assignments.
    async fn deliver_commands(&mut self, cluster: ClusterId) -> anyhow::Result<()> {
        let pending = self.scheduler.catalogue.pending_commands(cluster).await?;
        self.deliver(cluster, pending).await
    }

    async fn deliver(
        &mut self,
        cluster: ClusterId,
        pending: cloudtask_catalogue::PendingCommands,
    ) -> anyhow::Result<()> {
        let Some(state) = self.clusters.get(&cluster) else {
            return Ok(());
        };
        let (queued, stops) = (pending.queued, pending.stops);
        let mut waiting = Vec::new();
        for run in queued {
            let Some(worker) = state.assignments().get(&run.task_id) else {
                // No live owner yet: it waits in the queue, and says so, until a worker
                // can take it or `queue_expiry_secs` ends it.
                waiting.push(run);
                continue;
            };
            if !self.sent.insert((run.id, worker.clone(), "run")) {
                continue;
            }
            self.scheduler
                .catalogue
                .hand_queued_run(run.id, worker)
                .await?;
            let command = CommandNode::RunNow {
                task: run.task_id,
                run: run.id,
            };
            state
                .send_command(self.session.as_ref(), &self.fence, worker, &command)
                .await?;
        }
        for run in stops {
            let Some(worker) = run.worker.clone() else {
                continue;
            };
            if !self.sent.insert((run.id, worker.clone(), "stop")) {
                continue;
            }
            let command = CommandNode::Stop { run: run.id };
            state
                .send_command(self.session.as_ref(), &self.fence, &worker, &command)
                .await?;
        }
        self.scheduler
            .catalogue
            .mark_waiting_for_worker(&waiting)
            .await?;
        Ok(())
    }

    async fn remove_cluster(&mut self, cluster: ClusterId) -> anyhow::Result<()> {
        if let Some(watcher) = self.watchers.remove(&cluster) {
            watcher.cancel();
        }
        self.clusters.remove(&cluster);
        delete_recursive(self.session.as_ref(), &layout::cluster(cluster)).await?;
        self.scheduler.coordinator.access().forget_cluster(cluster);
        tracing::info!(%cluster, "cluster removed from coordination");
        Ok(())
    }

    async fn workers_changed(&mut self, cluster: ClusterId) -> anyhow::Result<()> {
        let Some(state) = self.clusters.get_mut(&cluster) else {
            return Ok(());
        };
        let changes = state.refresh_workers(self.session.as_ref()).await?;
        if changes == WorkerChanges::default() {
            return Ok(());
        }
        // Allocation first: the failed worker's tasks must find a new owner fast.
        let moved = state.allocate(self.session.as_ref(), &self.fence).await?;
        // Commands to workers that are gone are forgotten: one of the same name on a new
        // session is handed them again.
        let gone: Vec<WorkerId> = (changes.failed.iter().chain(&changes.left))
            .map(|w| w.name.clone())
            .collect();
        self.sent.retain(|(_, worker, _)| !gone.contains(worker));
        tracing::info!(%cluster, joined = changes.joined.len(), left = changes.left.len(),
            failed = changes.failed.len(), moved, "workers changed");
        let tenant = state.cluster.tenant_id;
        // Subscribers hear of every change.
        let announced = [
            (Membership::Joined, &changes.joined),
            (Membership::Left, &changes.left),
            (Membership::Offline, &changes.failed),
        ];
        for (change, workers) in announced {
            for worker in workers {
                let event = Event::Worker {
                    tenant,
                    cluster,
                    change,
                    worker: worker.name.clone(),
                };
                self.scheduler.catalogue.announce(event);
            }
        }
        for worker in &changes.failed {
            let lost = self
                .scheduler
                .catalogue
                .mark_worker_runs_lost(cluster, &worker.name)
                .await?;
            if lost > 0 {
                tracing::warn!(%cluster, worker = %worker.name, lost, "runs lost with their worker");
            }
            let occurrence = worker.started_at.to_rfc3339();
            self.scheduler
                .catalogue
                .record_worker_event(
                    tenant,
                    cluster,
                    &worker.name,
                    WorkerEvent::Offline,
                    &occurrence,
                )
                .await?;
        }
        for worker in &changes.joined {
            // Back online: it failed before (an offline event exists for an earlier
            // incarnation) and now has a new session.
            if self
                .scheduler
                .catalogue
                .worker_was_offline(tenant, cluster, &worker.name)
                .await?
            {
                let occurrence = worker.started_at.to_rfc3339();
                self.scheduler
                    .catalogue
                    .record_worker_event(
                        tenant,
                        cluster,
                        &worker.name,
                        WorkerEvent::Online,
                        &occurrence,
                    )
                    .await?;
            }
        }
        self.deliver_commands(cluster).await
    }

    /// Watches a cluster's worker folder; each change marks the cluster dirty.
    fn watch_workers(&mut self, cluster: ClusterId) {
        let token = CancellationToken::new();
        self.watchers.insert(cluster, token.clone());
        let session = self.session.clone();
        let dirty = self.dirty_tx.clone();
        tokio::spawn(async move {
            let path = layout::workers(cluster);
            let mut first = true;
            let mut retry = Duration::from_millis(100);
            loop {
                let watch = match session.children_and_watch(&path).await {
                    Ok((_, watch)) => watch,
                    // The leadership term ends with the session; the leader sees that.
                    Err(CoordError::SessionExpired) => return,
                    Err(e) => {
                        // A lost connection: arm the watch again once it is back, and
                        // have the leader re-read the workers (a change may have been
                        // missed meanwhile).
                        tracing::debug!(%cluster, error = %e, "worker watch lost; re-arming");
                        first = true;
                        tokio::select! {
                            _ = token.cancelled() => return,
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                retry = Duration::from_millis(100);
                // The leader read the workers before this watch was armed: a change in
                // between would otherwise go unheard.
                if std::mem::take(&mut first) && dirty.send(cluster).is_err() {
                    return;
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    event = watch.fired() => {
                        if event == WatchEvent::SessionEnded {
                            if session.state().borrow().is_terminal() {
                                return;
                            }
                            first = true; // a connection event: re-arm and re-read
                        } else if dirty.send(cluster).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Resolves when the session's state turns terminal (or its sender is gone).
async fn session_ended(state: &mut tokio::sync::watch::Receiver<cloudtask_coord::SessionState>) {
    let _ = state.wait_for(|s| s.is_terminal()).await.map(|_| ());
}

async fn next_changes(changes: &mut Option<Changes>) -> Option<Vec<ClusterId>> {
    match changes {
        Some(changes) => changes.next_batch().await,
        None => std::future::pending().await,
    }
}
