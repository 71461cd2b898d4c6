//! What one run of a task may use: memory, CPU, processes and output. A task sets any of
//! them; what it leaves unset comes from its cluster's defaults; what both leave unset is
//! unbounded (the machine's). Workers enforce memory, CPU and processes with the kernel
//! (see the worker's `exec::contain`), output by counting what they read.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Smallest memory limit accepted: below this a shell cannot even start.
pub const MIN_MEMORY_MB: u32 = 8;
/// Largest memory limit accepted (1 TiB).
pub const MAX_MEMORY_MB: u32 = 1 << 20;
/// CPU in thousandths of a core: 1,000 is one core; at most 256 cores.
pub const MIN_CPU_MILLIS: u32 = 10;
pub const MAX_CPU_MILLIS: u32 = 256_000;
/// Processes (and threads) at once: at least the shell and one command.
pub const MIN_PROCESSES: u32 = 2;
pub const MAX_PROCESSES: u32 = 1 << 22;
/// Output of a run, stdout and stderr together.
pub const MIN_OUTPUT_BYTES: u64 = 1_024;

/// Limits of one run; `None` is "not set here".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunLimits {
    /// Memory of all the run's processes together, in MiB (page cache included, as the
    /// kernel counts it); past it the kernel's OOM killer ends one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// CPU time per wall second, in thousandths of a core (500 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Processes and threads alive at once; a fork past it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u32>,
    /// Bytes of output (both streams) kept; past it the run is ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
}

impl RunLimits {
    pub fn is_empty(&self) -> bool {
        *self == RunLimits::default()
    }

    /// These limits, each unset one taken from `defaults`.
    pub fn or(self, defaults: RunLimits) -> RunLimits {
        RunLimits {
            memory_mb: self.memory_mb.or(defaults.memory_mb),
            cpu_millis: self.cpu_millis.or(defaults.cpu_millis),
            max_processes: self.max_processes.or(defaults.max_processes),
            max_output_bytes: self.max_output_bytes.or(defaults.max_output_bytes),
        }
    }

    /// Each set limit within its range; the error names the input field (GraphQL
    /// spelling, under `limits`).
    pub fn validate(&self) -> Result<()> {
        fn check<T: PartialOrd + std::fmt::Display + Copy>(
            field: &str,
            value: Option<T>,
            min: T,
            max: T,
        ) -> Result<()> {
            match value {
                Some(v) if v < min || v > max => Err(Error::bad_input(
                    format!("limits.{field}"),
                    format!("must be between {min} and {max}"),
                )),
                _ => Ok(()),
            }
        }
        check("memoryMb", self.memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB)?;
        check("cpuMillis", self.cpu_millis, MIN_CPU_MILLIS, MAX_CPU_MILLIS)?;
        check(
            "maxProcesses",
            self.max_processes,
            MIN_PROCESSES,
            MAX_PROCESSES,
        )?;
        check(
            "maxOutputBytes",
            self.max_output_bytes,
            MIN_OUTPUT_BYTES,
            i32::MAX as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_limits_come_from_the_defaults_and_bad_ones_are_named() {
        let task = RunLimits {
            memory_mb: Some(64),
            ..RunLimits::default()
        };
        let cluster = RunLimits {
            memory_mb: Some(512),
            max_processes: Some(100),
            ..RunLimits::default()
        };
        let merged = task.or(cluster);
        assert_eq!(merged.memory_mb, Some(64));
        assert_eq!(merged.max_processes, Some(100));
        assert_eq!(merged.cpu_millis, None);
        assert!(merged.validate().is_ok());
        let bad = RunLimits {
            max_processes: Some(1),
            ..RunLimits::default()
        };
        match bad.validate() {
            Err(Error::BadInput { field, .. }) => assert_eq!(field, "limits.maxProcesses"),
            other => panic!("{other:?}"),
        }
        // Unset limits leave no trace in the spec's JSON.
        assert_eq!(serde_json::to_string(&RunLimits::default()).unwrap(), "{}");
    }
}
