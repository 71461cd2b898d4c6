//! The worker's clock: when fires are due and how long to sleep until the next. The
//! system clock in production; a manual one lets a test drive the worker through a DST
//! change or a clock jump in seconds.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::sync::watch;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
    /// Resolves once this clock reads `at` or later.
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()>;
}

/// Wall time. Slept on with tokio's timer up to the last stretch, which a thread sleeps
/// to the microsecond: tokio's timer ticks in milliseconds and wakes up to a tick or two
/// late, which is most of a fire's lag on an idle machine.
pub struct SystemClock;

/// The stretch before a deadline that is slept on a thread.
const PRECISE: std::time::Duration = std::time::Duration::from_millis(3);
/// The longest stretch slept without reading the wall clock again.
const SLICE: std::time::Duration = std::time::Duration::from_secs(1);

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        let left = move || (at - Utc::now()).to_std().unwrap_or_default();
        Box::pin(async move {
            // In slices of at most a second, each from the wall clock again: a clock that
            // is set forward or back is followed within a second.
            loop {
                let rest = left();
                if rest.is_zero() {
                    return;
                }
                match rest.checked_sub(PRECISE) {
                    Some(coarse) if !coarse.is_zero() => {
                        tokio::time::sleep(coarse.min(SLICE)).await;
                    }
                    _ => {
                        // What is left is read on the thread: starting it takes time too.
                        let last = move || std::thread::sleep(left().min(PRECISE));
                        let _ = tokio::task::spawn_blocking(last).await;
                    }
                }
            }
        })
    }
}

/// A clock that moves only when told to (for tests).
pub struct ManualClock {
    now: watch::Sender<DateTime<Utc>>,
    requested: watch::Sender<BTreeSet<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: watch::Sender::new(start),
            requested: watch::Sender::new(BTreeSet::new()),
        }
    }

    /// Moves the clock to `at` (never backwards).
    pub fn set(&self, at: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            let later = at > *now;
            if later {
                *now = at;
            }
            later
        });
    }

    /// Waits until someone has slept until `at`: the worker has armed a fire for it.
    pub async fn wait_for_sleeper(&self, at: DateTime<Utc>) {
        let mut requested = self.requested.subscribe();
        let _ = requested.wait_for(|set| set.contains(&at)).await;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'static, ()> {
        self.requested.send_modify(|set| {
            set.insert(at);
        });
        let mut now = self.now.subscribe();
        Box::pin(async move {
            let _ = now.wait_for(|now| *now >= at).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_system_clock_never_wakes_before_the_deadline() {
        let clock = SystemClock;
        for wait_ms in [0, 2, 5, 40] {
            let at = Utc::now() + chrono::Duration::milliseconds(wait_ms);
            clock.sleep_until(at).await;
            assert!(Utc::now() >= at, "woke before {at}");
        }
    }
}
