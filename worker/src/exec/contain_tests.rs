//! Containment on real processes and, where the machine lets this test make them, real
//! cgroups (root with v1 controllers or v2 mounted; otherwise those tests say why they
//! skip).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use cloudtask_core::ids::{RunId, TaskId};
use cloudtask_core::limits::RunLimits;
use cloudtask_core::run::{RunReason, RunStatus};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::exec::{ExecLimits, RunSpec, execute};
use crate::report::{Report, Reporter};

fn spec(command: &str, dir: &Path, limits: RunLimits) -> RunSpec {
    RunSpec {
        run_id: RunId::new(),
        task_id: TaskId::new(),
        scheduled_at: Utc::now(),
        attempt: 0,
        command: command.into(),
        env: BTreeMap::new(),
        workdir: dir.to_path_buf(),
        timeout: None,
        identity: Default::default(),
        limits,
    }
}

fn exec_limits(containment: Containment) -> ExecLimits {
    ExecLimits {
        max_lines: 1000,
        max_output_bytes: 1 << 30,
        max_line_bytes: 4096,
        kill_grace: Duration::from_secs(2),
        hurried_grace: Duration::from_secs(1),
        containment,
    }
}

/// The cgroup containment of this machine, or None (and why) when it has none for us.
fn cgroups(data: &Path) -> Option<Containment> {
    let containment = Containment::detect(Mode::Auto, data);
    if !containment.uses_cgroups() {
        eprintln!(
            "SKIPPED: no writable cgroup here (needs root and cgroup v1 controllers or v2): {}",
            containment.describe()
        );
        return None;
    }
    Some(containment)
}

/// Live processes whose command line (arguments joined by spaces) holds `needle`.
fn running(needle: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            }) && procs::live(pid)
        })
        .collect()
}

/// A run whose main process exits as soon as its daemons, which left its group every way
/// a shell can (one ignoring SIGTERM too), have written their pids: all of them gone when
/// the run is over.
async fn daemons_end_with_the_run(containment: Containment, tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = |n: u32, trap: &str| format!("sh -c '{trap}echo $$ > p{n}; exec sleep 3{tag}{n}'");
    let command = format!(
        "setsid {one} & ({two} &) ; nohup {three} >/dev/null 2>&1 & setsid {four} & \
         until [ -s p1 ] && [ -s p2 ] && [ -s p3 ] && [ -s p4 ]; do sleep 0.05; done; echo up",
        one = daemon(1, ""),
        two = daemon(2, ""),
        three = daemon(3, ""),
        four = daemon(4, "trap \"\" TERM; "),
    );
    let (reporter, _reports) = Reporter::capture();
    let never = CancellationToken::new();
    let outcome = execute(
        &spec(&command, dir.path(), RunLimits::default()),
        exec_limits(containment),
        &reporter,
        &never,
        &never,
    )
    .await;
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    for n in 1..=4 {
        let pid: i32 = fs::read_to_string(dir.path().join(format!("p{n}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!procs::live(pid), "daemon {n} ({pid}) outlived its run");
    }
}

#[tokio::test]
async fn daemons_that_leave_the_group_end_with_the_run_in_a_cgroup() {
    let data = tempfile::tempdir().unwrap();
    let Some(containment) = cgroups(data.path()) else {
        return;
    };
    daemons_end_with_the_run(containment.clone(), "71").await;
    containment.close();
}

#[tokio::test]
async fn a_staged_shell_is_in_its_cgroup_before_it_is_let_go() {
    let data = tempfile::tempdir().unwrap();
    let Some(containment) = cgroups(data.path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let command = "setsid sleep 3781 & (sleep 3782 &); echo up";
    let staged = crate::exec::stage(
        spec(command, dir.path(), RunLimits::default()),
        &containment,
    )
    .expect("staged");
    let pid = staged.child.as_ref().and_then(Child::id).expect("pid") as i32;
    // Held, and already inside: whatever it forks once let go is too.
    match staged.members.as_ref().expect("members") {
        Members::Cage(cage) => assert_eq!(cage.members(), vec![pid]),
        Members::Tree { .. } => panic!("not in a cgroup"),
    }
    let (reporter, _reports) = Reporter::capture();
    let never = CancellationToken::new();
    let limits = exec_limits(containment.clone());
    let outcome = crate::exec::execute_staged(staged, limits, &reporter, &never, &never).await;
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    assert!(running("sleep 3781").is_empty() && running("sleep 3782").is_empty());
    containment.close();
}

#[tokio::test]
async fn daemons_that_leave_the_group_end_with_the_run_in_a_cgroup_v2() {
    let data = tempfile::tempdir().unwrap();
    let containment = Containment::detect(Mode::CgroupV2, data.path());
    if !containment.uses_cgroups() {
        eprintln!(
            "SKIPPED: no writable cgroup v2 tree here: {}",
            containment.describe()
        );
        return;
    }
    assert!(
        containment.describe().starts_with("cgroup-v2"),
        "{}",
        containment.describe()
    );
    daemons_end_with_the_run(containment.clone(), "73").await;
    containment.close();
}

#[tokio::test]
async fn daemons_that_leave_the_group_end_with_the_run_without_cgroups() {
    daemons_end_with_the_run(Containment::process_tree(), "72").await;
}

#[tokio::test]
async fn a_group_whose_last_members_are_zombies_has_ended() {
    // A process of its own group that has exited and that nobody reaps yet.
    let mut zombie = std::process::Command::new("true");
    std::os::unix::process::CommandExt::process_group(&mut zombie, 0);
    let mut zombie = zombie.spawn().unwrap();
    let pid = zombie.id() as i32;
    let until = Instant::now() + Duration::from_secs(10);
    while procs::live(pid) {
        assert!(Instant::now() < until, "never exited");
        std::thread::yield_now();
    }
    // `killpg(group, 0)` still answers for it: the old check waited out the grace.
    assert!(killpg(Pid::from_raw(pid), None).is_ok());
    let members = Members::Tree {
        group: pid,
        run: RunId::new(),
    };
    assert!(!members.alive());
    // And a stop of such a group ends at once, not after the grace.
    let mut child = tokio::process::Command::new("true").spawn().unwrap();
    child.wait().await.unwrap();
    let limits = ExecLimits {
        kill_grace: Duration::from_secs(30),
        ..exec_limits(Containment::process_tree())
    };
    let started = Instant::now();
    let never = CancellationToken::new();
    super::super::group::terminate_group(&members, &limits, &never, &mut child, true).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    zombie.wait().unwrap();
}

#[tokio::test]
async fn a_cgroup_holds_the_run_to_its_memory_and_process_limits() {
    let data = tempfile::tempdir().unwrap();
    let Some(containment) = cgroups(data.path()) else {
        return;
    };
    if !containment.describe().contains("memory") || !containment.describe().contains("pids") {
        eprintln!(
            "SKIPPED: no memory or pids controller: {}",
            containment.describe()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let never = CancellationToken::new();
    let run = |command: &str, limits: RunLimits| {
        let spec = spec(command, dir.path(), limits);
        let limits = exec_limits(containment.clone());
        let never = never.clone();
        async move {
            let (reporter, mut reports) = Reporter::capture();
            let outcome = execute(&spec, limits, &reporter, &never, &never).await;
            drop(reporter);
            let mut lines = Vec::new();
            while let Some(report) = reports.recv().await {
                if let Report::Logs { lines: batch, .. } = report {
                    lines.extend(batch.into_iter().map(|l| l.text));
                }
            }
            (outcome, lines)
        }
    };
    // `tail` keeps a line it has not finished in memory: this one never ends.
    let hog = RunLimits {
        memory_mb: Some(32),
        ..RunLimits::default()
    };
    let (outcome, lines) = run("head -c 200000000 /dev/zero | tail -n 1 | wc -c", hog).await;
    assert_eq!(outcome.status, RunStatus::Failed, "{outcome:?} {lines:?}");
    assert_eq!(outcome.reason, Some(RunReason::OomKilled), "{outcome:?}");
    assert!(
        lines.iter().any(|l| l.contains("memory limit")),
        "{lines:?}"
    );

    let few = RunLimits {
        max_processes: Some(8),
        ..RunLimits::default()
    };
    let (outcome, lines) = run("for i in $(seq 20); do sleep 5 & done; wait", few).await;
    assert_eq!(outcome.status, RunStatus::Failed, "{outcome:?} {lines:?}");
    assert_eq!(outcome.reason, Some(RunReason::PidsLimit), "{outcome:?}");

    // Within its limits, a run is untouched.
    let (outcome, _) = run("echo fine", hog.or(few)).await;
    assert_eq!(outcome.status, RunStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.reason, None);
    containment.close();
}

#[tokio::test]
async fn a_worker_that_starts_after_a_crash_kills_what_its_predecessor_left() {
    let data = tempfile::tempdir().unwrap();
    let Some(crashed) = cgroups(data.path()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A run of the "crashed" worker, its daemon in the run's cgroup; the worker goes
    // away without ending it (its `Cage` is leaked, as a crash would).
    let (mut child, members) = spawn(
        &spec(
            "setsid sleep 3791 & echo started",
            dir.path(),
            RunLimits::default(),
        ),
        &crashed,
    )
    .unwrap();
    child.wait().await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while running("sleep 3791").is_empty() {
        assert!(Instant::now() < until, "the daemon never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(members, Members::Cage(_)), "{members:?}");
    std::mem::forget(members);
    let parents = crashed.0.tree.as_ref().unwrap().parents();
    std::mem::forget(crashed);
    // The next worker on the same data folder.
    let next = Containment::detect(Mode::Auto, data.path());
    let left = running("sleep 3791");
    let cgroups: Vec<String> = left
        .iter()
        .map(|p| fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default())
        .collect();
    assert!(
        left.is_empty(),
        "the leftover daemon survived: {left:?} {cgroups:?} {parents:?}"
    );
    for parent in parents {
        assert!(!parent.exists(), "{} left behind", parent.display());
    }
    next.close();
}
