//! Firing: one timer heap for every assigned task, fed by the mirrored specs, and the
//! claim → run → report path of every fire (DESIGN §4).
//!
//! - One actor owns all state: assignments, specs, the heap of next fires, the runs in
//!   flight. Timers are entries in one `BinaryHeap` and the actor sleeps until the
//!   earliest, so thousands of schedules cost one sleeping future, not one each.
//! - A newly assigned task first asks the API where its fires stand (the latest fire
//!   claimed, or the task's last change): the fires due since, while nobody ran them,
//!   are misfires. `SKIP` records each as a SKIPPED run; `RUN_ONCE` runs the latest one
//!   that is still within the grace period and records the rest as SKIPPED.
//! - Every fire is claimed before anything starts; a refused claim starts nothing. A
//!   scheduled fire is claimed `CLAIM_AHEAD` before its time, so at the fire time only
//!   the spawn is left; its real start is reported with its lines. Once its claim is in,
//!   its shell is staged (started, holding before the command: `exec::stage`), so at the
//!   fire time not even the spawn is left. A claimed fire that is not started after all
//!   (the task changed, moved or was paused in between, the worker could not fire it on
//!   time, an overlap SKIP) is reported SKIPPED; its held shell is killed unrun.
//! - Overlap: `SKIP` records a SKIPPED run, `ALLOW` starts another, `REPLACE` stops the
//!   running ones first. Retries are new attempts of the same fire after a backoff.
//! - When a task's assignment goes (moved, paused, deleted) or the session's epoch ends,
//!   its processes are stopped and reported STOPPED.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_coord::layout::{self, CommandNode, TaskNode};
use cloudtask_coord::{Coordinator, SharedSession, WatchEvent};
use cloudtask_core::ids::{ClusterId, RunId, TaskId};
use cloudtask_core::run::{Claim, RunStatus, RunTrigger};
use cloudtask_core::schedule::Schedule;
use cloudtask_core::task::{MisfirePolicy, OverlapPolicy};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::claims::Claims;
use crate::client::{ApiClient, CallError};
use crate::clock::Clock;
use crate::exec::{ExecLimits, RunSpec, Staged, execute, execute_staged, stage};
use crate::membership::Assignments;
use crate::packages::Packages;
use crate::report::{Report, Reporter};

/// At most this many missed fires are accounted for on a takeover (the latest ones).
const MAX_MISFIRES: usize = 1_000;
/// Takeover catch-ups in flight at once.
const CATCH_UP_CONCURRENCY: usize = 16;
/// A timer that goes off this much after its fire time means the worker could not fire
/// on time (it was stopped or suspended, or the clock jumped): the fire is a misfire.
const LATE: chrono::Duration = chrono::Duration::seconds(2);
/// A scheduled fire's claim is retried this long while the API is unreachable (longer
/// for `RUN_ONCE`: its grace period).
const CLAIM_PATIENCE: Duration = Duration::from_secs(5);
/// How long a manual run handed to this worker waits for its task to arrive here (its
/// assignment and spec are read apart from the command, and may come after it).
const EARLY_PATIENCE: Duration = Duration::from_secs(60);
/// Scheduled fires are claimed this long before their time. Well below the session
/// timeout: a worker whose session has ended cannot still hold a claim for a fire that
/// a new owner is due to run.
const CLAIM_AHEAD: chrono::Duration = chrono::Duration::milliseconds(400);

/// A fire claimed ahead of its time. `result` turns `Some(Some(run))` once the claim is
/// in, `Some(None)` when it was refused or given up (then recorded as missed); closed
/// when the claim's job ended without an answer (shutdown).
struct PreClaim {
    claim: Claim,
    result: watch::Receiver<Option<Option<RunId>>>,
    /// The fire's shell, staged before the answer is given (with the task version it
    /// was staged from); taken when the fire starts, killed when it does not.
    staged: StagedSlot,
}

type StagedSlot = Arc<Mutex<Option<(u32, Staged)>>>;

impl PreClaim {
    /// The claimed run, once the claim has an answer.
    async fn run(mut self) -> Option<RunId> {
        match self.result.wait_for(Option::is_some).await {
            Ok(answer) => answer.flatten(),
            Err(_) => None,
        }
    }
}

/// What the engine needs from the rest of the worker.
pub struct Engine {
    pub clock: Arc<dyn Clock>,
    pub cluster: ClusterId,
    pub worker: String,
    pub coordinator: Arc<dyn Coordinator>,
    pub client: Arc<ApiClient>,
    pub reporter: Reporter,
    pub packages: Arc<Packages>,
    pub limits: ExecLimits,
}

struct TaskEntry {
    watcher: CancellationToken,
    node: Option<TaskNode>,
    schedule: Option<Schedule>,
    /// New on every spec change, and for every adoption (from one counter for all
    /// tasks): heap entries of any other generation are stale, also those left by an
    /// earlier time the worker held the task.
    generation: u64,
    /// The latest fire accounted for; None until the takeover catch-up is done.
    cursor: Option<DateTime<Utc>>,
    catching_up: bool,
}

struct ActiveRun {
    id: u64,
    stop: CancellationToken,
    /// Cancelled when the run's job ends (a REPLACE waits on it).
    ended: CancellationToken,
}

enum Event {
    Spec(TaskId, Option<Box<TaskNode>>),
    CaughtUp {
        task: TaskId,
        since: DateTime<Utc>,
    },
    Done {
        task: TaskId,
        id: u64,
        retry: Option<(DateTime<Utc>, u32)>,
    },
    Command(CommandNode),
}

/// How a run gets its record before it starts.
enum Start {
    /// A scheduled fire or a retry: claimed under its unique key.
    Claim(Claim),
    /// A scheduled fire claimed ahead of its time.
    Claimed(PreClaim),
    /// A manual run queued by a user and handed to this worker.
    Queued(RunId),
}

/// Everything one fire's task needs, cloned out of the actor.
#[derive(Clone)]
struct Shared {
    worker: String,
    client: Arc<ApiClient>,
    claims: Claims,
    reporter: Reporter,
    packages: Arc<Packages>,
    limits: ExecLimits,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    /// Runs in progress by id, for stop commands.
    running: Arc<Mutex<HashMap<RunId, CancellationToken>>>,
    /// Takeover catch-ups asking the API at once (a worker given thousands of tasks
    /// must not open thousands of requests).
    catch_ups: Arc<tokio::sync::Semaphore>,
}

impl Engine {
    /// Runs until `shutdown`; then stops every run, reports them, and returns.
    pub async fn run(
        self,
        mut assignments: watch::Receiver<Assignments>,
        shutdown: CancellationToken,
    ) {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let reads = Arc::new(SharedSession::new(self.coordinator.clone()));
        let shared = Shared {
            worker: self.worker.clone(),
            claims: Claims::spawn(self.client.clone()),
            client: self.client.clone(),
            reporter: self.reporter.clone(),
            packages: self.packages.clone(),
            limits: self.limits,
            events: events_tx,
            shutdown: shutdown.clone(),
            running: Arc::default(),
            catch_ups: Arc::new(tokio::sync::Semaphore::new(CATCH_UP_CONCURRENCY)),
        };
        tokio::spawn(watch_commands(
            reads.clone(),
            self.cluster,
            self.worker.clone(),
            shared.events.clone(),
            shutdown.clone(),
        ));
        let mut actor = Actor {
            clock: self.clock.clone(),
            cluster: self.cluster,
            shared,
            reads,
            epoch: 0,
            hurry: CancellationToken::new(),
            generations: 0,
            tasks: HashMap::new(),
            heap: BinaryHeap::new(),
            claims: BinaryHeap::new(),
            preclaims: HashMap::new(),
            runs: HashMap::new(),
            early: HashMap::new(),
            next_run: 0,
            jobs: JoinSet::new(),
        };
        let current = assignments.borrow_and_update().clone();
        actor.assignments_changed(current);
        // The sleep until the next deadline is kept across loop turns while the deadlines
        // stay the same (a precise sleep is not free to set up again on every event).
        let mut armed = None;
        let mut sleep: futures_util::future::BoxFuture<'static, ()> =
            Box::pin(std::future::pending());
        loop {
            let next_fire = actor.heap.peek().map(|Reverse((at, _, _))| *at);
            let next_claim = actor.claims.peek().map(|Reverse((at, _, _, _))| *at);
            if armed != Some((next_fire, next_claim)) {
                armed = Some((next_fire, next_claim));
                // Two sleeps, so the clock sees both deadlines (a test clock waits for the
                // fire's own).
                let until = |at: Option<DateTime<Utc>>| match at {
                    Some(at) => actor.clock.sleep_until(at),
                    None => Box::pin(std::future::pending()),
                };
                let (fire, claim) = (until(next_fire), until(next_claim));
                sleep = Box::pin(async move {
                    tokio::select! {
                        _ = fire => {}
                        _ = claim => {}
                    }
                });
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = assignments.changed() => {
                    if changed.is_err() { break; }
                    let current = assignments.borrow_and_update().clone();
                    actor.assignments_changed(current);
                }
                Some(event) = events.recv() => actor.handle(event),
                _ = &mut sleep => {
                    armed = None;
                    actor.claim_due();
                    actor.fire_due();
                }
                Some(_) = actor.jobs.join_next(), if !actor.jobs.is_empty() => {}
            }
        }
        actor.stop_all();
        while actor.jobs.join_next().await.is_some() {}
    }
}

/// (claim time, task, generation, fire time) of a fire to claim ahead.
type ClaimAhead = (DateTime<Utc>, TaskId, u64, DateTime<Utc>);

struct Actor {
    clock: Arc<dyn Clock>,
    cluster: ClusterId,
    shared: Shared,
    reads: Arc<SharedSession>,
    epoch: u64,
    /// Cancelled when `epoch` ends: the runs started in it are then stopped in a hurry
    /// (the session is gone or may be, and with it the hold on their fires).
    hurry: CancellationToken,
    /// The last generation handed out (see [`TaskEntry::generation`]).
    generations: u64,
    tasks: HashMap<TaskId, TaskEntry>,
    heap: BinaryHeap<Reverse<(DateTime<Utc>, TaskId, u64)>>,
    claims: BinaryHeap<Reverse<ClaimAhead>>,
    preclaims: HashMap<(TaskId, DateTime<Utc>), PreClaim>,
    runs: HashMap<TaskId, Vec<ActiveRun>>,
    /// Manual runs handed to this worker that wait for their task (see
    /// [`Actor::run_now`]), with when they came.
    early: HashMap<TaskId, Vec<(RunId, tokio::time::Instant)>>,
    next_run: u64,
    jobs: JoinSet<()>,
}

impl Actor {
    fn assignments_changed(&mut self, current: Assignments) {
        if current.epoch != self.epoch {
            // A new session, or the worker fenced itself off (a long disconnection):
            // nothing read before may be acted on, and what runs stops in a hurry.
            self.hurry.cancel();
            self.hurry = CancellationToken::new();
            let all: Vec<TaskId> = self.tasks.keys().copied().collect();
            for task in all {
                self.drop_task(task);
            }
            self.early.clear();
            self.epoch = current.epoch;
        }
        // Handed here for a task that never came: the scheduler hands the run to the
        // task's owner again when that is another worker.
        self.early.retain(|task, runs| {
            if !current.tasks.contains(task) {
                runs.retain(|(_, came)| came.elapsed() < EARLY_PATIENCE);
            }
            !runs.is_empty()
        });
        let gone: Vec<TaskId> = self
            .tasks
            .keys()
            .filter(|t| !current.tasks.contains(t))
            .copied()
            .collect();
        for task in gone {
            self.drop_task(task);
        }
        for task in current.tasks {
            if !self.tasks.contains_key(&task) {
                self.adopt(task);
            }
        }
    }

    fn adopt(&mut self, task: TaskId) {
        let watcher = CancellationToken::new();
        let generation = self.next_generation();
        self.tasks.insert(
            task,
            TaskEntry {
                watcher: watcher.clone(),
                node: None,
                schedule: None,
                generation,
                cursor: None,
                catching_up: false,
            },
        );
        let path = layout::task(self.cluster, task);
        let reads = self.reads.clone();
        let events = self.shared.events.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                let read = match reads.get().await {
                    Ok(session) => session.get_and_watch(&path).await,
                    Err(e) => Err(e),
                };
                let watch = match read {
                    Ok((node, watch)) => {
                        backoff.reset();
                        let node = node
                            .and_then(|n| layout::decode::<TaskNode>(&path, &n.data).ok())
                            .map(Box::new);
                        if events.send(Event::Spec(task, node)).is_err() {
                            return;
                        }
                        watch
                    }
                    Err(e) => {
                        tracing::debug!(%task, error = %e, "cannot read the task spec; retrying");
                        if !backoff.wait(&watcher).await {
                            return;
                        }
                        continue;
                    }
                };
                tokio::select! {
                    _ = watcher.cancelled() => return,
                    event = watch.fired() => {
                        if event == WatchEvent::SessionEnded && !backoff.wait(&watcher).await {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// A generation no task entry has had.
    fn next_generation(&mut self) -> u64 {
        self.generations += 1;
        self.generations
    }

    fn drop_task(&mut self, task: TaskId) {
        if let Some(entry) = self.tasks.remove(&task) {
            entry.watcher.cancel();
        }
        // Handed to the task's next owner by the scheduler.
        self.early.remove(&task);
        self.abandon_claims(
            task,
            "not started: the task left this worker before its fire time",
        );
        if let Some(runs) = self.runs.get(&task) {
            for run in runs {
                run.stop.cancel();
            }
        }
    }

    fn stop_all(&mut self) {
        let all: Vec<TaskId> = self.tasks.keys().copied().collect();
        for task in all {
            self.drop_task(task);
        }
        let claimed: Vec<PreClaim> = self.preclaims.drain().map(|(_, c)| c).collect();
        for claimed in claimed {
            self.abandon(
                claimed,
                "not started: the worker shut down before its fire time",
            );
        }
        for runs in self.runs.values() {
            for run in runs {
                run.stop.cancel();
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Spec(task, node) => {
                self.spec_changed(task, node.map(|n| *n));
                self.start_early(task);
            }
            Event::CaughtUp { task, since } => self.caught_up(task, since),
            Event::Command(CommandNode::RunNow { task, run }) => self.run_now(task, run),
            Event::Command(CommandNode::Stop { run }) => {
                let running = self.shared.running.lock().expect("run registry");
                match running.get(&run) {
                    Some(stop) => stop.cancel(),
                    None => tracing::info!(%run, "stop for a run not going here"),
                }
            }
            Event::Done { task, id, retry } => {
                if let Some(runs) = self.runs.get_mut(&task) {
                    runs.retain(|r| r.id != id);
                    if runs.is_empty() {
                        self.runs.remove(&task);
                    }
                }
                if let Some((scheduled_at, attempt)) = retry
                    && self.is_active(task)
                {
                    self.dispatch(task, scheduled_at, attempt, RunTrigger::Retry);
                }
            }
        }
    }

    /// A manual run handed to this worker. The scheduler hands it over once the task's
    /// assignment here is written, but this worker reads its assignments, each task's
    /// spec and its commands on watches of their own: the command can come first. Then
    /// the run waits for the task (a while, see [`EARLY_PATIENCE`]) instead of staying
    /// QUEUED for good.
    fn run_now(&mut self, task: TaskId, run: RunId) {
        let came = tokio::time::Instant::now();
        self.early.entry(task).or_default().push((run, came));
        self.start_early(task);
    }

    /// Starts the manual runs waiting for their task, once its spec is read. A spec read
    /// as absent is one not mirrored yet as much as a deleted one: they wait on (a
    /// deleted task leaves this worker's assignments, and they go with it).
    fn start_early(&mut self, task: TaskId) {
        if self.tasks.get(&task).is_none_or(|e| e.node.is_none()) {
            return;
        }
        for (run, _) in self.early.remove(&task).unwrap_or_default() {
            self.start_run(task, Start::Queued(run), Vec::new());
        }
    }

    fn is_active(&self, task: TaskId) -> bool {
        self.tasks
            .get(&task)
            .and_then(|e| e.node.as_ref())
            .is_some_and(|n| !n.paused)
    }

    fn spec_changed(&mut self, task: TaskId, node: Option<TaskNode>) {
        if self.tasks.get(&task).is_none_or(|e| e.node == node) {
            return;
        }
        let generation = self.next_generation();
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        entry.generation = generation;
        entry.schedule = node.as_ref().and_then(|n| match n.spec.validate() {
            Ok(schedule) => Some(schedule),
            Err(e) => {
                tracing::warn!(%task, error = %e, "the mirrored schedule does not parse");
                None
            }
        });
        entry.node = node;
        // Fires claimed ahead under the old spec: kept if the new one fires then too,
        // released if it does not (paused, deleted, rescheduled).
        let firing = entry
            .node
            .as_ref()
            .is_some_and(|n| !n.paused)
            .then(|| entry.schedule.clone())
            .flatten();
        let claimed: Vec<DateTime<Utc>> = self
            .preclaims
            .keys()
            .filter(|(t, _)| *t == task)
            .map(|(_, at)| *at)
            .collect();
        for at in claimed {
            let keep = firing
                .as_ref()
                .is_some_and(|s| s.next_after(at - chrono::Duration::milliseconds(1)) == Some(at));
            if keep {
                // Kept, but its shell was staged from the old spec: killed now; the
                // fire starts from the new one at its time.
                if let Some(claimed) = self.preclaims.get(&(task, at)) {
                    drop(claimed.staged.lock().expect("staged slot").take());
                }
            } else if let Some(claimed) = self.preclaims.remove(&(task, at)) {
                self.abandon(
                    claimed,
                    "not started: the task changed before its fire time",
                );
            }
        }
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        if entry.node.as_ref().is_none_or(|n| n.paused) || entry.schedule.is_none() {
            return;
        }
        match entry.cursor {
            Some(cursor) => {
                // An edit: fire on the new schedule from where the old one stood.
                let from = cursor.max(self.clock.now());
                self.arm(task, from);
            }
            None if !entry.catching_up => {
                entry.catching_up = true;
                let client = self.shared.client.clone();
                let events = self.shared.events.clone();
                let shutdown = self.shared.shutdown.clone();
                let permits = self.shared.catch_ups.clone();
                self.jobs.spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let mut backoff =
                        Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
                    loop {
                        match client.fire_cursor(task).await {
                            Ok(since) => {
                                let _ = events.send(Event::CaughtUp { task, since });
                                return;
                            }
                            Err(CallError::Refused(why)) => {
                                tracing::warn!(%task, %why, "no fire cursor for the task");
                                return;
                            }
                            Err(CallError::Unavailable(_)) => {
                                if !backoff.wait(&shutdown).await {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            None => {}
        }
    }

    /// The takeover catch-up: account for the fires due in (since, now], then arm.
    fn caught_up(&mut self, task: TaskId, since: DateTime<Utc>) {
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        entry.catching_up = false;
        self.account_missed(task, since, "misfire: no worker could run it on time");
    }

    /// Fires due in (since, now] that nobody ran: SKIP records each as SKIPPED;
    /// RUN_ONCE runs the latest if it is within the grace period and records the rest.
    /// Then the task is armed from now.
    fn account_missed(&mut self, task: TaskId, since: DateTime<Utc>, reason: &str) {
        let now = self.clock.now();
        let Some(entry) = self.tasks.get_mut(&task) else {
            return;
        };
        let (Some(schedule), Some(node)) = (entry.schedule.clone(), entry.node.clone()) else {
            return;
        };
        entry.cursor = Some(now);
        let mut missed = Vec::new();
        let mut at = since;
        while let Some(next) = schedule.next_after(at) {
            if next > now {
                break;
            }
            missed.push(next);
            at = next;
        }
        if missed.len() > MAX_MISFIRES {
            missed.drain(..missed.len() - MAX_MISFIRES);
        }
        let grace = chrono::Duration::seconds(node.spec.misfire_grace_seconds as i64);
        let run_once = match node.spec.misfire_policy {
            MisfirePolicy::RunOnce => missed.last().copied().filter(|at| now - *at <= grace),
            MisfirePolicy::Skip => None,
        };
        if !node.paused {
            for at in &missed {
                if Some(*at) != run_once {
                    match self.preclaims.remove(&(task, *at)) {
                        Some(claimed) => self.abandon(claimed, reason),
                        None => self.record_skipped(task, &node, *at, reason),
                    }
                }
            }
            if let Some(at) = run_once {
                self.dispatch(task, at, 0, RunTrigger::Schedule);
            }
        }
        self.arm(task, now);
    }

    fn arm(&mut self, task: TaskId, after: DateTime<Utc>) {
        let Some(entry) = self.tasks.get(&task) else {
            return;
        };
        if let Some(next) = entry.schedule.as_ref().and_then(|s| s.next_after(after)) {
            self.heap.push(Reverse((next, task, entry.generation)));
            self.claims
                .push(Reverse((next - CLAIM_AHEAD, task, entry.generation, next)));
        }
    }

    /// Claims the fires due within `CLAIM_AHEAD`.
    fn claim_due(&mut self) {
        let now = self.clock.now();
        while let Some(Reverse((at, task, generation, fire_at))) = self.claims.peek().copied() {
            if at > now {
                break;
            }
            self.claims.pop();
            let Some(entry) = self.tasks.get(&task) else {
                continue;
            };
            if entry.generation != generation || entry.cursor.is_none() || !self.is_active(task) {
                continue;
            }
            if now - fire_at > LATE || self.preclaims.contains_key(&(task, fire_at)) {
                continue; // a misfire (the fire accounts for it), or claimed already
            }
            let Some(node) = entry.node.clone() else {
                continue;
            };
            let claim = Claim {
                task_id: task,
                scheduled_at: fire_at,
                attempt: 0,
                task_version: node.version,
                worker: self.shared.worker.clone(),
                trigger: RunTrigger::Schedule,
                status: RunStatus::Running,
                reason: None,
            };
            let (tx, rx) = watch::channel(None);
            let staged = StagedSlot::default();
            self.preclaims.insert(
                (task, fire_at),
                PreClaim {
                    claim: claim.clone(),
                    result: rx,
                    staged: staged.clone(),
                },
            );
            let shared = self.shared.clone();
            self.jobs.spawn(async move {
                let stop = shared.shutdown.clone();
                let run = claim_fire(&shared, &node, &claim, &stop).await;
                // Staged when its package is ready. A download would hold the answer
                // back: it starts now, in the background, and the fire waits for it at
                // its time (later fires are staged).
                let package = node.spec.package_sha256.clone();
                if let Some(run) = run
                    && !stop.is_cancelled()
                {
                    match shared.packages.cached(package.as_deref()) {
                        Some(workdir) => {
                            if let Some(shell) = stage(run_spec(&node, run, &claim, workdir)) {
                                *staged.lock().expect("staged slot") = Some((node.version, shell));
                            }
                        }
                        None => {
                            let packages = shared.packages.clone();
                            tokio::spawn(async move {
                                // Errors are the fire's to report, at its time.
                                let _ = packages.workdir(package.as_deref()).await;
                            });
                        }
                    }
                }
                let _ = tx.send(Some(run));
            });
        }
    }

    /// The task's claimed fires that will not start now: recorded SKIPPED.
    fn abandon_claims(&mut self, task: TaskId, reason: &str) {
        let keys: Vec<(TaskId, DateTime<Utc>)> = self
            .preclaims
            .keys()
            .filter(|(t, _)| *t == task)
            .copied()
            .collect();
        for key in keys {
            if let Some(claimed) = self.preclaims.remove(&key) {
                self.abandon(claimed, reason);
            }
        }
    }

    /// A claimed fire that is not started: once its claim is in, the API hears why (and
    /// records it SKIPPED, or drops it when the fire was not due after all).
    fn abandon(&mut self, claimed: PreClaim, reason: &str) {
        let reporter = self.shared.reporter.clone();
        let reason = reason.to_owned();
        self.jobs.spawn(async move {
            if let Some(run) = claimed.run().await {
                reporter.send(Report::Abandon { run, reason });
            }
        });
    }

    fn fire_due(&mut self) {
        let now = self.clock.now();
        let mut due = Vec::new();
        while let Some(Reverse((at, task, generation))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some(entry) = self.tasks.get_mut(&task) else {
                continue;
            };
            if entry.generation != generation || entry.cursor.is_none() {
                continue;
            }
            if now - at > LATE {
                // The worker was not running when this was due (stopped, suspended, the
                // clock jumped): a misfire, like the fires after it up to now.
                let since = at - chrono::Duration::milliseconds(1);
                self.account_missed(task, since, "misfire: the worker could not fire it on time");
                continue;
            }
            entry.cursor = Some(at);
            if !self.is_active(task) {
                continue;
            }
            due.push((task, at));
        }
        // The staged shells that go are let go first, back to back (the checks done).
        let mut first = HashSet::new();
        let going: Vec<StagedSlot> = due
            .iter()
            .filter(|(task, _)| first.insert(*task))
            .filter_map(|&(task, at)| self.goes_now(task, at))
            .collect();
        for slot in going {
            if let Some((_, shell)) = slot.lock().expect("staged slot").as_mut() {
                shell.release();
            }
        }
        for (task, at) in due {
            self.arm(task, at);
            self.dispatch(task, at, 0, RunTrigger::Schedule);
        }
    }

    /// The staged shell of a claimed fire due now, when [`Actor::dispatch`] will start
    /// it at once: its claim answer is in (so its job cannot take it for a stopped
    /// fire), it fits the task's spec, and no run of the task is going that it would
    /// wait for or be skipped for. The first fire of a task in a pass only: the
    /// others find it running (a second due at once is rare: a late pass).
    fn goes_now(&self, task: TaskId, at: DateTime<Utc>) -> Option<StagedSlot> {
        let node = self.tasks.get(&task)?.node.as_ref()?;
        let claimed = self.preclaims.get(&(task, at))?;
        if self.overlap(task, node) != Overlap::StartNow || claimed.result.borrow().is_none() {
            return None;
        }
        let slot = claimed.staged.lock().expect("staged slot");
        let (version, shell) = slot.as_ref()?;
        fits(shell, *version, node, &self.shared.packages).then(|| claimed.staged.clone())
    }

    /// What the overlap policy makes of a fire of `task` now: the one place that
    /// decides it, for the pass that lets staged shells go and for [`Actor::dispatch`].
    fn overlap(&self, task: TaskId, node: &TaskNode) -> Overlap {
        let running = self.runs.get(&task).is_some_and(|r| !r.is_empty());
        match node.spec.overlap_policy {
            _ if !running => Overlap::StartNow,
            OverlapPolicy::Allow => Overlap::StartNow,
            OverlapPolicy::Skip => Overlap::Skip,
            OverlapPolicy::Replace => Overlap::Replace,
        }
    }

    fn dispatch(
        &mut self,
        task: TaskId,
        scheduled_at: DateTime<Utc>,
        attempt: u32,
        trigger: RunTrigger,
    ) {
        let Some(node) = self.tasks.get(&task).and_then(|e| e.node.clone()) else {
            return;
        };
        let claimed = (trigger == RunTrigger::Schedule && attempt == 0)
            .then(|| self.preclaims.remove(&(task, scheduled_at)))
            .flatten();
        let mut replaced = Vec::new();
        match self.overlap(task, &node) {
            Overlap::StartNow => {}
            Overlap::Skip => {
                let reason = "overlap: the previous run is still going";
                match claimed {
                    Some(claimed) => self.abandon(claimed, reason),
                    None => self.record_skipped(task, &node, scheduled_at, reason),
                }
                return;
            }
            Overlap::Replace => {
                for run in &self.runs[&task] {
                    run.stop.cancel();
                    replaced.push(run.ended.clone());
                }
            }
        }
        if let Some(claimed) = claimed {
            // Its staged shell has been let go by `fire_due` if it could; otherwise
            // (it waits, or this is a late fire run once) its job lets it go.
            self.start_run(task, Start::Claimed(claimed), replaced);
            return;
        }
        let claim = Claim {
            task_id: task,
            scheduled_at,
            attempt,
            task_version: node.version,
            worker: self.shared.worker.clone(),
            trigger,
            status: RunStatus::Running,
            reason: None,
        };
        self.start_run(task, Start::Claim(claim), replaced);
    }

    /// Starts a run's job; it first waits for the runs it replaces to end.
    fn start_run(&mut self, task: TaskId, start: Start, replaced: Vec<CancellationToken>) {
        let Some(node) = self.tasks.get(&task).and_then(|e| e.node.clone()) else {
            return;
        };
        let id = self.next_run;
        self.next_run += 1;
        let stop = self.shared.shutdown.child_token();
        let ended = CancellationToken::new();
        self.runs.entry(task).or_default().push(ActiveRun {
            id,
            stop: stop.clone(),
            ended: ended.clone(),
        });
        let shared = self.shared.clone();
        let hurry = self.hurry.clone();
        self.jobs.spawn(async move {
            let _ended = ended.drop_guard();
            // REPLACE: the runs it replaces end (stopped) before this one starts.
            for previous in replaced {
                previous.cancelled().await;
            }
            let retry = run_fire(&shared, task, &node, start, &stop, &hurry).await;
            let _ = shared.events.send(Event::Done { task, id, retry });
        });
    }

    /// Records a fire that will not run, retrying until the API takes it.
    fn record_skipped(
        &mut self,
        task: TaskId,
        node: &TaskNode,
        scheduled_at: DateTime<Utc>,
        reason: &str,
    ) {
        let claim = Claim {
            task_id: task,
            scheduled_at,
            attempt: 0,
            task_version: node.version,
            worker: self.shared.worker.clone(),
            trigger: RunTrigger::Schedule,
            status: RunStatus::Skipped,
            reason: Some(reason.to_owned()),
        };
        self.jobs.spawn(record(self.shared.clone(), claim));
    }
}

/// What a fire does about a run of its task still going (see [`Actor::overlap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overlap {
    /// Starts at once: nothing is running, or the policy allows overlap.
    StartNow,
    /// Recorded SKIPPED.
    Skip,
    /// Starts once the running runs, stopped, have ended.
    Replace,
}

/// One fire: claim, prepare, run, report. Returns the retry to schedule, if any.
async fn run_fire(
    shared: &Shared,
    task: TaskId,
    node: &TaskNode,
    start: Start,
    stop: &CancellationToken,
    hurry: &CancellationToken,
) -> Option<(DateTime<Utc>, u32)> {
    let (run_id, claim, staged) = match start {
        Start::Claim(claim) => (claim_fire(shared, node, &claim, stop).await?, claim, None),
        Start::Claimed(claimed) => {
            let claim = claimed.claim.clone();
            let mut waiting = claimed.result.clone();
            let staged = claimed.staged.clone();
            let released = staged
                .lock()
                .expect("staged slot")
                .as_ref()
                .is_some_and(|(_, shell)| shell.released());
            // A shell let go at the fire time is running: it is supervised whatever
            // happens next (its answer was in). Otherwise the answer is usually in
            // already; if the API is slow, wait for it like a claim at the fire time
            // would, unless the fire is stopped first.
            let answer = if released {
                *waiting.borrow()
            } else {
                tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Stopped (moved, paused) before it could start.
                    let reporter = shared.reporter.clone();
                    tokio::spawn(async move {
                        if let Some(run) = claimed.run().await {
                            reporter.send(Report::Abandon {
                                run,
                                reason: "not started: the task left this worker before its fire time".into(),
                            });
                        }
                    });
                    return None;
                }
                answer = waiting.wait_for(Option::is_some) => {
                    answer.ok().and_then(|a| *a)
                }
                }
            };
            // A shell still held runs only if it fits the spec that runs now (an edit
            // that kept the fire: that shell is killed and the fire starts afresh).
            let shell = staged.lock().expect("staged slot").take();
            let shell = shell
                .filter(|(version, shell)| {
                    shell.released() || fits(shell, *version, node, &shared.packages)
                })
                .map(|(_, shell)| shell);
            (answer.flatten()?, claim, shell)
        }
        Start::Queued(run) => match shared.client.start(run, &shared.worker).await {
            Ok(started) => {
                let claim = Claim {
                    task_id: task,
                    scheduled_at: started.scheduled_at,
                    attempt: started.attempt,
                    task_version: node.version,
                    worker: shared.worker.clone(),
                    trigger: started.trigger,
                    status: RunStatus::Running,
                    reason: None,
                };
                (started.run_id, claim, None)
            }
            Err(e) => {
                tracing::warn!(%run, error = %e, "cannot start the queued run");
                return None;
            }
        },
    };
    shared
        .running
        .lock()
        .expect("run registry")
        .insert(run_id, stop.clone());
    let retry = execute_fire(shared, node, run_id, &claim, staged, stop, hurry).await;
    shared.running.lock().expect("run registry").remove(&run_id);
    retry
}

/// Claims a scheduled fire, retrying while the API is unreachable for as long as the
/// misfire policy allows; None when it is refused or given up (then recorded SKIPPED).
async fn claim_fire(
    shared: &Shared,
    node: &TaskNode,
    claim: &Claim,
    stop: &CancellationToken,
) -> Option<RunId> {
    let spec = &node.spec;
    let patience = match spec.misfire_policy {
        MisfirePolicy::RunOnce => {
            Duration::from_secs(spec.misfire_grace_seconds as u64).max(CLAIM_PATIENCE)
        }
        MisfirePolicy::Skip => CLAIM_PATIENCE,
    };
    let give_up = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match shared.claims.claim(claim.clone()).await {
            Ok(run_id) => return Some(run_id),
            Err(CallError::Refused(why)) => {
                tracing::debug!(task = %claim.task_id, at = %claim.scheduled_at, %why, "claim refused");
                // Claimed by another worker already (the record exists), or not runnable
                // any more: paused or moved while this claim waited for the API. A fire
                // that was due still needs its record; the API keeps it single and takes
                // it only if the fire was due.
                let mut missed = claim.clone();
                missed.status = RunStatus::Skipped;
                missed.reason = Some(format!("misfire: the claim was refused ({why})"));
                tokio::spawn(record(shared.clone(), missed));
                return None;
            }
            Err(CallError::Unavailable(why)) => {
                if tokio::time::Instant::now() >= give_up || stop.is_cancelled() {
                    tracing::warn!(task = %claim.task_id, at = %claim.scheduled_at, %why,
                        "cannot claim the fire in time; recording it as missed");
                    tokio::spawn(record_missed(shared.clone(), claim.clone()));
                    return None;
                }
                if !backoff.wait(stop).await {
                    // Stopped (the task was paused or moved) while the API was away: the
                    // fire still gets its record, or the ledger would have a hole.
                    tokio::spawn(record_missed(shared.clone(), claim.clone()));
                    return None;
                }
            }
        }
    }
}

/// Runs a fire that has its record, reports the outcome, and returns the retry to
/// schedule, if any.
async fn execute_fire(
    shared: &Shared,
    node: &TaskNode,
    run_id: RunId,
    claim: &Claim,
    staged: Option<Staged>,
    stop: &CancellationToken,
    hurry: &CancellationToken,
) -> Option<(DateTime<Utc>, u32)> {
    let spec = &node.spec;
    let workdir = match staged {
        Some(ref shell) => Ok(shell.spec().workdir.clone()),
        None => {
            shared
                .packages
                .workdir(spec.package_sha256.as_deref())
                .await
        }
    };
    let outcome = match workdir {
        Ok(workdir) => {
            shared.reporter.send(Report::Started {
                run: run_id,
                at: Utc::now(),
            });
            match staged {
                Some(shell) => {
                    execute_staged(shell, shared.limits, &shared.reporter, stop, hurry).await
                }
                None => {
                    let run = run_spec(node, run_id, claim, workdir);
                    execute(&run, shared.limits, &shared.reporter, stop, hurry).await
                }
            }
        }
        Err(e) => {
            let message = e.to_string();
            shared.reporter.send(Report::Logs {
                run: run_id,
                lines: vec![cloudtask_core::run::LogLine {
                    offset: 0,
                    stream: cloudtask_core::run::LogStream::System,
                    at: Utc::now(),
                    text: message.clone(),
                }],
            });
            cloudtask_core::run::Outcome {
                status: RunStatus::Failed,
                exit_code: None,
                signal: None,
                error: Some(message),
                finished_at: Utc::now(),
            }
        }
    };
    let retryable = matches!(outcome.status, RunStatus::Failed | RunStatus::TimedOut);
    shared.reporter.send(Report::Finish {
        run: run_id,
        outcome,
    });
    if !retryable || claim.trigger == RunTrigger::Manual || claim.attempt >= spec.max_retries {
        return None;
    }
    // Backoff doubles per attempt, with jitter, capped at an hour.
    let base = Duration::from_secs(spec.retry_backoff_seconds.max(1) as u64);
    let mut delay = Backoff::new(base, Duration::from_secs(3600));
    let mut wait = delay.next_delay();
    for _ in 0..claim.attempt {
        wait = delay.next_delay();
    }
    tokio::select! {
        _ = stop.cancelled() => None,
        _ = tokio::time::sleep(wait) => Some((claim.scheduled_at, claim.attempt + 1)),
    }
}

/// Whether a held shell, staged from task version `version`, may run the fire of
/// `node`: the same version, and its package folder still there (one stat).
fn fits(shell: &Staged, version: u32, node: &TaskNode, packages: &Packages) -> bool {
    version == node.version
        && packages
            .cached(node.spec.package_sha256.as_deref())
            .as_ref()
            == Some(&shell.spec().workdir)
}

/// What runs for a claimed fire of the task.
fn run_spec(node: &TaskNode, run_id: RunId, claim: &Claim, workdir: std::path::PathBuf) -> RunSpec {
    let spec = &node.spec;
    RunSpec {
        run_id,
        task_id: claim.task_id,
        scheduled_at: claim.scheduled_at,
        attempt: claim.attempt,
        command: spec.command.clone(),
        env: spec.env.clone(),
        workdir,
        timeout: spec.timeout_seconds.map(|s| Duration::from_secs(s as u64)),
    }
}

/// A fire that could not be claimed in time is recorded SKIPPED once the API is back.
async fn record_missed(shared: Shared, mut claim: Claim) {
    claim.status = RunStatus::Skipped;
    claim.reason = Some("misfire: the API could not be reached in time".into());
    record(shared, claim).await;
}

/// Records a fire that is not run (a SKIPPED claim), retrying until the API takes it
/// (or refuses it: recorded already, or not due).
async fn record(shared: Shared, claim: Claim) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        match shared.claims.claim(claim.clone()).await {
            Ok(_) | Err(CallError::Refused(_)) => return,
            Err(CallError::Unavailable(_)) => {
                if !backoff.wait(&shared.shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Watches this worker's command folder and hands each command to the actor, in
/// sequence order, deleting it once handed over.
async fn watch_commands(
    reads: Arc<SharedSession>,
    cluster: ClusterId,
    worker: String,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
) {
    let folder = layout::commands(cluster, &worker);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let pass = async {
            let session = reads.get().await?;
            session.ensure_path(&folder).await?;
            let (names, watch) = session.children_and_watch(&folder).await?;
            for name in layout::by_sequence(names) {
                let path = layout::join(&folder, &name);
                if let Some(node) = session.get(&path).await? {
                    match layout::decode::<CommandNode>(&path, &node.data) {
                        Ok(command) => {
                            let _ = events.send(Event::Command(command));
                        }
                        Err(e) => tracing::warn!(error = %e, "ignoring a bad command"),
                    }
                }
                match session.delete(&path, None).await {
                    Ok(()) | Err(cloudtask_coord::CoordError::NoNode(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok::<_, cloudtask_coord::CoordError>(watch)
        };
        match pass.await {
            Ok(watch) => {
                backoff.reset();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = watch.fired() => {}
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read commands; retrying");
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
        }
    }
}
