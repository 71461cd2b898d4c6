//! Control groups: one per run (a *cage*) under a parent the worker makes for itself
//! beneath its own cgroup, in the v1 controllers the machine mounts (freezer to stop
//! every process at once before the kill, pids, memory, cpu) or in the v2 unified tree
//! (`cgroup.kill`, and whichever of pids, memory and cpu are delegated). A process
//! cannot leave its cgroup without privileges the worker does not give it, so whatever
//! it does (new session, double fork, `nohup`) it stays in the cage and dies with it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudtask_core::limits::RunLimits;
use cloudtask_core::run::RunReason;
use nix::sys::signal::Signal;

use super::procs;

/// The v1 controllers used, in the order their directories are made.
pub(super) const V1_CONTROLLERS: [&str; 4] = ["freezer", "pids", "memory", "cpu"];
/// The v2 controllers asked for (whichever the tree delegates).
const V2_CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];
/// CFS period for CPU quotas.
const CPU_PERIOD_US: u64 = 100_000;

/// Where the worker's run cgroups go.
#[derive(Debug, Clone)]
pub(super) enum Tree {
    /// Controller → the worker's parent directory in that controller's hierarchy.
    V1(Vec<(&'static str, PathBuf)>),
    /// The worker's parent directory, and the controllers enabled for its children.
    V2(PathBuf, Vec<&'static str>),
}

impl Tree {
    /// Makes the worker's parent (`name`) under its own cgroup in each usable hierarchy;
    /// None when no cgroup can hold runs (nothing mounted, or nothing writable).
    pub fn make(name: &str, want_v1: bool, want_v2: bool) -> Option<Tree> {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        if want_v1 {
            let mut dirs = Vec::new();
            for controller in V1_CONTROLLERS {
                let Some(mount) = v1_mount(&mounts, controller) else {
                    continue;
                };
                let Some(path) = own_path(&own, |list| list.split(',').any(|c| c == controller))
                else {
                    continue;
                };
                let mine = mount.join(path.trim_start_matches('/'));
                sweep_stale(&mine);
                sweep_stale(&mine);
                let parent = mine.join(name);
                match fs::create_dir_all(&parent) {
                    Ok(()) => dirs.push((controller, parent)),
                    Err(e) => tracing::debug!(controller, error = %e, "cgroup not writable"),
                }
            }
            // Membership is read from the freezer or pids hierarchy: one is needed.
            if dirs.iter().any(|(c, _)| matches!(*c, "freezer" | "pids")) {
                return Some(Tree::V1(dirs));
            }
            remove_dirs(dirs.iter().map(|(_, d)| d.as_path()));
        }
        if want_v2 {
            let mount = mounts
                .lines()
                .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
                .and_then(|l| l.split(' ').nth(1))
                .map(PathBuf::from)?;
            let path = own_path(&own, str::is_empty)?;
            let mine = mount.join(path.trim_start_matches('/'));
            let parent = mine.join(name);
            fs::create_dir_all(&parent).ok()?;
            if !parent.join("cgroup.kill").exists() && !parent.join("cgroup.freeze").exists() {
                remove_dirs([parent.as_path()]);
                return None;
            }
            // Delegate what the tree gives: into our own subtree (refused when our own
            // cgroup holds processes and is not the root: v2's no-internal-processes
            // rule), then into the parent's, for the runs.
            let available = fs::read_to_string(parent.join("cgroup.controllers")).ok();
            let mut enabled = Vec::new();
            for controller in V2_CONTROLLERS {
                let on = format!("+{controller}");
                let have = available
                    .as_deref()
                    .is_some_and(|a| a.split_whitespace().any(|c| c == controller))
                    || fs::write(mine.join("cgroup.subtree_control"), &on).is_ok();
                if have && fs::write(parent.join("cgroup.subtree_control"), &on).is_ok() {
                    enabled.push(controller);
                }
            }
            return Some(Tree::V2(parent, enabled));
        }
        None
    }

    /// The worker's parent directories.
    pub fn parents(&self) -> Vec<PathBuf> {
        match self {
            Tree::V1(dirs) => dirs.iter().map(|(_, d)| d.clone()).collect(),
            Tree::V2(dir, _) => vec![dir.clone()],
        }
    }

    /// What a worker says about this: `cgroup-v1 (freezer, pids, memory, cpu)`.
    pub fn describe(&self) -> String {
        match self {
            Tree::V1(dirs) => {
                let names: Vec<&str> = dirs.iter().map(|(c, _)| *c).collect();
                format!("cgroup-v1 ({})", names.join(", "))
            }
            Tree::V2(_, enabled) => {
                let mut names = vec!["kill"];
                names.extend(enabled);
                format!("cgroup-v2 ({})", names.join(", "))
            }
        }
    }

    /// Makes the cage `name` with `limits` set; the limits the tree cannot enforce are
    /// named in the answer's second part.
    pub fn cage(&self, name: &str, limits: &RunLimits) -> io::Result<(Cage, Vec<&'static str>)> {
        let mut cage = Cage {
            dirs: Vec::new(),
            v2: matches!(self, Tree::V2(..)),
        };
        match self {
            Tree::V1(parents) => {
                for (controller, parent) in parents {
                    let dir = parent.join(name);
                    // With its parent, should a sweep of another worker have taken it
                    // while it was empty (see `sweep_stale`).
                    fs::create_dir_all(&dir)?;
                    cage.dirs.push((controller, dir));
                }
            }
            Tree::V2(parent, enabled) => {
                let dir = parent.join(name);
                fs::create_dir(&dir)?;
                cage.dirs.extend(enabled.iter().map(|c| (*c, dir.clone())));
                cage.dirs.push(("", dir));
            }
        }
        let unenforced = cage.limit(limits)?;
        Ok((cage, unenforced))
    }
}

/// One run's cgroup (a directory per v1 controller, or one v2 directory). Dropped, it
/// kills whatever is still inside and removes its directories.
#[derive(Debug)]
pub(super) struct Cage {
    /// Controller → directory; in v2 every entry is the same directory, and the entry
    /// named `""` is the cgroup itself.
    dirs: Vec<(&'static str, PathBuf)>,
    v2: bool,
}

impl Cage {
    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// The directory whose `cgroup.procs` lists the members.
    fn members_dir(&self) -> &Path {
        let chosen = if self.v2 {
            self.dir("")
        } else {
            self.dir("freezer").or_else(|| self.dir("pids"))
        };
        chosen.unwrap_or_else(|| &self.dirs[0].1)
    }

    /// Writes the limits; returns those it has no controller for.
    fn limit(&self, limits: &RunLimits) -> io::Result<Vec<&'static str>> {
        let mut unenforced = Vec::new();
        let mut set = |controller: &str, name: &'static str, writes: Vec<(&str, String)>| match self
            .dir(controller)
        {
            Some(dir) => writes
                .into_iter()
                .try_for_each(|(file, value)| fs::write(dir.join(file), value)),
            None => {
                unenforced.push(name);
                Ok(())
            }
        };
        if let Some(mb) = limits.memory_mb {
            let bytes = (u64::from(mb) << 20).to_string();
            let file = if self.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            set("memory", "memory", vec![(file, bytes.clone())])?;
            // No swapping past the limit either, where the kernel counts swap (best
            // effort: absent without swap accounting).
            if let Some(dir) = self.dir("memory") {
                let _ = if self.v2 {
                    fs::write(dir.join("memory.swap.max"), "0")
                } else {
                    fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes)
                };
            }
        }
        if let Some(max) = limits.max_processes {
            set("pids", "processes", vec![("pids.max", max.to_string())])?;
        }
        if let Some(millis) = limits.cpu_millis {
            let quota = u64::from(millis) * CPU_PERIOD_US / 1_000;
            let writes = if self.v2 {
                vec![("cpu.max", format!("{quota} {CPU_PERIOD_US}"))]
            } else {
                vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ]
            };
            set("cpu", "cpu", writes)?;
        }
        Ok(unenforced)
    }

    /// Moves `pid` into the cage (every hierarchy of it).
    pub fn admit(&self, pid: u32) -> io::Result<()> {
        let mut done = Vec::new();
        for (_, dir) in &self.dirs {
            if !done.contains(&dir) {
                fs::write(dir.join("cgroup.procs"), pid.to_string())?;
                done.push(dir);
            }
        }
        Ok(())
    }

    /// The processes inside that have not ended (zombies are listed by v1, not counted).
    pub fn members(&self) -> Vec<i32> {
        listed(self.members_dir())
            .into_iter()
            .filter(|&pid| procs::live(pid))
            .collect()
    }

    pub fn signal(&self, signal: Signal) {
        procs::signal_each(&self.members(), signal);
    }

    /// SIGKILL to every process inside, at once: none can fork a new one in between.
    pub fn kill(&self) {
        kill_in(self.members_dir());
    }

    /// The limit the kernel enforced on the run, if any: an OOM kill, a refused fork.
    pub fn limit_hit(&self) -> Option<RunReason> {
        let counter = |controller: &str, file: &str, key: &str| {
            let text = fs::read_to_string(self.dir(controller)?.join(file)).ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
        };
        let oom_file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        if counter("memory", oom_file, "oom_kill ").is_some_and(|n| n > 0) {
            return Some(RunReason::OomKilled);
        }
        if counter("pids", "pids.events", "max ").is_some_and(|n| n > 0) {
            return Some(RunReason::PidsLimit);
        }
        None
    }
}

impl Drop for Cage {
    fn drop(&mut self) {
        let dirs: Vec<PathBuf> = self.dirs.iter().map(|(_, d)| d.clone()).collect();
        let members = self.members_dir().to_path_buf();
        if listed(&members).into_iter().any(procs::live) {
            kill_in(&members);
        }
        // Removed by the remover's thread: a cgroup's removal blocks (its controllers go
        // offline), and a run's end is often on a runtime thread.
        remove_later(dirs);
    }
}

/// Cgroups of ended runs go to one thread of the process, which removes each at once or,
/// still emptying (a process in uninterruptible sleep, a zombie its new parent has not
/// reaped yet), once it can (for 30 s at most): no runtime thread waits for them, and a
/// burst of ended runs costs one thread, not one each.
fn remove_later(dirs: Vec<PathBuf>) {
    use std::sync::mpsc;
    static LATER: std::sync::OnceLock<mpsc::Sender<Vec<PathBuf>>> = std::sync::OnceLock::new();
    let sender = LATER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Vec<PathBuf>>();
        std::thread::spawn(move || {
            let mut pending: Vec<(Vec<PathBuf>, Instant)> = Vec::new();
            loop {
                let wait = if pending.is_empty() {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_millis(50)
                };
                match rx.recv_timeout(wait) {
                    Ok(dirs) => pending.push((dirs, Instant::now() + Duration::from_secs(30))),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                pending.retain(|(dirs, until)| !try_remove(dirs) && Instant::now() < *until);
            }
        });
        tx
    });
    let _ = sender.send(dirs);
}

/// The pids a cgroup directory lists.
fn listed(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills everything in the cgroup at `dir`: `cgroup.kill` (v2), else frozen, killed,
/// thawed (a frozen process cannot fork, and dies once thawed), else killed in rounds.
pub(super) fn kill_in(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let v1_state = dir.join("freezer.state");
    let v2_freeze = dir.join("cgroup.freeze");
    let frozen = if fs::write(&v1_state, "FROZEN").is_ok() {
        // Freezing takes effect process by process: wait until the kernel says done.
        let until = Instant::now() + Duration::from_secs(1);
        while fs::read_to_string(&v1_state).is_ok_and(|s| s.trim() != "FROZEN")
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        Some((v1_state, "THAWED"))
    } else if fs::write(&v2_freeze, "1").is_ok() {
        Some((v2_freeze, "0"))
    } else {
        None
    };
    // Frozen, one round takes everything; unfrozen, a few rounds catch what forked.
    for _ in 0..if frozen.is_some() { 1 } else { 20 } {
        let pids = listed(dir);
        if pids.is_empty() {
            break;
        }
        procs::signal_each(&pids, Signal::SIGKILL);
    }
    if let Some((file, thawed)) = frozen {
        let _ = fs::write(file, thawed);
    }
}

/// Removes the directories (children before parents is the caller's order); true when
/// none is left.
fn try_remove(dirs: &[PathBuf]) -> bool {
    let mut all = true;
    for dir in dirs {
        if let Err(e) = fs::remove_dir(dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            all = false;
        }
    }
    all
}

pub(super) fn remove_dirs<'a>(dirs: impl IntoIterator<Item = &'a Path>) {
    for dir in dirs {
        let _ = fs::remove_dir(dir);
    }
}

/// Kills what every child cgroup of `parent` holds and removes them, then `parent`
/// (what a worker that died left behind). Returns how many processes it killed.
pub(super) fn clear(parent: &Path) -> usize {
    let mut killed = 0;
    if let Ok(entries) = fs::read_dir(parent) {
        for entry in entries.flatten() {
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            let live: Vec<i32> = listed(&dir)
                .into_iter()
                .filter(|&p| procs::live(p))
                .collect();
            killed += live.len();
            if !live.is_empty() {
                kill_in(&dir);
            }
            let until = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(&dir).is_err() && dir.exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = fs::remove_dir(parent);
    killed
}

/// Removes the empty parents of workers that are gone (`cloudtask-<pid>-…` whose process
/// is not running here), as a worker killed outright leaves them behind with a data
/// folder that may never be used again. Only empty directories can be removed, so
/// nothing that holds a process is touched.
fn sweep_stale(mine: &Path) {
    let Ok(entries) = fs::read_dir(mine) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cloudtask-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let parent = entry.path();
        if let Ok(runs) = fs::read_dir(&parent) {
            for run in runs.flatten().filter(|r| r.path().is_dir()) {
                let _ = fs::remove_dir(run.path());
            }
        }
        let _ = fs::remove_dir(&parent);
    }
}

/// Where the v1 hierarchy holding `controller` is mounted.
fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let (point, kind, options) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
        (*kind == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| PathBuf::from(point))
    })
}

/// The worker's own cgroup path in the hierarchy whose controller list (the second
/// field of `/proc/self/cgroup`) matches.
fn own_path(own: &str, matches: impl Fn(&str) -> bool) -> Option<String> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        matches(list).then(|| path.to_owned())
    })
}
