//! Holding every process of a run, so that all of them end with it whatever they do to
//! leave their process group (a new session, a double fork, `nohup`).
//!
//! Detected once at the worker's start ([`Containment::detect`]): a cgroup per run when
//! the machine lets the worker make cgroups (v1 controllers or v2, see [`cgroup`]), else
//! the run's *process tree*: its process group, its session and every process carrying
//! its `CLOUDTASK_RUN_ID`, read from `/proc`, whose memory and processes the worker
//! samples to hold the run's limits ([`Members::over_limit`]). The choice is logged and
//! published in the worker's facts. A run's shell enters its cgroup before it runs anything of the command:
//! it is started holding on its stdin (the staging hold, see [`super::staging`]), moved in,
//! and only then let go, so nothing it forks is ever outside.
//!
//! The worker's cgroups sit under a parent of its own, recorded in `<data_dir>/cgroups`; a
//! worker that starts after a crash kills what the previous one left there.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloudtask_core::ids::RunId;
use cloudtask_core::limits::RunLimits;
use cloudtask_core::run::{Outcome, RunReason, RunStatus};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;

use super::cgroup::{self, Cage, Tree};
use super::{RunSpec, command, procs};

/// The `containment` setting: which of the kernel's tools to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// cgroup v1 controllers when usable, else cgroup v2, else the process tree.
    Auto,
    CgroupV1,
    CgroupV2,
    ProcessTree,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "auto" => Some(Mode::Auto),
            "cgroup-v1" => Some(Mode::CgroupV1),
            "cgroup-v2" => Some(Mode::CgroupV2),
            "process-tree" => Some(Mode::ProcessTree),
            _ => None,
        }
    }
}

/// How this worker holds its runs; cheap to clone.
#[derive(Debug, Clone)]
pub struct Containment(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    tree: Option<Tree>,
    /// Where the parents are recorded, for the next start after a crash.
    record: Option<PathBuf>,
}

/// How often the process tree's memory and processes are read, without a cgroup.
pub(super) const SAMPLE: std::time::Duration = std::time::Duration::from_millis(250);

/// The file under the data folder that names the worker's cgroup parents.
const RECORD: &str = "cgroups";

impl Containment {
    /// Detects what the machine allows (see [`Mode`]), after clearing what a previous
    /// worker on `data_dir` left (its recorded cgroups, and everything in them).
    pub fn detect(mode: Mode, data_dir: &Path) -> Containment {
        let record = data_dir.join(RECORD);
        let killed = clear_recorded(&record);
        if killed > 0 {
            tracing::warn!(
                killed,
                "killed processes a previous worker on this data folder left running"
            );
        }
        let name = format!("cloudtask-{}-{:x}", std::process::id(), nanos());
        let tree = match mode {
            Mode::Auto => Tree::make(&name, true, true),
            Mode::CgroupV1 => Tree::make(&name, true, false),
            Mode::CgroupV2 => Tree::make(&name, false, true),
            Mode::ProcessTree => None,
        };
        if let Some(tree) = &tree {
            let parents: Vec<String> = tree
                .parents()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let written =
                fs::create_dir_all(data_dir).and_then(|()| fs::write(&record, parents.join("\n")));
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot record the worker's cgroups");
            }
        }
        let containment = Containment(Arc::new(Inner {
            tree,
            record: Some(record),
        }));
        if mode != Mode::Auto && mode != Mode::ProcessTree && containment.0.tree.is_none() {
            tracing::warn!(
                ?mode,
                "the configured containment is not available here: using the process tree"
            );
        }
        tracing::info!(containment = %containment.describe(), "run containment");
        containment
    }

    /// The process tree only (tests, and platforms without `/proc`).
    pub fn process_tree() -> Containment {
        Containment(Arc::new(Inner {
            tree: None,
            record: None,
        }))
    }

    /// What the worker uses, for its log and its facts.
    pub fn describe(&self) -> String {
        match &self.0.tree {
            Some(tree) => tree.describe(),
            None => "process-tree (process group, session, CLOUDTASK_RUN_ID; memory and processes sampled)".into(),
        }
    }

    pub fn uses_cgroups(&self) -> bool {
        self.0.tree.is_some()
    }

    /// A cgroup for the run, with its limits set; None without cgroups (or when one
    /// cannot be made: logged, the run is then held by its process tree).
    pub(super) fn cage(&self, run: RunId, limits: &RunLimits) -> Option<Cage> {
        let tree = self.0.tree.as_ref()?;
        match tree.cage(&format!("run-{run}"), limits) {
            Ok((cage, unenforced)) => {
                if !unenforced.is_empty() {
                    tracing::warn!(%run, ?unenforced, "limits this machine cannot enforce");
                }
                Some(cage)
            }
            Err(e) => {
                tracing::warn!(%run, error = %e, "cannot make the run's cgroup");
                None
            }
        }
    }

    /// Removes the worker's parents (empty by now: every run has ended) and the record.
    /// Also done when the last clone is dropped (a worker's task cancelled).
    pub fn close(&self) {
        self.0.close();
    }
}

impl Inner {
    fn close(&self) {
        if let Some(tree) = &self.tree {
            for parent in tree.parents() {
                cgroup::clear(&parent);
            }
        }
        if let Some(record) = &self.record {
            let _ = fs::remove_file(record);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

/// Kills what the recorded cgroups hold and removes them; how many processes it killed.
/// Only directories named like a worker's parent, under a cgroup mount, are touched: the
/// record sits in the data folder and must not steer the worker elsewhere.
fn clear_recorded(record: &Path) -> usize {
    let Ok(text) = fs::read_to_string(record) else {
        return 0;
    };
    let mut killed = 0;
    for line in text.lines() {
        let parent = Path::new(line.trim());
        let named = parent
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("cloudtask-"));
        let safe = parent.is_absolute()
            && parent.starts_with("/sys/fs/cgroup")
            && !line.contains("..")
            && named;
        if safe {
            killed += cgroup::clear(parent);
        }
    }
    let _ = fs::remove_file(record);
    killed
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The processes of one run, as the worker holds them.
#[derive(Debug)]
pub(super) enum Members {
    Cage(Cage),
    /// Its shell's group and session, and the processes carrying its id.
    Tree {
        group: i32,
        run: RunId,
    },
}

impl Members {
    /// Whether any of its processes has not ended (zombies have).
    pub fn alive(&self) -> bool {
        match self {
            Members::Cage(cage) => !cage.members().is_empty(),
            Members::Tree { group, run } => !procs::run_members(*group, *run).is_empty(),
        }
    }

    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// SIGKILL to all of it (at once in a cgroup).
    pub fn kill(&self) {
        match self {
            Members::Cage(cage) => cage.kill(),
            Members::Tree { .. } => self.signal(Signal::SIGKILL),
        }
    }

    fn signal(&self, signal: Signal) {
        match self {
            Members::Cage(cage) => cage.signal(signal),
            Members::Tree { group, run } => {
                // 0 would be the worker's own group: a shell without a pid has none.
                if *group > 0 {
                    let _ = killpg(Pid::from_raw(*group), signal);
                }
                procs::signal_each(&procs::run_members(*group, *run), signal);
            }
        }
    }

    /// Ends when the run is over its memory or process limit, where no cgroup holds it:
    /// its process tree is sampled every [`SAMPLE`] (memory resident in all its processes,
    /// processes and threads alive at once). Never ends for a cgroup: the kernel enforces
    /// those limits itself.
    pub async fn over_limit(&self, limits: &RunLimits) -> RunReason {
        let (Members::Tree { group, run }, true) = (
            self,
            limits.memory_mb.is_some() || limits.max_processes.is_some(),
        ) else {
            return std::future::pending().await;
        };
        let (group, run) = (*group, *run);
        let memory = limits.memory_mb.map(|mb| u64::from(mb) << 20);
        let processes = limits.max_processes.map(u64::from);
        let mut tick = tokio::time::interval(SAMPLE);
        loop {
            tick.tick().await;
            // Runs sampled at about the same moment share one look at the machine.
            let usage = tokio::task::spawn_blocking(move || {
                let since = std::time::Instant::now()
                    .checked_sub(SAMPLE / 2)
                    .unwrap_or_else(std::time::Instant::now);
                procs::usage(&procs::scan(since).members(group, run))
            })
            .await
            .unwrap_or_default();
            if memory.is_some_and(|m| usage.resident > m) {
                return RunReason::OomKilled;
            }
            if processes.is_some_and(|p| usage.threads > p) {
                return RunReason::PidsLimit;
            }
        }
    }

    /// The limit the kernel enforced on the run, if any.
    pub fn limit_hit(&self) -> Option<RunReason> {
        match self {
            Members::Cage(cage) => cage.limit_hit(),
            Members::Tree { .. } => None,
        }
    }
}

/// Starts the run's shell inside its cgroup: held before the command (see
/// [`super::HOLD`]), moved in, then let go; without a cgroup, started directly and held
/// by its process tree.
pub(super) fn spawn(spec: &RunSpec, containment: &Containment) -> io::Result<(Child, Members)> {
    let Some(cage) = containment.cage(spec.run_id, &spec.limits) else {
        let child = command(spec, false).spawn()?;
        let members = tree_of(&child, spec.run_id);
        return Ok((child, members));
    };
    let mut child = command(spec, true).spawn()?;
    let members = enter(Some(cage), &child, spec.run_id);
    // The go line into an empty pipe: written at once. A shell gone already (the command
    // did not parse) fails the write; its status and output say why.
    if let Some(stdin) = child.stdin.take() {
        let mut go = std::fs::File::from(stdin.into_owned_fd()?);
        let _ = go.write_all(b"\n");
    }
    Ok((child, members))
}

/// The members of a run whose shell `child` is held before its command: `cage` with the
/// shell moved in, or its process tree without one (or when the move fails: logged).
pub(super) fn enter(cage: Option<Cage>, child: &Child, run: RunId) -> Members {
    if let (Some(cage), Some(pid)) = (cage, child.id()) {
        match cage.admit(pid) {
            Ok(()) => return Members::Cage(cage),
            Err(e) => tracing::warn!(%run, error = %e, "cannot move the run into its cgroup"),
        }
    }
    tree_of(child, run)
}

fn tree_of(child: &Child, run: RunId) -> Members {
    let group = child.id().map_or(0, |pid| pid as i32);
    Members::Tree { group, run }
}

/// A run that hit a limit the kernel enforced (a process OOM-killed, a fork refused) is
/// FAILED and says which; one stopped or timed out keeps that status and gets the
/// reason too. The SYSTEM line to log is returned.
pub(super) fn limited(outcome: &mut Outcome, members: &Members) -> Option<String> {
    Some(ended_by(outcome, members.limit_hit()?))
}

/// Marks `outcome` ended by `reason` (FAILED, unless it was stopped or timed out); the
/// SYSTEM line saying so.
pub(super) fn ended_by(outcome: &mut Outcome, reason: RunReason) -> String {
    let what = match reason {
        RunReason::OomKilled => "its memory limit: the kernel killed a process of it (OOM)",
        RunReason::PidsLimit => "its process limit: a fork was refused",
        RunReason::OutputLimit => "its output limit",
        other => other.describe(),
    };
    outcome.reason = Some(reason);
    if !matches!(outcome.status, RunStatus::Stopped | RunStatus::TimedOut) {
        outcome.status = RunStatus::Failed;
        outcome.error = Some(format!("ended by {what}"));
    }
    format!("the run hit {what}")
}

#[cfg(test)]
#[path = "contain_tests.rs"]
mod tests;
