//! Running one claimed fire: `sh -c <command>` (`cmd /C` on Windows) in the unpacked
//! package folder, in a process group of its own, with the task's environment plus the
//! run's identity and nothing of the worker's own (no credentials). Output is read line by
//! line from both streams, long lines split, invalid UTF-8 replaced, capped per run, and
//! handed to the reporter in batches while the run goes. A timeout or a stop sends SIGTERM
//! to the whole group, then SIGKILL after the grace period; when the main process exits,
//! whatever it left running in its group is terminated the same way.
//!
//! A scheduled fire claimed ahead can be *staged*: its shell is started before the fire
//! time, pipes attached, and holds on its stdin before anything of the command runs; at
//! the fire time only a one-byte write is left. Creating a process is the slow part of a
//! fire (fork and exec of the shell: milliseconds each, serial per core), so a burst of
//! fires starts with that already done. The hold is on the command's first line, so the
//! command sees what `sh -c <command>` gives it (`$0`, line numbers, a null stdin); if the
//! worker goes before the fire time, the shell reads end of input and runs nothing.
//! While held, a shell is in the batch scheduling class (when the worker runs in the
//! normal one), in which a woken process does not preempt the one that woke it: the
//! engine lets every shell due at an instant go in one pass without being pushed off its
//! core by the first ones it woke (each would take the core for its whole exec). Each
//! shell is put back in the normal class right after its go line is written, before it
//! can have run anything of the command but the start of its first line (a process it
//! forked in those microseconds would keep the batch class: same share of the
//! processor, less eager to preempt).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::run::{LogLine, LogStream, Outcome, RunStatus};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::report::{Report, Reporter};

/// Lines go to the reporter at least this often while a run is producing them.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const FLUSH_LINES: usize = 500;

/// Per-run limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ExecLimits {
    pub max_lines: u64,
    pub max_line_bytes: usize,
    /// Between SIGTERM and SIGKILL when a run is stopped or times out.
    pub kill_grace: Duration,
    /// The grace instead, when the run is stopped in a hurry (see [`execute`]): short
    /// enough that the group is gone before the worker's coordination session can expire.
    pub hurried_grace: Duration,
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
}

/// Variables of the worker's own environment a program may see; everything else of the
/// worker (its credentials above all) stays out.
const INHERITED: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER"];

/// Staged shells held at once, at most (fires beyond start at their time): 512, fewer
/// when open files are scarce (each holds three of the worker's descriptors).
#[cfg(unix)]
fn max_staged() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        usize::try_from(files / 8).unwrap_or(usize::MAX).min(512)
    })
}
static STAGED: AtomicUsize = AtomicUsize::new(0);

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

/// What a staged shell runs before the command, on the command's first line: wait for
/// the go line (end of input: exit without running anything), then give the command the
/// null stdin it has when started directly. (`CLOUDTASK_` names are refused in a task's
/// environment, so the variable read is nobody's.)
#[cfg(unix)]
pub const HOLD: &str = "read -r CLOUDTASK_GO || exit 125; unset CLOUDTASK_GO; exec </dev/null; ";

/// A fire's shell started ahead of its time, holding before the command. Dropped, its
/// whole process group is killed: before it runs anything, unless it was let go.
pub struct Staged {
    spec: RunSpec,
    /// Taken by [`execute_staged`], which supervises it from then on.
    child: Option<Child>,
    /// The shell's stdin until it is let go, and its place among the staged.
    go: Option<(std::fs::File, Held)>,
    /// Whether it was put in the batch class (to put back in the normal one).
    batch: bool,
}

/// One of the [`max_staged`], given back when dropped.
struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        STAGED.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            // The shell leads its group, and is not reaped before its `Child` goes, so
            // the group id is still its own. A shell let go may have children already.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Starts the fire's shell now, held until [`Staged::release`]. None when it cannot be
/// staged (too many held, the spawn failed, not on Unix): the fire starts at its time.
pub fn stage(spec: RunSpec) -> Option<Staged> {
    #[cfg(unix)]
    {
        if STAGED.fetch_add(1, Ordering::Relaxed) >= max_staged() {
            STAGED.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let held = Held;
        let mut child = command(&spec, true).spawn().ok()?;
        let batch = child.id().is_some_and(scheduling::batch);
        let stdin = child.stdin.take();
        let mut staged = Staged {
            spec,
            child: Some(child),
            go: None,
            batch,
        };
        let go = std::fs::File::from(stdin?.into_owned_fd().ok()?);
        staged.go = Some((go, held));
        Some(staged)
    }
    #[cfg(not(unix))]
    {
        let _ = spec;
        None
    }
}

impl Staged {
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// Whether [`Staged::release`] has let it go.
    pub fn released(&self) -> bool {
        self.go.is_none()
    }

    /// Lets the shell go on to the command; once (later calls do nothing). One line into
    /// an empty pipe: written at once, without blocking. A shell that is gone already
    /// (the command did not parse) fails the write; its status and output say why.
    /// Right after the write, the shell is back in the normal class: the wake-up, in
    /// the batch class, did not preempt this thread, and the class change does not
    /// either.
    pub fn release(&mut self) {
        if let Some((mut go, _held)) = self.go.take() {
            use std::io::Write;
            let _ = go.write_all(b"\n");
            // Not reaped yet (its `Child` is here): the process id is still the shell's.
            if self.batch
                && let Some(pid) = self.child.as_ref().and_then(Child::id)
            {
                scheduling::normal(pid);
            }
        }
    }
}

/// The scheduling class of a staged shell (Linux; elsewhere, nothing changes). The one
/// place of the workspace with `unsafe`: two system calls libc has and nix does not.
#[allow(unsafe_code)]
mod scheduling {
    /// Puts a process of the normal class in the batch class; false when it is in
    /// another class (the worker's own, inherited: left alone) or the change failed.
    #[cfg(target_os = "linux")]
    pub fn batch(pid: u32) -> bool {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: a plain system call on a process id.
        let normal = unsafe { libc::sched_getscheduler(pid) } == libc::SCHED_OTHER;
        normal && set(pid, libc::SCHED_BATCH)
    }

    #[cfg(target_os = "linux")]
    pub fn normal(pid: u32) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            set(pid, libc::SCHED_OTHER);
        }
    }

    /// Same nice value, other fair class: allowed to any process of the same user. A
    /// failure costs the pass some speed or leaves a run in the batch class: logged,
    /// never fatal.
    #[cfg(target_os = "linux")]
    pub(super) fn set(pid: libc::pid_t, policy: libc::c_int) -> bool {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain system call; `param` is a valid sched_param that outlives it.
        let done = unsafe { libc::sched_setscheduler(pid, policy, &param) } == 0;
        if !done {
            let error = std::io::Error::last_os_error();
            tracing::debug!(pid, policy, %error, "cannot set the scheduling class of a staged shell");
        }
        done
    }

    #[cfg(not(target_os = "linux"))]
    pub fn batch(_pid: u32) -> bool {
        false
    }

    #[cfg(not(target_os = "linux"))]
    pub fn normal(_pid: u32) {}
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
    let spawned = command(spec, false).spawn();
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
        .ok_or_else(|| std::io::Error::other("the staged shell was run already"));
    supervise_logged(&staged.spec, child, limits, reporter, stop, hurry).await
}

async fn supervise_logged(
    spec: &RunSpec,
    spawned: std::io::Result<Child>,
    limits: ExecLimits,
    reporter: &Reporter,
    stop: &CancellationToken,
    hurry: &CancellationToken,
) -> Outcome {
    let (line_tx, line_rx) = mpsc::channel(1024);
    let collector = tokio::spawn(collect(spec.run_id, line_rx, limits, reporter.clone()));
    let outcome = supervise(spec, spawned, limits, stop, hurry, line_tx).await;
    let _ = collector.await;
    outcome
}

/// The fire's command; `staged`, its shell holds on its stdin first (see [`HOLD`]).
fn command(spec: &RunSpec, staged: bool) -> Command {
    #[cfg(unix)]
    let mut command = {
        // By its path: with PATH in the child's environment, a bare `sh` makes the
        // standard library fork the whole worker instead of using posix_spawn.
        let mut c = Command::new("/bin/sh");
        // `--`: a command that starts with `-` is a command, not the shell's options.
        c.arg("-c").arg("--");
        if staged {
            c.arg(format!("{HOLD}{}", spec.command));
        } else {
            c.arg(&spec.command);
        }
        c.process_group(0);
        c
    };
    #[cfg(windows)]
    let mut command = {
        let _ = staged;
        let mut c = Command::new("cmd");
        c.arg("/C").arg(&spec.command);
        c
    };
    command.env_clear();
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

type Line = (LogStream, String, DateTime<Utc>);

async fn supervise(
    spec: &RunSpec,
    spawned: std::io::Result<Child>,
    limits: ExecLimits,
    stop: &CancellationToken,
    hurry: &CancellationToken,
    lines: mpsc::Sender<Line>,
) -> Outcome {
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = lines
                .send((
                    LogStream::System,
                    format!("cannot start the command: {e}"),
                    Utc::now(),
                ))
                .await;
            return outcome(
                RunStatus::Failed,
                None,
                None,
                Some(format!("spawn failed: {e}")),
            );
        }
    };
    let group = child.id();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(read_lines(
            out,
            LogStream::Stdout,
            limits.max_line_bytes,
            lines.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(read_lines(
            err,
            LogStream::Stderr,
            limits.max_line_bytes,
            lines.clone(),
        )));
    }
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
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        _ = timed_out => End::TimedOut,
        _ = stop.cancelled() => End::Stopped,
    };
    let result = match end {
        End::Exited(status) => {
            // The main process is done; its group goes with it.
            terminate_group(group, limits, hurry, &mut child, true).await;
            match status {
                Ok(status) => exit_outcome(status),
                Err(e) => outcome(
                    RunStatus::Failed,
                    None,
                    None,
                    Some(format!("wait failed: {e}")),
                ),
            }
        }
        End::TimedOut => {
            let note = format!(
                "timed out after {} s: terminating the process group",
                spec.timeout.unwrap_or_default().as_secs()
            );
            let _ = lines.send((LogStream::System, note, Utc::now())).await;
            let status = terminate_group(group, limits, hurry, &mut child, false).await;
            let mut o = status
                .map(exit_outcome)
                .unwrap_or_else(|| outcome(RunStatus::TimedOut, None, None, None));
            o.status = RunStatus::TimedOut;
            o.error = Some("timed out".into());
            o
        }
        End::Stopped => {
            let _ = lines
                .send((
                    LogStream::System,
                    "stopped: terminating the process group".into(),
                    Utc::now(),
                ))
                .await;
            let status = terminate_group(group, limits, hurry, &mut child, false).await;
            let mut o = status
                .map(exit_outcome)
                .unwrap_or_else(|| outcome(RunStatus::Stopped, None, None, None));
            o.status = RunStatus::Stopped;
            o.error = Some("stopped".into());
            o
        }
    };
    // Readers end when every holder of the pipes is gone, which the group kill ensures.
    for reader in readers {
        let _ = reader.await;
    }
    result
}

/// SIGTERM to the group, then SIGKILL after the kill grace if anything of it is left;
/// once `hurry` is cancelled (before or during the grace), after the hurried grace at
/// the latest. With `exited`, the main process is reaped already and only leftovers are
/// signalled. Returns the main process's status when it was still running.
async fn terminate_group(
    group: Option<u32>,
    limits: ExecLimits,
    hurry: &CancellationToken,
    child: &mut Child,
    exited: bool,
) -> Option<std::process::ExitStatus> {
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        let pgid = group.map(|g| Pid::from_raw(g as i32))?;
        let alive = || killpg(pgid, None).is_ok();
        if !alive() {
            return if exited {
                None
            } else {
                child.wait().await.ok()
            };
        }
        let _ = killpg(pgid, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + limits.kill_grace;
        // The grace ends early once the stop is hurried (it may be already).
        let over = async {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = async {
                    hurry.cancelled().await;
                    let hurried = tokio::time::Instant::now() + limits.hurried_grace;
                    tokio::time::sleep_until(hurried.min(deadline)).await;
                } => {}
            }
        };
        tokio::pin!(over);
        let mut over_done = false;
        let mut status = None;
        if !exited {
            tokio::select! {
                waited = child.wait() => status = waited.ok(),
                _ = &mut over => over_done = true,
            }
        }
        // Leftovers of the group: poll until they are gone or the grace is over.
        while !over_done && alive() {
            tokio::select! {
                _ = &mut over => over_done = true,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        if alive() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        if status.is_none() && !exited {
            status = child.wait().await.ok();
        }
        status
    }
    #[cfg(not(unix))]
    {
        let _ = (group, limits, hurry);
        if exited {
            return None;
        }
        let _ = child.start_kill();
        child.wait().await.ok()
    }
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

/// Reads one stream into lines of at most `max` bytes.
async fn read_lines(
    stream: impl AsyncRead + Unpin,
    which: LogStream,
    max: usize,
    lines: mpsc::Sender<Line>,
) {
    let mut reader = BufReader::new(stream);
    let mut line: Vec<u8> = Vec::new();
    let emit = |line: &mut Vec<u8>| {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        (which, text, Utc::now())
    };
    while let Ok(available) = reader.fill_buf().await {
        if available.is_empty() {
            if !line.is_empty() && lines.send(emit(&mut line)).await.is_err() {
                return;
            }
            break;
        }
        let room = max.saturating_sub(line.len()).max(1);
        let window = &available[..available.len().min(room)];
        let (used, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(newline) => {
                line.extend_from_slice(&window[..newline]);
                (newline + 1, true)
            }
            None => {
                line.extend_from_slice(window);
                (window.len(), line.len() >= max)
            }
        };
        reader.consume(used);
        if complete && lines.send(emit(&mut line)).await.is_err() {
            return;
        }
    }
}

/// Numbers the lines of both streams in arrival order, applies the cap, and hands
/// batches to the reporter.
async fn collect(run: RunId, mut rx: mpsc::Receiver<Line>, limits: ExecLimits, reporter: Reporter) {
    let mut next_offset: u64 = 0;
    let mut dropped: u64 = 0;
    let mut batch: Vec<LogLine> = Vec::new();
    let flush = |batch: &mut Vec<LogLine>| {
        if !batch.is_empty() {
            reporter.send(Report::Logs {
                run,
                lines: std::mem::take(batch),
            });
        }
    };
    loop {
        let received = if batch.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(FLUSH_EVERY, rx.recv()).await {
                Ok(line) => line,
                Err(_) => {
                    flush(&mut batch);
                    continue;
                }
            }
        };
        let Some((stream, text, at)) = received else {
            break;
        };
        // SYSTEM lines (timeouts, stops) are kept past the cap: they say why a run ended.
        if next_offset >= limits.max_lines && stream != LogStream::System {
            dropped += 1;
            continue;
        }
        batch.push(LogLine {
            offset: next_offset,
            stream,
            at,
            text,
        });
        next_offset += 1;
        if batch.len() >= FLUSH_LINES {
            flush(&mut batch);
        }
    }
    if dropped > 0 {
        batch.push(LogLine {
            offset: next_offset,
            stream: LogStream::System,
            at: Utc::now(),
            text: format!(
                "output capped at {} lines: {dropped} more lines were dropped",
                limits.max_lines
            ),
        });
    }
    flush(&mut batch);
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn limits() -> ExecLimits {
        ExecLimits {
            max_lines: 5,
            max_line_bytes: 8,
            kill_grace: Duration::from_millis(200),
            hurried_grace: Duration::from_millis(200),
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

    #[tokio::test]
    async fn long_lines_are_split_bad_utf8_replaced_and_output_capped() {
        let (outcome, lines) = run(
            r"printf 'abcdefghijkl\n\377ok\n'; for i in 1 2 3 4 5 6; do echo $i; done; exit 3",
            limits(),
        )
        .await;
        assert_eq!(outcome.status, RunStatus::Failed);
        assert_eq!(outcome.exit_code, Some(3));
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts[..5], ["abcdefgh", "ijkl", "\u{fffd}ok", "1", "2"]);
        assert_eq!(lines[5].stream, LogStream::System);
        assert!(
            lines[5].text.contains("4 more lines were dropped"),
            "{:?}",
            lines[5]
        );
        let offsets: Vec<u64> = lines.iter().map(|l| l.offset).collect();
        assert_eq!(offsets, [0, 1, 2, 3, 4, 5]);
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
        let staged = stage(spec(command, dir.path())).expect("staged");
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
        let staged = stage(spec("touch ran", dir.path())).expect("staged");
        let group = staged.child.as_ref().and_then(Child::id).expect("pid");
        drop(staged);
        group_gone(group).await;
        assert!(!dir.path().join("ran").exists());

        // Let go, then dropped (its job went away): the whole group goes, children too.
        let mut staged = stage(spec("sleep 30 & touch ran; sleep 30", dir.path())).expect("staged");
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
        let staged = stage(spec("echo (", dir.path())).expect("staged");
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
        assert!(scheduling::set(0, libc::SCHED_BATCH));
        let dir = tempfile::tempdir().unwrap();
        let mut staged = stage(spec("sleep 30", dir.path())).expect("staged");
        let pid = staged.child.as_ref().and_then(Child::id).expect("pid");
        assert!(!staged.batch, "not switched: left in the worker's class");
        staged.release();
        assert_eq!(policy(pid), libc::SCHED_BATCH as u32);
        scheduling::set(0, libc::SCHED_OTHER);
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
