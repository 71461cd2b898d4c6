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

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::process::Child;

use super::contain::{self, Containment, Members};
use super::{RunSpec, command};

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

/// What a staged shell runs before the command, on the command's first line: wait for
/// the go line (end of input: exit without running anything), then give the command the
/// null stdin it has when started directly. (`CLOUDTASK_` names are refused in a task's
/// environment, so the variable read is nobody's.)
#[cfg(unix)]
pub const HOLD: &str = "read -r CLOUDTASK_GO || exit 125; unset CLOUDTASK_GO; exec </dev/null; ";

/// A fire's shell started ahead of its time, holding before the command. Dropped, its
/// whole process group is killed: before it runs anything, unless it was let go.
pub struct Staged {
    pub(super) spec: RunSpec,
    /// Taken by [`execute_staged`], which supervises it from then on.
    pub(super) child: Option<Child>,
    /// Its processes (its cgroup, which it entered before it was let go); taken with
    /// `child`.
    pub(super) members: Option<Members>,
    /// The shell's stdin until it is let go, and its place among the staged.
    go: Option<(std::fs::File, Held)>,
    /// Whether it was put in the batch class (to put back in the normal one).
    pub(super) batch: bool,
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
        // Whatever a shell let go started outside its group.
        if let Some(members) = self.members.as_ref().filter(|_| self.released()) {
            members.kill();
        }
    }
}

/// Starts the fire's shell now, held until [`Staged::release`], in its cgroup when
/// `containment` has them. None when it cannot be staged (too many held, the spawn
/// failed, not on Unix): the fire starts at its time. Blocks (spawning, making the
/// cgroup and moving the shell in): call it off the runtime's threads.
pub fn stage(spec: RunSpec, containment: &Containment) -> Option<Staged> {
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
        let cage = containment.cage(spec.run_id, &spec.limits);
        let members = contain::enter(cage, &child, spec.run_id);
        let mut staged = Staged {
            spec,
            child: Some(child),
            members: Some(members),
            go: None,
            batch,
        };
        let go = std::fs::File::from(stdin?.into_owned_fd().ok()?);
        staged.go = Some((go, held));
        Some(staged)
    }
    #[cfg(not(unix))]
    {
        let _ = (spec, containment);
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
pub(super) mod scheduling {
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
    pub(crate) fn set(pid: libc::pid_t, policy: libc::c_int) -> bool {
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
