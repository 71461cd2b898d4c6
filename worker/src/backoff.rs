//! Capped exponential backoff with jitter, and a sleep that a shutdown cuts short.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    jitter: RandomState,
    attempt: u64,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
            jitter: RandomState::new(),
            attempt: 0,
        }
    }

    /// The next delay: the current step with up to 25% taken off at random (so that many
    /// workers cut off by one outage do not all come back in the same instant), then the
    /// step doubles up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempt += 1;
        let mut hasher = self.jitter.build_hasher();
        hasher.write_u64(self.attempt);
        let fraction = (hasher.finish() % 1_000) as f64 / 4_000.0;
        step.mul_f64(1.0 - fraction)
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }

    /// Sleeps for the next delay; `false` when the shutdown came first.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        let steps = [100, 200, 400, 800, 800, 800];
        for (delay, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(
                *delay <= step && *delay >= step.mul_f64(0.75),
                "{delay:?} vs {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
