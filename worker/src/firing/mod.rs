//! Firing: the claim → run → report path of every fire of the tasks assigned to this
//! worker (DESIGN §4), and the manual runs and stops handed to it.
//!
//! One actor owns all state (the assigned tasks and their specs, the timers, the fires
//! claimed ahead, the runs in flight); jobs it spawns report back to it as events. Each
//! concern has its module: [`tasks`] (adoption, spec changes, drops), [`timers`] (the
//! heap of next fires), [`claim`] (claims, claim-ahead and staged shells, SKIPPED
//! records), [`start`] (fire time, the run's job, retries), [`overlap`] (SKIP, ALLOW,
//! REPLACE), [`catch_up`] (misfires) and [`manual`] (run now, stop). The decisions
//! (what is due, what overlap does, which misfires to record, what a manual run waits
//! for) are plain functions and structs, tested without IO.

mod catch_up;
mod claim;
mod manual;
mod overlap;
mod start;
mod tasks;
mod timers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use cloudtask_coord::layout::{CommandNode, TaskNode};
use cloudtask_coord::{Coordinator, SharedSession};
use cloudtask_core::ids::{ClusterId, RunId, TaskId, WorkerId};
use cloudtask_core::run::{RunReason, RunTrigger};
use cloudtask_core::schedule::Schedule;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::claims::Claims;
use crate::client::ApiClient;
use crate::clock::Clock;
use crate::exec::ExecLimits;
use crate::membership::Assignments;
use crate::packages::Packages;
use crate::report::Reporter;
use claim::PreClaim;
use manual::ManualRuns;
use timers::Timers;

/// Takeover catch-ups in flight at once.
const CATCH_UP_CONCURRENCY: usize = 16;

/// What the engine needs from the rest of the worker.
pub struct Engine {
    pub clock: Arc<dyn Clock>,
    pub cluster: ClusterId,
    pub worker: WorkerId,
    pub coordinator: Arc<dyn Coordinator>,
    pub client: Arc<ApiClient>,
    pub reporter: Reporter,
    pub packages: Arc<Packages>,
    pub limits: ExecLimits,
}

impl Engine {
    /// Runs until `shutdown`; then stops every run, reports them, and returns. Takes the
    /// assignments and the commands membership publishes (see
    /// [`Membership::deliver_commands`](crate::Membership::deliver_commands)).
    pub async fn run(
        self,
        mut assignments: watch::Receiver<Assignments>,
        mut commands: mpsc::UnboundedReceiver<CommandNode>,
        shutdown: CancellationToken,
    ) {
        let (mut actor, mut events) = self.actor(shutdown.clone());
        actor.assignments_changed(assignments.borrow_and_update().clone());
        let mut alarm = Alarm::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = assignments.changed() => {
                    if changed.is_err() { break; }
                    actor.assignments_changed(assignments.borrow_and_update().clone());
                }
                Some(command) = commands.recv() => {
                    // Membership published the assignments read for this command first:
                    // they are taken in before it.
                    if assignments.has_changed().unwrap_or(false) {
                        actor.assignments_changed(assignments.borrow_and_update().clone());
                    }
                    actor.command(command);
                }
                Some(event) = events.recv() => actor.handle(event),
                _ = alarm.until(&actor.timers, actor.clock.as_ref()) => {
                    alarm.rang();
                    actor.claim_due();
                    actor.fire_due();
                }
                Some(_) = actor.jobs.join_next(), if !actor.jobs.is_empty() => {}
            }
        }
        actor.stop_all();
        while actor.jobs.join_next().await.is_some() {}
    }

    fn actor(self, shutdown: CancellationToken) -> (Actor, mpsc::UnboundedReceiver<Event>) {
        let (events_tx, events) = mpsc::unbounded_channel();
        let shared = Shared {
            worker: self.worker.clone(),
            claims: Claims::spawn(self.client.clone()),
            client: self.client,
            reporter: self.reporter,
            packages: self.packages,
            limits: self.limits,
            events: events_tx,
            shutdown,
            running: Arc::default(),
            live: overlap::Live::default(),
            catch_ups: Arc::new(tokio::sync::Semaphore::new(CATCH_UP_CONCURRENCY)),
        };
        let actor = Actor {
            clock: self.clock,
            cluster: self.cluster,
            shared,
            reads: Arc::new(SharedSession::new(self.coordinator)),
            epoch: 0,
            hurry: CancellationToken::new(),
            generations: 0,
            tasks: HashMap::new(),
            timers: Timers::default(),
            preclaims: HashMap::new(),
            runs: HashMap::new(),
            manual: ManualRuns::default(),
            next_run: 0,
            jobs: JoinSet::new(),
        };
        (actor, events)
    }
}

type Deadlines = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// The sleep until the next deadline (a fire or a claim ahead). Kept across loop turns
/// while the deadlines stay the same: a precise sleep is not free to set up again on
/// every event.
struct Alarm {
    /// The (fire, claim) deadlines the sleep is set for.
    armed: Option<Deadlines>,
    sleep: BoxFuture<'static, ()>,
}

impl Alarm {
    fn new() -> Self {
        Alarm {
            armed: None,
            sleep: Box::pin(std::future::pending()),
        }
    }

    fn until(&mut self, timers: &Timers, clock: &dyn Clock) -> &mut BoxFuture<'static, ()> {
        let deadlines = (timers.next_fire(), timers.next_claim());
        if self.armed != Some(deadlines) {
            self.armed = Some(deadlines);
            // Two sleeps, so the clock sees both deadlines (a test clock waits for the
            // fire's own).
            let until = |at: Option<DateTime<Utc>>| match at {
                Some(at) => clock.sleep_until(at),
                None => Box::pin(std::future::pending()),
            };
            let (fire, claim) = (until(deadlines.0), until(deadlines.1));
            self.sleep = Box::pin(async move {
                tokio::select! {
                    _ = fire => {}
                    _ = claim => {}
                }
            });
        }
        &mut self.sleep
    }

    /// The sleep is over: the next one is set up afresh.
    fn rang(&mut self) {
        self.armed = None;
    }
}

struct TaskEntry {
    watcher: CancellationToken,
    node: Option<TaskNode>,
    schedule: Option<Schedule>,
    /// New on every spec change, and for every adoption (from one counter for all
    /// tasks): timer entries of any other generation are stale, also those left by an
    /// earlier time the worker held the task.
    generation: u64,
    /// The latest fire accounted for; None until the takeover catch-up is done.
    cursor: Option<DateTime<Utc>>,
    catching_up: bool,
}

struct ActiveRun {
    id: u64,
    stop: Halt,
    /// Cancelled when the run's job ends (a REPLACE waits on it).
    ended: CancellationToken,
}

/// A run's stop, with why it was stopped: the first cause given wins. A run stopped with
/// no cause given was stopped by the worker's shutdown (its token is the shutdown's
/// child). The cause decides the outcome: a user's stop or a REPLACE is STOPPED; the
/// platform's (fence, shutdown, the task leaving) is LOST, which the task's retry policy
/// follows.
#[derive(Clone)]
struct Halt {
    token: CancellationToken,
    cause: Arc<std::sync::OnceLock<RunReason>>,
}

impl Halt {
    fn new(token: CancellationToken) -> Self {
        Halt {
            token,
            cause: Arc::default(),
        }
    }

    fn stop(&self, cause: RunReason) {
        let _ = self.cause.set(cause);
        self.token.cancel();
    }

    fn cause(&self) -> RunReason {
        self.cause.get().copied().unwrap_or(RunReason::Shutdown)
    }
}

/// What the actor's jobs report back.
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
}

/// Everything one fire's job needs, cloned out of the actor.
#[derive(Clone)]
struct Shared {
    worker: WorkerId,
    client: Arc<ApiClient>,
    claims: Claims,
    reporter: Reporter,
    packages: Arc<Packages>,
    limits: ExecLimits,
    events: mpsc::UnboundedSender<Event>,
    shutdown: CancellationToken,
    /// Runs in progress by id, for stop commands.
    running: Arc<Mutex<HashMap<RunId, Halt>>>,
    /// The runs whose processes are going, per task: what overlap looks at.
    live: overlap::Live,
    /// Takeover catch-ups asking the API at once (a worker given thousands of tasks
    /// must not open thousands of requests).
    catch_ups: Arc<tokio::sync::Semaphore>,
}

struct Actor {
    clock: Arc<dyn Clock>,
    cluster: ClusterId,
    shared: Shared,
    /// The session the specs are read on.
    reads: Arc<SharedSession>,
    epoch: u64,
    /// Cancelled when `epoch` ends: the runs started in it are then stopped in a hurry
    /// (the session is gone or may be, and with it the hold on their fires).
    hurry: CancellationToken,
    /// The last generation handed out (see [`TaskEntry::generation`]).
    generations: u64,
    tasks: HashMap<TaskId, TaskEntry>,
    timers: Timers,
    preclaims: HashMap<(TaskId, DateTime<Utc>), PreClaim>,
    runs: HashMap<TaskId, Vec<ActiveRun>>,
    manual: ManualRuns,
    next_run: u64,
    jobs: JoinSet<()>,
}

impl Actor {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Spec(task, node) => {
                self.spec_changed(task, node.map(|n| *n));
                self.start_manual(task);
            }
            Event::CaughtUp { task, since } => self.caught_up(task, since),
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
}
