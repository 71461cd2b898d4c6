//! Running one claimed fire: `sh -c <command>` (`cmd /C` on Windows) in the unpacked
//! package folder, in a process group of its own, with the task's environment plus the
//! run's identity and nothing of the worker's own (no credentials). Output is read line by
//! line from both streams, long lines split, bytes that are not text escaped, capped per
//! run (a run whose output was cut at the cap fails with OUTPUT_LIMIT), and handed to the
//! reporter while the run goes (see [`output`]). A timeout or a stop sends SIGTERM to
//! every process of the run, then SIGKILL after the grace period; when the main process
//! exits, whatever it left running is terminated the same way.
//!
//! A scheduled fire claimed ahead can be *staged* (see [`staging`]): its shell started
//! before the fire time and held before the command, so at the fire time only a
//! one-byte write is left.
//!
//! Every process of a run ends with it, group or not: [`contain`] holds them (a cgroup per
//! run where the machine allows, else the run's process tree), and enforces the task's
//! limits.

mod cgroup;
mod contain;
mod group;
pub mod identity;
mod output;
mod procs;
mod staging;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::limits::RunLimits;
use cloudtask_core::run::{Outcome, RunReason, RunStatus};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::report::Reporter;
use contain::Members;
pub use contain::{Containment, Mode as ContainmentMode};
use group::terminate_group;
pub use output::OutputSummary;
use output::{LineSink, read_streams};
#[cfg(unix)]
pub use staging::HOLD;
pub use staging::{Staged, stage};

/// Per-run limits, from the configuration, and how runs are held.
#[derive(Debug, Clone)]
pub struct ExecLimits {
    pub max_lines: u64,
    /// Most bytes of output (as printed) kept per run.
    pub max_output_bytes: u64,
    pub max_line_bytes: usize,
    /// Between SIGTERM and SIGKILL when a run is stopped or times out.
    pub kill_grace: Duration,
    /// The grace instead, when the run is stopped in a hurry (see [`execute`]): short
    /// enough that the group is gone before the worker's coordination session can expire.
    pub hurried_grace: Duration,
    pub containment: Containment,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub run_id: RunId,
    pub task_id: TaskId,
    pub scheduled_at: DateTime<Utc>,
    pub attempt: u32,
    pub command: String,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    pub timeout: Option<Duration>,
    /// Whom it runs as, and its home (see [`identity`]).
    pub identity: std::sync::Arc<identity::RunIdentity>,
    /// The task's limits, its cluster's defaults filled in.
    pub limits: RunLimits,
}

/// Variables of the worker's own environment a program may see; everything else of the
/// worker (its credentials above all) stays out. HOME and TMPDIR are the run's own.
const INHERITED: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];

/// Raises the soft limit of open files to the hard one: every running or staged fire
/// holds three of the worker's descriptors, and the usual soft default (1,024) is low
/// for a worker of many tasks.
pub fn raise_open_files_limit() {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        {
            tracing::debug!(error = %e, soft, hard, "cannot raise the open files limit");
        }
    }
}

/// Runs the fire to its end and returns the outcome; the log lines have been handed to
/// `reporter` by then. Cancelling `stop` ends the run as STOPPED; if `hurry` is cancelled
/// by then, its group gets the hurried grace between SIGTERM and SIGKILL (the worker lost
/// its hold on the task's fires, and a retry of this fire may be handed to another
/// worker once the session has expired).
pub async fn execute(
    spec: &RunSpec,
    limits: ExecLimits,
    reporter: &Reporter,
    stop: &CancellationToken,
    hurry: &CancellationToken,
) -> Outcome {
    // Off the runtime's threads: making a cgroup and moving a process into one (v1
    // waits for an RCU grace period) block for milliseconds.
    let (owned, containment) = (spec.clone(), limits.containment.clone());
    let spawned = tokio::task::spawn_blocking(move || contain::spawn(&owned, &containment))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    supervise_logged(spec, spawned, limits, reporter, stop, hurry).await
}

/// [`execute`] for a staged fire: lets its shell go on to the command (if
/// [`Staged::release`] has not already).
pub async fn execute_staged(
    mut staged: Staged,
    limits: ExecLimits,
    reporter: &Reporter,
    stop: &CancellationToken,
    hurry: &CancellationToken,
) -> Outcome {
    staged.release();
    let child = staged
        .child
        .take()
        .zip(staged.members.take())
        .ok_or_else(|| std::io::Error::other("the staged shell was run already"));
    supervise_logged(&staged.spec, child, limits, reporter, stop, hurry).await
}

async fn supervise_logged(
    spec: &RunSpec,
    spawned: std::io::Result<(Child, Members)>,
    limits: ExecLimits,
    reporter: &Reporter,
    stop: &CancellationToken,
    hurry: &CancellationToken,
) -> Outcome {
    // The task's own output limit, when it sets a smaller one than the worker's.
    let mut limits = limits;
    if let Some(task_cap) = spec.limits.max_output_bytes {
        limits.max_output_bytes = limits.max_output_bytes.min(task_cap);
    }
    let (lines, collector) = output::channel(spec.run_id, limits.clone(), reporter.clone());
    let collector = tokio::spawn(collector);
    let mut outcome = supervise(spec, spawned, &limits, stop, hurry, lines).await;
    let output = collector.await.unwrap_or_default();
    // Output dropped at the cap: the run did not do all it was meant to.
    if output.capped() && outcome.reason.is_none() {
        contain::ended_by(&mut outcome, RunReason::OutputLimit);
    }
    outcome
}

/// The fire's command; `staged`, its shell holds on its stdin first (see [`HOLD`]).
fn command(spec: &RunSpec, staged: bool) -> Command {
    #[cfg(unix)]
    let mut command = {
        let script = if staged {
            format!("{HOLD}{}", spec.command)
        } else {
            spec.command.clone()
        };
        // By its path: with PATH in the child's environment, a bare `sh` makes the
        // standard library fork the whole worker instead of using posix_spawn. `--`: a
        // command that starts with `-` is a command, not the shell's options.
        let shell = ["/bin/sh", "-c", "--", script.as_str()].map(std::ffi::OsStr::new);
        let mut c = identity::command_as(&spec.identity, &shell);
        c.process_group(0);
        c
    };
    #[cfg(windows)]
    let mut command = {
        let _ = staged;
        let shell = ["cmd", "/C", spec.command.as_str()].map(std::ffi::OsStr::new);
        identity::command_as(&spec.identity, &shell)
    };
    command.env_clear();
    if let Some(home) = &spec.identity.home {
        command.env("HOME", home).env("TMPDIR", home);
    }
    for name in INHERITED {
        if let Ok(value) = std::env::var(name) {
            command.env(name, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    command
        .envs(&spec.env)
        .env("CLOUDTASK_RUN_ID", spec.run_id.to_string())
        .env("CLOUDTASK_TASK_ID", spec.task_id.to_string())
        .env("CLOUDTASK_SCHEDULED_AT", spec.scheduled_at.to_rfc3339())
        .env("CLOUDTASK_ATTEMPT", spec.attempt.to_string())
        .current_dir(&spec.workdir)
        .stdin(if staged {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn supervise(
    spec: &RunSpec,
    spawned: std::io::Result<(Child, Members)>,
    limits: &ExecLimits,
    stop: &CancellationToken,
    hurry: &CancellationToken,
    lines: LineSink,
) -> Outcome {
    let (mut child, members) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            let note = format!("cannot start the command: {e}");
            lines.system(note).await;
            let error = Some(format!("spawn failed: {e}"));
            return outcome(RunStatus::Failed, None, None, error);
        }
    };
    let readers = read_streams(&mut child, limits.max_line_bytes, &lines);
    let deadline = spec.timeout.map(|t| tokio::time::Instant::now() + t);
    let timed_out = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    enum End {
        Exited(std::io::Result<std::process::ExitStatus>),
        TimedOut,
        Stopped,
        OverLimit(RunReason),
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        _ = timed_out => End::TimedOut,
        _ = stop.cancelled() => End::Stopped,
        reason = members.over_limit(&spec.limits) => End::OverLimit(reason),
    };
    let (status, note, error) = match end {
        End::Exited(status) => {
            // The main process is done; every process of the run goes with it.
            terminate_group(&members, limits, hurry, &mut child, true).await;
            let mut result = match status {
                Ok(status) => exit_outcome(status),
                Err(e) => outcome(
                    RunStatus::Failed,
                    None,
                    None,
                    Some(format!("wait failed: {e}")),
                ),
            };
            if let Some(note) = contain::limited(&mut result, &members) {
                lines.system(note).await;
            }
            return ended(result, readers).await;
        }
        End::OverLimit(reason) => {
            // As the kernel would end it: at once, no grace.
            members.kill();
            let exited = terminate_group(&members, limits, hurry, &mut child, false).await;
            let mut result = exited
                .map(exit_outcome)
                .unwrap_or_else(|| outcome(RunStatus::Failed, None, None, None));
            contain::ended_by(&mut result, reason);
            let limit = match reason {
                RunReason::OomKilled => "memory limit",
                _ => "process limit",
            };
            let note = format!("the run went over its {limit}: the worker killed it");
            result.error = Some(note.clone());
            lines.system(note).await;
            return ended(result, readers).await;
        }
        End::TimedOut => {
            let secs = spec.timeout.unwrap_or_default().as_secs();
            let note = format!("timed out after {secs} s: terminating the process group");
            (RunStatus::TimedOut, note, "timed out")
        }
        End::Stopped => {
            let note = "stopped: terminating the process group".to_owned();
            (RunStatus::Stopped, note, "stopped")
        }
    };
    lines.system(note).await;
    let exited = terminate_group(&members, limits, hurry, &mut child, false).await;
    let mut result = exited
        .map(exit_outcome)
        .unwrap_or_else(|| outcome(status, None, None, None));
    result.status = status;
    result.error = Some(error.into());
    if let Some(note) = contain::limited(&mut result, &members) {
        lines.system(note).await;
    }
    ended(result, readers).await
}

/// `result`, once the output readers are done: they end when every holder of the pipes
/// is gone, which the group kill ensures.
async fn ended(result: Outcome, readers: Vec<tokio::task::JoinHandle<()>>) -> Outcome {
    for reader in readers {
        let _ = reader.await;
    }
    result
}

fn outcome(
    status: RunStatus,
    exit_code: Option<i32>,
    signal: Option<i32>,
    error: Option<String>,
) -> Outcome {
    Outcome {
        status,
        exit_code,
        signal,
        error,
        finished_at: Utc::now(),
        reason: None,
    }
}

fn exit_outcome(status: std::process::ExitStatus) -> Outcome {
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    #[cfg(not(unix))]
    let signal = None;
    match (status.code(), signal) {
        (Some(0), _) => outcome(RunStatus::Succeeded, Some(0), None, None),
        (Some(code), _) => outcome(
            RunStatus::Failed,
            Some(code),
            None,
            Some(format!("exit code {code}")),
        ),
        (None, Some(signal)) => outcome(
            RunStatus::Failed,
            None,
            Some(signal),
            Some(format!("killed by signal {signal}")),
        ),
        (None, None) => outcome(
            RunStatus::Failed,
            None,
            None,
            Some("ended without a status".into()),
        ),
    }
}

#[cfg(all(test, unix))]
mod tests;
