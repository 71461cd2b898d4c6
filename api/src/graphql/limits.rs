//! Run limits in GraphQL: the `RunLimits` a task sets and its cluster defaults, their
//! input, and `RunReason`, the limit that ended a run.

use async_graphql::{Enum, InputObject, SimpleObject};
use cloudtask_core::limits::RunLimits;
use cloudtask_core::run::RunReason;

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

/// Why a run ended as it did, when its status alone does not say.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "RunReason")]
pub enum RunReasonGql {
    /// Its memory limit: the kernel's OOM killer ended a process of it.
    OomKilled,
    /// Its process limit: a fork was refused.
    PidsLimit,
    /// Its output limit.
    OutputLimit,
}

impl From<RunReason> for RunReasonGql {
    fn from(r: RunReason) -> Self {
        match r {
            RunReason::OomKilled => RunReasonGql::OomKilled,
            RunReason::PidsLimit => RunReasonGql::PidsLimit,
            RunReason::OutputLimit => RunReasonGql::OutputLimit,
        }
    }
}
