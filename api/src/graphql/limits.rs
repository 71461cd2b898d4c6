//! Run limits in GraphQL: the `RunLimits` a task sets and its cluster defaults, their
//! input, and `RunReason`, the limit that ended a run.

use async_graphql::{Enum, InputObject, SimpleObject};
use cloudtask_core::limits::RunLimits;

/// What one run may use; null is "not set here" (a task's unset limit comes from its
/// cluster's defaults; unset there too, the run is bounded by its worker's machine only).
#[derive(SimpleObject)]
#[graphql(name = "RunLimits")]
pub struct RunLimitsObj {
    /// Memory of all the run's processes together, in MiB; past it the kernel kills one
    /// of them and the run is FAILED with reason OOM_KILLED.
    pub memory_mb: Option<u32>,
    /// CPU per wall second, in thousandths of a core (500: half a core).
    pub cpu_millis: Option<u32>,
    /// Processes and threads at once; a fork past it fails (reason PIDS_LIMIT).
    pub max_processes: Option<u32>,
    /// Bytes of output kept (both streams); past it the run ends (reason OUTPUT_LIMIT).
    pub max_output_bytes: Option<u64>,
}

impl From<RunLimits> for RunLimitsObj {
    fn from(l: RunLimits) -> Self {
        RunLimitsObj {
            memory_mb: l.memory_mb,
            cpu_millis: l.cpu_millis,
            max_processes: l.max_processes,
            max_output_bytes: l.max_output_bytes,
        }
    }
}

/// Limits to set; an omitted or null field is unset.
#[derive(InputObject, Clone, Copy, Default)]
pub struct RunLimitsInput {
    pub memory_mb: Option<u32>,
    pub cpu_millis: Option<u32>,
    pub max_processes: Option<u32>,
    pub max_output_bytes: Option<u64>,
}

impl From<RunLimitsInput> for RunLimits {
    fn from(l: RunLimitsInput) -> Self {
        RunLimits {
            memory_mb: l.memory_mb,
            cpu_millis: l.cpu_millis,
            max_processes: l.max_processes,
            max_output_bytes: l.max_output_bytes,
        }
    }
}

/// Why a run stands where it does: every run that has ended carries one, and a queued
/// run nobody can take says so (`WAITING_FOR_WORKER`). `Run.reasonMessage` says it in
/// words.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "RunReason", remote = "cloudtask_core::run::RunReason")]
pub enum RunReasonGql {
    /// The program exited (SUCCEEDED with code 0, FAILED otherwise).
    Exit,
    /// The program was killed by a signal (FAILED).
    Signal,
    /// The run took longer than the task's timeout (TIMED_OUT).
    Timeout,
    /// The program could not be started (its package, the command) (FAILED).
    StartFailed,
    /// Its memory limit: the kernel's OOM killer ended a process of it.
    OomKilled,
    /// Its process limit: a fork was refused.
    PidsLimit,
    /// Its output limit.
    OutputLimit,
    /// A user stopped it (STOPPED).
    UserStop,
    /// A user paused the task while it ran (STOPPED).
    TaskPaused,
    /// A later fire replaced it, by the task's overlap policy REPLACE (STOPPED).
    Replaced,
    /// Not run: the previous run was still going, overlap policy SKIP (SKIPPED).
    OverlapSkip,
    /// Not run on time (worker down, API unreachable, the claim refused) (SKIPPED).
    Misfire,
    /// Not run: the task changed before the fire time (SKIPPED).
    TaskChanged,
    /// Its worker's session ended while it ran (LOST; the retry policy applies).
    WorkerLost,
    /// Its worker lost its coordination session and stopped its runs (LOST; retried).
    Fenced,
    /// Its worker shut down (LOST; retried), or before the fire time (SKIPPED).
    Shutdown,
    /// The task left its worker (moved to another, deleted) (LOST, retried while the task
    /// exists; or SKIPPED before the fire time).
    TaskMoved,
    /// Queued longer than `queue_expiry_secs` with no worker to take it (FAILED).
    QueueExpired,
    /// Queued, and no live worker can take the task's runs yet.
    WaitingForWorker,
}
