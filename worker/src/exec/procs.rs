//! Processes as `/proc` shows them: whether one is still running (a zombie is not: it has
//! ended and only waits for its parent to read its status), and the processes of a run
//! when the kernel gives no cgroup to hold them (its process group, its session, and any
//! process still carrying the run's `CLOUDTASK_RUN_ID`).

use std::fs;

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
    Some(Stat {
        group,
        session,
        state,
        threads,
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

/// Whether the process's environment holds the run's id (what a run's processes inherit
/// unless they clear their environment).
fn carries(pid: i32, marker: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == marker))
}

/// The live processes of a run without a cgroup: its process group, its session (both
/// led by the run's shell, `group`), and any process carrying the run's id, wherever it
/// went (`setsid`, a double fork, `nohup`). A program that also clears its environment
/// escapes this; cgroups hold it.
pub(super) fn run_members(group: i32, run: RunId) -> Vec<i32> {
    let marker = format!("CLOUDTASK_RUN_ID={run}").into_bytes();
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            stat(pid).is_some_and(|s| {
                let led = group > 0 && (s.group == group || s.session == group);
                s.live() && (led || carries(pid, &marker))
            })
        })
        .collect()
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
}
