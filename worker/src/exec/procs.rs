//! Processes as `/proc` shows them: whether one is still running (a zombie is not: it has
//! ended and only waits for its parent to read its status), and the processes of a run
//! when the kernel gives no cgroup to hold them (its process group, its session, and any
//! process still carrying the run's `CLOUDTASK_RUN_ID`).
//!
//! Finding a run's processes means looking at every process of the machine. One look
//! ([`Scan`]) serves every run the worker samples at about the same moment, and a
//! process's run id is read from its environment once, when it is first seen.

use std::collections::HashMap;
use std::fs;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cloudtask_core::ids::RunId;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A process's parent, group, session and state letter, from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stat {
    pub group: i32,
    pub session: i32,
    pub state: char,
    /// Its threads (1 for a process with no other).
    pub threads: u64,
    /// When it started, in clock ticks since boot: with the pid, names one process.
    pub started: u64,
}

impl Stat {
    /// Running, sleeping, stopped…: anything but ended (zombie `Z`, dead `X`).
    pub fn live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

pub(super) fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after it start
    // after the last ')'.
    let mut fields = text.get(text.rfind(')')? + 2..)?.split(' ');
    let state = fields.next()?.chars().next()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    let session = fields.next()?.parse().ok()?;
    // tty_nr … nice (fields 7–19), then num_threads (20).
    let threads = fields.nth(13)?.parse().ok()?;
    // itrealvalue (21), then starttime (22).
    let started = fields.nth(1)?.parse().ok()?;
    Some(Stat {
        group,
        session,
        state,
        threads,
        started,
    })
}

/// What a set of processes holds now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Usage {
    /// Resident memory of them all, in bytes (shared pages counted in each).
    pub resident: u64,
    /// Their processes and threads.
    pub threads: u64,
}

/// The resident memory and threads of `pids` (those gone meanwhile count nothing).
pub(super) fn usage(pids: &[i32]) -> Usage {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as u64);
    let mut usage = Usage::default();
    for &pid in pids {
        let Some(stat) = stat(pid) else {
            continue;
        };
        let resident = fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|t| t.split(' ').nth(1)?.parse::<u64>().ok())
            .unwrap_or(0);
        usage.resident += resident * page;
        usage.threads += stat.threads;
    }
    usage
}

/// Whether `pid` is a process that has not ended (a zombie has).
pub(super) fn live(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.live())
}

/// Every process id `/proc` lists now.
fn all_pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The run id in a process's environment (what a run's processes inherit unless they
/// clear their environment): `Some(None)` for an environment without one, `None` when
/// it could not be read (gone, a kernel thread, or caught in an exec).
fn run_of(pid: i32) -> Option<Option<Vec<u8>>> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    if env.is_empty() {
        return None;
    }
    Some(
        env.split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(b"CLOUDTASK_RUN_ID="))
            .map(<[u8]>::to_vec),
    )
}

/// One look at the live processes of the machine (this one left out).
#[derive(Debug, Default)]
pub(super) struct Scan {
    procs: Vec<Seen>,
}

#[derive(Debug)]
struct Seen {
    pid: i32,
    stat: Stat,
    run: Option<Arc<[u8]>>,
}

impl Scan {
    /// The processes of a run: its process group, its session (both led by the run's
    /// shell, `group`), and any process carrying the run's id, wherever it went
    /// (`setsid`, a double fork, `nohup`). A program that also clears its environment
    /// escapes this; cgroups hold it.
    pub fn members(&self, group: i32, run: RunId) -> Vec<i32> {
        let id = run.to_string();
        self.procs
            .iter()
            .filter(|p| {
                let led = group > 0 && (p.stat.group == group || p.stat.session == group);
                led || p.run.as_deref() == Some(id.as_bytes())
            })
            .map(|p| p.pid)
            .collect()
    }
}

/// The last scan, and the run ids of the processes it saw (by pid and start time).
#[derive(Default)]
struct Scans {
    last: Option<(Instant, Arc<Scan>)>,
    runs: HashMap<(i32, u64), Option<Arc<[u8]>>>,
}

static SCANS: Mutex<Option<Scans>> = Mutex::new(None);

/// The live processes of the machine, as a look started at `since` or later found them:
/// callers that asked while a look was under way share the next one (which sees
/// everything alive when each asked), and samplers that take one a little old share it.
/// Blocks (reads `/proc`).
pub(super) fn scan(since: Instant) -> Arc<Scan> {
    let mut scans = SCANS.lock().unwrap_or_else(|e| e.into_inner());
    let scans = scans.get_or_insert_with(Scans::default);
    if let Some((at, scan)) = &scans.last
        && *at >= since
    {
        return scan.clone();
    }
    let at = Instant::now();
    let me = std::process::id() as i32;
    let mut runs = HashMap::with_capacity(scans.runs.len());
    let mut procs = Vec::new();
    for pid in all_pids() {
        let Some(stat) = stat(pid).filter(|s| s.live() && pid != me) else {
            continue;
        };
        let key = (pid, stat.started);
        let run = match scans.runs.remove(&key) {
            Some(known) => Some(known),
            None => run_of(pid).map(|run| run.map(Arc::from)),
        };
        // Unread environments are read again at the next look.
        if let Some(run) = &run {
            runs.insert(key, run.clone());
        }
        procs.push(Seen {
            pid,
            stat,
            run: run.flatten(),
        });
    }
    scans.runs = runs;
    let scan = Arc::new(Scan { procs });
    scans.last = Some((at, scan.clone()));
    scan
}

/// The live processes of a run without a cgroup, now (see [`Scan::members`]).
pub(super) fn run_members(group: i32, run: RunId) -> Vec<i32> {
    scan(Instant::now()).members(group, run)
}

/// Sends `signal` to each process; a process gone meanwhile is no error.
pub(super) fn signal_each(pids: &[i32], signal: Signal) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_is_not_live_and_a_sleeper_is() {
        // Exits at once, and stays a zombie until waited for.
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let pid = zombie.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while live(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "never became a zombie"
            );
            std::thread::yield_now();
        }
        assert_eq!(stat(pid).map(|s| s.state), Some('Z'));
        // The old check counted it: a signal 0 to a zombie succeeds.
        assert!(kill(Pid::from_raw(pid), None).is_ok());
        zombie.wait().unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(live(sleeper.id() as i32));
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }

    #[test]
    fn a_run_is_found_by_its_group_and_by_its_id_outside_it() {
        let run = RunId::new();
        // Its own session and group, carrying the run's id.
        let mut away = std::process::Command::new("setsid")
            .args(["sleep", "30"])
            .env("CLOUDTASK_RUN_ID", run.to_string())
            .spawn()
            .unwrap();
        let pid = away.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !run_members(0, run).contains(&pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the run's process was never found"
            );
            std::thread::yield_now();
        }
        // Seen again from what the first look read of it; not another run's.
        assert_eq!(run_members(0, run), vec![pid]);
        assert!(run_members(0, RunId::new()).is_empty());
        // Its group, by the group's leader.
        assert!(run_members(pid, RunId::new()).contains(&pid));
        away.kill().unwrap();
        away.wait().unwrap();
        assert!(run_members(0, run).is_empty());
    }
}
