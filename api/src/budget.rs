//! Each caller's budget over time, beside the per-request bounds: how many requests a
//! caller may make per minute, and how much query cost (the complexity `graphql::cost`
//! computes) it may spend per minute. A signed-in caller is counted by user, across all
//! its tokens and sockets; an anonymous caller by its client address (IPv6 by its /64,
//! as logins are). Past either budget: RATE_LIMITED, with when to retry.
//!
//! GCRA (the `governor` crate): a budget refills smoothly, and a whole minute's worth may
//! be spent in a burst. In memory, per API replica; callers idle for a minute are
//! forgotten by [`RateBudget::forget_idle`], which the API runs every minute.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use cloudtask_core::config::Config;
use cloudtask_core::ids::UserId;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::Identity;
use crate::limits::address_key;

/// Who is spending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    User(UserId),
    /// An anonymous client's address (IPv6 cut to its /64).
    Source(IpAddr),
}

impl Caller {
    pub fn anonymous(ip: IpAddr) -> Caller {
        Caller::Source(address_key(ip))
    }

    /// The signed-in user when the request's token was valid, else the client's address.
    pub fn of(auth: &Option<Result<Identity, String>>, ip: IpAddr) -> Caller {
        match auth {
            Some(Ok(identity)) => Caller::User(identity.user_id),
            _ => Caller::anonymous(ip),
        }
    }
}

/// Why a caller was refused: which budget, and when it has room again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget {
    pub what: &'static str,
    pub retry_after: Duration,
}

impl OverBudget {
    pub fn message(&self) -> String {
        format!(
            "{} budget spent; try again in {} s",
            self.what,
            self.retry_after.as_secs().max(1)
        )
    }
}

pub struct RateBudget {
    users: DefaultKeyedRateLimiter<Caller>,
    anonymous: DefaultKeyedRateLimiter<Caller>,
    cost: DefaultKeyedRateLimiter<Caller>,
    clock: DefaultClock,
}

fn per_minute(n: u64) -> Quota {
    let n = NonZeroU32::new(n.clamp(1, u32::MAX as u64) as u32).expect("at least 1");
    Quota::per_minute(n)
}

impl RateBudget {
    pub fn new(config: &Config) -> Self {
        RateBudget {
            users: DefaultKeyedRateLimiter::dashmap(per_minute(config.rate_requests_per_minute)),
            anonymous: DefaultKeyedRateLimiter::dashmap(per_minute(
                config.rate_anonymous_requests_per_minute,
            )),
            cost: DefaultKeyedRateLimiter::dashmap(per_minute(config.rate_cost_per_minute)),
            clock: DefaultClock::default(),
        }
    }

    /// One request (an HTTP request, or an operation started on a socket).
    pub fn request(&self, caller: Caller) -> Result<(), OverBudget> {
        let limiter = match caller {
            Caller::User(_) => &self.users,
            Caller::Source(_) => &self.anonymous,
        };
        limiter.check_key(&caller).map_err(|not_until| OverBudget {
            what: "request",
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// A validated operation's cost.
    pub fn spend(&self, caller: Caller, cost: usize) -> Result<(), OverBudget> {
        let n = NonZeroU32::new(cost.clamp(1, u32::MAX as usize) as u32).expect("at least 1");
        match self.cost.check_key_n(&caller, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(OverBudget {
                what: "query cost",
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
            // More than a whole minute's budget at once: never affordable.
            Err(_) => Err(OverBudget {
                what: "query cost",
                retry_after: Duration::from_secs(60),
            }),
        }
    }

    /// Drops the state of callers whose budgets are full again.
    pub fn forget_idle(&self) {
        for limiter in [&self.users, &self.anonymous, &self.cost] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Callers with state kept (for tests).
    pub fn len(&self) -> usize {
        self.users.len() + self.anonymous.len() + self.cost.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(requests: u64, anonymous: u64, cost: u64) -> RateBudget {
        RateBudget::new(&Config {
            rate_requests_per_minute: requests,
            rate_anonymous_requests_per_minute: anonymous,
            rate_cost_per_minute: cost,
            ..Config::default()
        })
    }

    #[test]
    fn a_caller_spends_its_own_minute_and_no_one_elses() {
        let budget = budget(3, 2, 1_000);
        let alice = Caller::User(UserId::new());
        let bob = Caller::User(UserId::new());
        for _ in 0..3 {
            budget.request(alice).unwrap();
        }
        let refused = budget.request(alice).unwrap_err();
        assert_eq!(refused.what, "request");
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(20)
        );
        budget.request(bob).unwrap();
    }

    #[test]
    fn anonymous_callers_count_by_address_and_ipv6_by_its_64() {
        let budget = budget(100, 2, 1_000);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff".parse().unwrap();
        budget.request(Caller::anonymous(a)).unwrap();
        budget.request(Caller::anonymous(b)).unwrap();
        assert!(budget.request(Caller::anonymous(a)).is_err());
        budget
            .request(Caller::anonymous("192.0.2.7".parse().unwrap()))
            .unwrap();
    }

    #[test]
    fn cost_is_spent_by_weight_and_an_unaffordable_cost_is_refused() {
        let budget = budget(100, 100, 1_000);
        let alice = Caller::User(UserId::new());
        budget.spend(alice, 600).unwrap();
        assert_eq!(budget.spend(alice, 600).unwrap_err().what, "query cost");
        budget.spend(alice, 300).unwrap();
        assert!(budget.spend(Caller::User(UserId::new()), 5_000).is_err());
    }
}
