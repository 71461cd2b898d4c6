//! Login attempts, throttled per client address and per account over a sliding window
//! (`login_window_secs`); never a lock a stranger can put on someone else's account.
//!
//! - An address may fail `login_max_attempts` times per window. Past that, its logins are
//!   RATE_LIMITED (retry when its oldest failure leaves the window), for any account.
//!   IPv6 addresses count by /64: one host usually holds the whole /64.
//! - An account's failures, from every address, never refuse a login: once it has
//!   `login_max_attempts` of them in the window, each further attempt waits before its
//!   password is checked, 1 s doubling with each further failure, at most
//!   `login_account_max_delay_secs`. Its owner is slowed, never locked out.
//! - An attempt is counted (as a failure) when it starts, under one lock, before any
//!   hashing: a batch or parallel requests cannot all pass the check and fail later. A
//!   success gives its address slot back and clears the account's failures; an attempt
//!   whose password was never checked (the hashing queue was full) gives both back.
//!
//! In memory, per API replica: an attacker spreading attempts over N replicas gets N
//! times the budget, which is still bounded.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudtask_core::Error;

/// Past this many entries, keys with no failure left in the window are dropped.
const MAX_KEYS: usize = 100_000;
/// An account's failures kept beyond `max_failures`: the delay is at its cap long before.
const ACCOUNT_EXTRA_KEPT: usize = 64;
/// No email address is longer; a longer one names no account and is kept cut to this.
const MAX_EMAIL_CHARS: usize = 320;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Account(String),
    Address(IpAddr),
}

impl Key {
    fn account(email: &str) -> Key {
        let email: String = email.trim().chars().take(MAX_EMAIL_CHARS).collect();
        Key::Account(email.to_lowercase())
    }

    fn address(ip: IpAddr) -> Key {
        Key::Address(address_key(ip))
    }
}

/// A client address as limits count it: IPv6 by its /64 (one host usually holds the
/// whole /64), IPv4 (also when mapped into IPv6) as it is.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    max_account_delay: Duration,
    failures: Mutex<HashMap<Key, VecDeque<Instant>>>,
}

/// One login attempt, counted as a failure until it is settled otherwise.
#[must_use = "an attempt counts as a failure unless settled as a success or unchecked"]
pub struct Attempt<'a> {
    limiter: &'a LoginLimiter,
    account: Key,
    address: Key,
    started: Instant,
    delay: Duration,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration, max_account_delay: Duration) -> Self {
        LoginLimiter {
            max_failures: max_failures as usize,
            window,
            max_account_delay,
            failures: Mutex::default(),
        }
    }

    /// Counts an attempt by `ip` on `email` before its password is checked; RATE_LIMITED
    /// when the address has used up its failures.
    pub fn start(&self, email: &str, ip: IpAddr) -> Result<Attempt<'_>, Error> {
        let now = Instant::now();
        let (account, address) = (Key::account(email), Key::address(ip));
        let mut failures = self.failures.lock().expect("login limiter lock");
        if failures.len() > MAX_KEYS {
            failures.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        let by_address = failures.entry(address.clone()).or_default();
        self.forget_old(by_address, now);
        if by_address.len() >= self.max_failures {
            let oldest = *by_address.front().expect("non-empty");
            let retry = self.window.saturating_sub(now.duration_since(oldest));
            return Err(Error::RateLimited {
                retry_after_secs: retry.as_secs().max(1),
            });
        }
        by_address.push_back(now);
        let by_account = failures.entry(account.clone()).or_default();
        self.forget_old(by_account, now);
        let delay = self.account_delay(by_account.len());
        by_account.push_back(now);
        if by_account.len() > self.max_failures + ACCOUNT_EXTRA_KEPT {
            by_account.pop_front();
        }
        Ok(Attempt {
            limiter: self,
            account,
            address,
            started: now,
            delay,
        })
    }

    fn forget_old(&self, times: &mut VecDeque<Instant>, now: Instant) {
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
    }

    /// How long an attempt waits when its account already has `failures` in the window.
    fn account_delay(&self, failures: usize) -> Duration {
        let Some(over) = failures.checked_sub(self.max_failures) else {
            return Duration::ZERO;
        };
        Duration::from_secs(1u64 << over.min(20)).min(self.max_account_delay)
    }

    /// Removes the failure `attempt` counted, and with `clear_account` all of its account's.
    fn settle(&self, attempt: &Attempt<'_>, clear_account: bool) {
        let mut failures = self.failures.lock().expect("login limiter lock");
        let mut remove_own = |key: &Key| {
            if let Some(times) = failures.get_mut(key)
                && let Some(i) = times.iter().rposition(|t| *t == attempt.started)
            {
                times.remove(i);
            }
        };
        remove_own(&attempt.address);
        if clear_account {
            failures.remove(&attempt.account);
        } else {
            remove_own(&attempt.account);
        }
    }
}

impl Attempt<'_> {
    /// How long to wait before checking the password: the account's slow-down.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The right password: the address gets its slot back, the account starts afresh.
    pub fn succeeded(self) {
        self.limiter.settle(&self, true);
    }

    /// The password was never checked: the attempt counts for nothing.
    pub fn unchecked(self) {
        self.limiter.settle(&self, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "x@y.z";

    fn limiter(max: u32) -> LoginLimiter {
        LoginLimiter::new(max, Duration::from_secs(60), Duration::from_secs(8))
    }

    fn ip(last: u8) -> IpAddr {
        [10, 0, 0, last].into()
    }

    #[test]
    fn an_address_is_refused_after_its_failures_for_any_account() {
        let limiter = limiter(2);
        let _ = limiter.start(A, ip(1)).unwrap();
        let _ = limiter.start(A, ip(1)).unwrap();
        let refused = limiter.start("other@y.z", ip(1));
        assert!(
            matches!(refused, Err(Error::RateLimited { retry_after_secs }) if retry_after_secs >= 1)
        );
        assert!(limiter.start("other@y.z", ip(2)).is_ok());
    }

    #[test]
    fn attempts_in_flight_count_before_they_are_settled() {
        let limiter = limiter(3);
        let in_flight: Vec<_> = (0..3).map(|_| limiter.start(A, ip(1)).unwrap()).collect();
        assert!(limiter.start(A, ip(1)).is_err(), "a fourth one in parallel");
        in_flight.into_iter().for_each(Attempt::unchecked);
        assert!(
            limiter.start(A, ip(1)).is_ok(),
            "unchecked attempts are given back"
        );
    }

    #[test]
    fn an_accounts_failures_slow_it_down_and_never_refuse() {
        let limiter = limiter(2);
        let delays: Vec<_> = (1..=8)
            .map(|i| limiter.start(A, ip(i)).unwrap().delay().as_secs())
            .collect();
        assert_eq!(delays, [0, 0, 1, 2, 4, 8, 8, 8]);
        let owner = limiter
            .start(A, ip(100))
            .expect("the owner's address is not refused");
        assert_eq!(owner.delay(), Duration::from_secs(8));
        owner.succeeded();
        assert_eq!(limiter.start(A, ip(100)).unwrap().delay(), Duration::ZERO);
    }

    #[test]
    fn a_success_gives_the_address_its_slot_back() {
        let limiter = limiter(2);
        let _ = limiter.start("other@y.z", ip(1)).unwrap();
        limiter.start(A, ip(1)).unwrap().succeeded();
        assert!(limiter.start(A, ip(1)).is_ok());
        assert!(limiter.start(A, ip(1)).is_err());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let limiter = limiter(1);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _ = limiter.start(A, one).unwrap();
        assert!(limiter.start("b@y.z", same_64).is_err());
        assert!(limiter.start("b@y.z", other_64).is_ok());
    }
}
