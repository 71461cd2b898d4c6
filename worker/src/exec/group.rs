//! The end of a run's processes: SIGTERM to all of them, SIGKILL after the grace. "All of
//! them" is what [`Members`] holds: the run's cgroup, or its process tree without one. A
//! process that has ended but was not reaped yet (a zombie) counts as gone.

use std::time::Duration;

use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use super::ExecLimits;
use super::contain::Members;

/// SIGTERM to the run's processes, then SIGKILL after the kill grace if anything of it is
/// left; once `hurry` is cancelled (before or during the grace), after the hurried grace
/// at the latest. With `exited`, the main process is reaped already and only leftovers
/// are signalled. Returns the main process's status when it was still running.
pub(super) async fn terminate_group(
    members: &Members,
    limits: &ExecLimits,
    hurry: &CancellationToken,
    child: &mut Child,
    exited: bool,
) -> Option<std::process::ExitStatus> {
    if !members.alive() {
        return if exited {
            None
        } else {
            child.wait().await.ok()
        };
    }
    members.terminate();
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
    // Leftovers: poll until they are gone or the grace is over.
    while !over_done && members.alive() {
        tokio::select! {
            _ = &mut over => over_done = true,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    if members.alive() {
        members.kill();
    }
    if status.is_none() && !exited {
        status = child.wait().await.ok();
    }
    // Killed processes end within moments (a kill cannot be ignored), and the caller
    // waits for the pipes they held: wait for them here, bounded, killing again what a
    // fork raced past the first kill (without a cgroup's freezer that can happen).
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while members.alive() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
        members.kill();
    }
    status
}
