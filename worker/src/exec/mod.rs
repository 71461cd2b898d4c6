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
mod tests {
    use super::*;
    use crate::report::Report;
    use cloudtask_core::run::{LogLine, LogStream};

    fn limits() -> ExecLimits {
        ExecLimits {
            max_lines: 5,
            max_output_bytes: 1 << 20,
            max_line_bytes: 8,
            kill_grace: Duration::from_millis(200),
            hurried_grace: Duration::from_millis(200),
            containment: Containment::process_tree(),
        }
    }

    fn spec(command: &str, dir: &std::path::Path) -> RunSpec {
        RunSpec {
            run_id: RunId::new(),
            task_id: TaskId::new(),
            scheduled_at: Utc::now(),
            attempt: 2,
            command: command.into(),
            env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
            workdir: dir.to_path_buf(),
            timeout: None,
            identity: Default::default(),
            limits: RunLimits::default(),
        }
    }

    async fn run(command: &str, limits: ExecLimits) -> (Outcome, Vec<LogLine>) {
        let dir = tempfile::tempdir().unwrap();
        let (reporter, mut reports) = Reporter::capture();
        let outcome = execute(
            &spec(command, dir.path()),
            limits,
            &reporter,
            &never(),
            &never(),
        )
        .await;
        drop(reporter);
        let mut lines = Vec::new();
        while let Some(report) = reports.recv().await {
            match report {
                Report::Logs { lines: batch, .. } => lines.extend(batch),
                Report::Started { .. } | Report::Abandon { .. } | Report::Finish { .. } => {
                    unreachable!("execute reports lines only")
                }
            }
        }
        (outcome, lines)
    }

    /// Without a cgroup the worker holds a run's memory and process limits itself, from
    /// `/proc`: a memory hog and a run that starts too many processes are killed, FAILED
    /// with their reason, within a moment and with nothing of them left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_cgroups_a_run_over_its_memory_or_process_limit_is_killed() {
        let cases = [
            (
                "python3 -c 'import time; held = b\"x\" * (200 << 20); time.sleep(30)'; echo survived",
                RunLimits {
                    memory_mb: Some(64),
                    ..RunLimits::default()
                },
                RunReason::OomKilled,
            ),
            (
                "for i in $(seq 40); do sleep 30 & done; wait; echo survived",
                RunLimits {
                    max_processes: Some(10),
                    ..RunLimits::default()
                },
                RunReason::PidsLimit,
            ),
        ];
        for (command, run_limits, reason) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (reporter, mut reports) = Reporter::capture();
            let mut spec = spec(command, dir.path());
            spec.limits = run_limits;
            let started = std::time::Instant::now();
            let outcome = execute(&spec, limits_wide(), &reporter, &never(), &never()).await;
            let took = started.elapsed();
            assert_eq!(outcome.status, RunStatus::Failed, "{command}: {outcome:?}");
            assert_eq!(outcome.reason, Some(reason), "{command}: {outcome:?}");
            assert!(took < Duration::from_secs(10), "{command}: took {took:?}");
            assert!(
                procs::run_members(0, spec.run_id).is_empty(),
                "{command}: processes of the run are left"
            );
            drop(reporter);
            let mut texts = Vec::new();
            while let Some(Report::Logs { lines, .. }) = reports.recv().await {
                texts.extend(lines.into_iter().map(|l| l.text));
            }
            assert!(
                texts.iter().any(|t| t.contains("the worker killed it")),
                "{command}: {texts:?}"
            );
            assert!(
                !texts.iter().any(|t| t == "survived"),
                "{command}: {texts:?}"
            );
        }
    }

    #[tokio::test]
    async fn long_lines_are_split_bad_utf8_escaped_and_output_capped() {
        let (outcome, lines) = run(
            r"printf 'abcdefghijkl\n\377ok\n'; for i in 1 2 3 4 5 6; do echo $i; done; exit 3",
            limits(),
        )
        .await;
        assert_eq!(outcome.status, RunStatus::Failed);
        assert_eq!(outcome.exit_code, Some(3));
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts[..5], ["abcdefgh", "ijkl", "\\xffok", "1", "2"]);
        assert_eq!(lines[5].stream, LogStream::System);
        assert!(
            lines[5]
                .text
                .contains("4 more lines (4 bytes) were dropped"),
            "{:?}",
            lines[5]
        );
        let offsets: Vec<u64> = lines.iter().map(|l| l.offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_run_past_its_byte_cap_fails_and_says_how_much_was_dropped() {
        let capped = ExecLimits {
            max_output_bytes: 10,
            max_line_bytes: 8 << 20,
            ..limits_wide()
        };
        // 3 + 3 bytes kept; the next line would pass 10: it and all after are dropped,
        // whether read as lines or, once the cap is known, only counted.
        let (outcome, lines) = run(
            "echo one; echo two; echo three; head -c 3000000 /dev/zero; echo; echo end",
            capped,
        )
        .await;
        assert_eq!(outcome.status, RunStatus::Failed, "{outcome:?}");
        assert_eq!(outcome.reason, Some(RunReason::OutputLimit), "{outcome:?}");
        assert_eq!(outcome.exit_code, Some(0));
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts[..2], ["one", "two"]);
        assert_eq!(lines.len(), 3, "{texts:?}");
        assert_eq!(lines[2].stream, LogStream::System);
        assert!(
            lines[2].text.starts_with(
                "output limit reached (10 bytes): 3 more lines (3000008 bytes) were dropped"
            ),
            "{:?}",
            lines[2]
        );
    }

    #[tokio::test]
    async fn the_run_sees_its_identity_and_env_but_not_the_workers() {
        // Cargo sets CARGO_MANIFEST_DIR for this test process: the child must not see it.
        let (outcome, lines) = run(
            "echo \"$GREETING $CLOUDTASK_ATTEMPT ${CARGO_MANIFEST_DIR:-none} $(pwd)\"",
            limits_wide(),
        )
        .await;
        assert_eq!(outcome.status, RunStatus::Succeeded);
        let text = &lines[0].text;
        assert!(text.starts_with("hi 2 none /"), "{text}");
    }

    #[tokio::test]
    async fn a_staged_shell_runs_the_command_only_once_let_go_and_as_sh_c_would() {
        let dir = tempfile::tempdir().unwrap();
        let command = "touch ran; echo \"$0 $GREETING $CLOUDTASK_ATTEMPT [$(cat)] [${CLOUDTASK_GO-unset}]\"; nosuch";
        let staged =
            stage(spec(command, dir.path()), &Containment::process_tree()).expect("staged");
        // Its chance to run early: it must not take it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!dir.path().join("ran").exists(), "ran before it was let go");
        let (reporter, mut reports) = Reporter::capture();
        let outcome = execute_staged(staged, limits_wide(), &reporter, &never(), &never()).await;
        drop(reporter);
        assert!(dir.path().join("ran").exists());
        assert_eq!(outcome.exit_code, Some(127), "{outcome:?}");
        let mut texts = Vec::new();
        while let Some(Report::Logs { lines, .. }) = reports.recv().await {
            texts.extend(lines.into_iter().map(|l| l.text));
        }
        assert_eq!(texts[0], "/bin/sh hi 2 [] [unset]", "{texts:?}");
        // The same message, line number included, as `sh -c` gives.
        assert_eq!(texts[1], "/bin/sh: 1: nosuch: not found", "{texts:?}");
    }

    #[tokio::test]
    async fn a_staged_shell_dropped_runs_nothing_and_a_bad_command_fails_as_usual() {
        let dir = tempfile::tempdir().unwrap();
        let staged =
            stage(spec("touch ran", dir.path()), &Containment::process_tree()).expect("staged");
        let group = staged.child.as_ref().and_then(Child::id).expect("pid");
        drop(staged);
        group_gone(group).await;
        assert!(!dir.path().join("ran").exists());

        // Let go, then dropped (its job went away): the whole group goes, children too.
        let mut staged = stage(
            spec("sleep 30 & touch ran; sleep 30", dir.path()),
            &Containment::process_tree(),
        )
        .expect("staged");
        let group = staged.child.as_ref().and_then(Child::id).expect("pid");
        // Held in the batch class, back in the normal one right after its go line.
        #[cfg(target_os = "linux")]
        assert_eq!(policy(group), libc::SCHED_BATCH as u32);
        staged.release();
        #[cfg(target_os = "linux")]
        assert_eq!(policy(group), libc::SCHED_OTHER as u32);
        let ran = async {
            while !dir.path().join("ran").exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), ran)
            .await
            .expect("the shell let go runs the command");
        drop(staged);
        group_gone(group).await;

        // A command that does not parse: the shell ends before it is let go, and the run
        // fails with the shell's own message.
        let staged =
            stage(spec("echo (", dir.path()), &Containment::process_tree()).expect("staged");
        let (reporter, mut reports) = Reporter::capture();
        let outcome = execute_staged(staged, limits_wide(), &reporter, &never(), &never()).await;
        drop(reporter);
        assert_eq!(outcome.exit_code, Some(2), "{outcome:?}");
        let Some(Report::Logs { lines, .. }) = reports.recv().await else {
            panic!("no output");
        };
        assert!(lines[0].text.contains("Syntax error"), "{lines:?}");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_worker_outside_the_normal_class_stages_shells_in_its_own() {
        // This test's thread (its runtime's only one) moves to the batch class; the
        // shells it starts inherit it, and it is theirs once let go too.
        assert!(staging::scheduling::set(0, libc::SCHED_BATCH));
        let dir = tempfile::tempdir().unwrap();
        let mut staged =
            stage(spec("sleep 30", dir.path()), &Containment::process_tree()).expect("staged");
        let pid = staged.child.as_ref().and_then(Child::id).expect("pid");
        assert!(!staged.batch, "not switched: left in the worker's class");
        staged.release();
        assert_eq!(policy(pid), libc::SCHED_BATCH as u32);
        staging::scheduling::set(0, libc::SCHED_OTHER);
    }

    /// The scheduling policy of a process (`/proc/<pid>/stat`, field 41).
    #[cfg(target_os = "linux")]
    fn policy(pid: u32) -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which may hold spaces) start at field 3.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split(' ').nth(41 - 3).unwrap().parse().unwrap()
    }

    /// Waits until no process of the group is left (bounded).
    async fn group_gone(group: u32) {
        let group = nix::unistd::Pid::from_raw(group as i32);
        let gone = async {
            while nix::sys::signal::killpg(group, None).is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("the group is killed");
    }

    #[tokio::test]
    async fn a_command_that_starts_with_a_dash_is_a_command_not_options() {
        let (outcome, lines) = run("-no-such-program", limits_wide()).await;
        assert_eq!(outcome.exit_code, Some(127), "{outcome:?} {lines:?}");
        assert!(lines[0].text.contains("-no-such-program"), "{lines:?}");
    }

    fn limits_wide() -> ExecLimits {
        ExecLimits {
            max_lines: 100,
            max_line_bytes: 4096,
            ..limits()
        }
    }

    #[tokio::test]
    async fn a_stop_terminates_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let (reporter, _reports) = Reporter::capture();
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let outcome = execute(
            &spec("sleep 30 & sleep 30", dir.path()),
            limits(),
            &reporter,
            &stop,
            &never(),
        )
        .await;
        assert_eq!(outcome.status, RunStatus::Stopped);
    }

    /// A token nobody cancels.
    fn never() -> CancellationToken {
        CancellationToken::new()
    }

    /// Waits for a log line `text` among the captured reports.
    async fn line(reports: &mut tokio::sync::mpsc::UnboundedReceiver<Report>, text: &str) {
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(report) = reports.recv().await {
                if let Report::Logs { lines, .. } = report
                    && lines.iter().any(|l| l.text == text)
                {
                    return;
                }
            }
        });
        seen.await
            .unwrap_or_else(|_| panic!("no line {text:?} in time"));
    }

    #[tokio::test]
    async fn a_hurried_stop_kills_a_group_that_ignores_sigterm_after_the_short_grace() {
        // Hurried before the stop, and while the stop's long grace runs.
        for hurried_first in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (reporter, mut reports) = Reporter::capture();
            let long = ExecLimits {
                kill_grace: Duration::from_secs(60),
                hurried_grace: Duration::from_millis(300),
                ..limits_wide()
            };
            let (stop, hurry) = (CancellationToken::new(), CancellationToken::new());
            // SIGTERM ignored by the shell and, inherited, by its background child.
            let spec = spec("trap '' TERM; sleep 60 & echo up; wait", dir.path());
            let run = tokio::spawn({
                let (stop, hurry) = (stop.clone(), hurry.clone());
                async move { execute(&spec, long, &reporter, &stop, &hurry).await }
            });
            line(&mut reports, "up").await;
            if hurried_first {
                hurry.cancel();
                stop.cancel();
            } else {
                stop.cancel();
                line(&mut reports, "stopped: terminating the process group").await;
                hurry.cancel();
            }
            let outcome = tokio::time::timeout(Duration::from_secs(20), run)
                .await
                .expect("the hurried grace, not the 60 s one")
                .unwrap();
            assert_eq!(outcome.status, RunStatus::Stopped);
            assert_eq!(outcome.signal, Some(9), "{outcome:?}");
        }
    }
}
