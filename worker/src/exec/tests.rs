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
    let staged = stage(spec(command, dir.path()), &Containment::process_tree()).expect("staged");
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
    let staged = stage(spec("echo (", dir.path()), &Containment::process_tree()).expect("staged");
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
