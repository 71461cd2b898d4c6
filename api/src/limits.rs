//! Failed-login limits per account and per client address, over a sliding window.
//! In memory, per API replica: an attacker spreading attempts over N replicas gets N
//! times the budget, which is still bounded.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudtask_core::Error;

#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        LoginLimiter {
            max_failures: max_failures as usize,
            window,
            failures: Mutex::default(),
        }
    }

    fn keys(email: &str, ip: IpAddr) -> [String; 2] {
        [
            format!("account:{}", email.trim().to_lowercase()),
            format!("address:{ip}"),
        ]
    }

    /// RATE_LIMITED when the account or the address has used up its failures.
    pub fn check(&self, email: &str, ip: IpAddr) -> Result<(), Error> {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("login limiter lock");
        for key in Self::keys(email, ip) {
            if let Some(times) = failures.get_mut(&key) {
                while times
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    times.pop_front();
                }
                if times.len() >= self.max_failures {
                    let oldest = *times.front().expect("non-empty");
                    let retry = self.window.saturating_sub(now.duration_since(oldest));
                    return Err(Error::RateLimited {
                        retry_after_secs: retry.as_secs().max(1),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn record_failure(&self, email: &str, ip: IpAddr) {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("login limiter lock");
        // Keep the map from growing without bound under a spray of addresses.
        if failures.len() > 100_000 {
            failures.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        for key in Self::keys(email, ip) {
            let times = failures.entry(key).or_default();
            times.push_back(now);
            while times.len() > self.max_failures {
                times.pop_front();
            }
        }
    }

    /// A correct password clears the account's failures (not the address's).
    pub fn record_success(&self, email: &str) {
        let [account, _] = Self::keys(email, IpAddr::from([0, 0, 0, 0]));
        self.failures
            .lock()
            .expect("login limiter lock")
            .remove(&account);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_per_account_and_address() {
        let limiter = LoginLimiter::new(2, Duration::from_secs(60));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        limiter.record_failure("x@y.z", a);
        assert!(limiter.check("x@y.z", a).is_ok());
        limiter.record_failure("x@y.z", a);
        assert!(
            limiter.check("x@y.z", b).is_err(),
            "account limited from any address"
        );
        assert!(
            limiter.check("other@y.z", a).is_err(),
            "address limited for any account"
        );
        assert!(limiter.check("other@y.z", b).is_ok());
    }
}
