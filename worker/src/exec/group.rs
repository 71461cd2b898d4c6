//! The end of a run's process group: SIGTERM to all of it, SIGKILL after the grace.

use std::time::Duration;

use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use super::ExecLimits;

/// SIGTERM to the group, then SIGKILL after the kill grace if anything of it is left;
/// once `hurry` is cancelled (before or during the grace), after the hurried grace at
/// the latest. With `exited`, the main process is reaped already and only leftovers are
/// signalled. Returns the main process's status when it was still running.
pub(super) async fn terminate_group(
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
