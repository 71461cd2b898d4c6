//! What one caller may use at once on this replica, so that one caller's fan-out waits
//! for its own share instead of taking everybody else's:
//!
//! - catalogue connections per user (`db_connections_per_user`): every tenant handle a
//!   user's requests and sockets make shares the user's lanes — 40 aliases of a run's logs
//!   or 2,000 log subscriptions wait for them, not for the pool;
//! - heavy operations per caller (`query_heavy_complexity`, see `graphql::cost`): a caller's
//!   queries and mutations that cost that much run one at a time, answer written included,
//!   so one caller's big answers keep at most one core busy.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Semaphore;

pub struct Lanes<K> {
    per_key: usize,
    /// Held by the callers' handles and operations; a key with none left is forgotten.
    lanes: Mutex<HashMap<K, Weak<Semaphore>>>,
}

impl<K: Eq + Hash> Lanes<K> {
    pub fn new(per_key: usize) -> Self {
        Lanes {
            per_key,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// The lanes of `key`, shared by all its holders alive now.
    pub fn of(&self, key: K) -> Arc<Semaphore> {
        let mut lanes = self.lanes.lock().expect("lanes");
        if let Some(shared) = lanes.get(&key).and_then(Weak::upgrade) {
            return shared;
        }
        let shared = Arc::new(Semaphore::new(self.per_key));
        lanes.insert(key, Arc::downgrade(&shared));
        shared
    }

    /// Forgets the keys none of whose holders are left.
    pub fn forget_idle(&self) {
        self.lanes
            .lock()
            .expect("lanes")
            .retain(|_, lanes| lanes.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudtask_core::ids::UserId;

    #[test]
    fn a_users_handles_share_their_lanes_and_idle_users_are_forgotten() {
        let lanes = Lanes::new(2);
        let (alice, bob) = (UserId::new(), UserId::new());
        let first = lanes.of(alice);
        let _held = first.clone().try_acquire_owned().unwrap();
        let second = lanes.of(alice);
        assert_eq!(second.available_permits(), 1, "the same lanes");
        assert_eq!(lanes.of(bob).available_permits(), 2, "another user's own");
        lanes.forget_idle();
        assert_eq!(
            lanes.lanes.lock().unwrap().len(),
            1,
            "bob had no handle left"
        );
    }
}
