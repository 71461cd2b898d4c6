//! Catalogue connections per user. Every tenant handle a user's requests and sockets make
//! on this replica shares the user's lanes (`db_connections_per_user`): one caller's
//! fan-out — 40 aliases of a run's logs, 2,000 log subscriptions — waits for its own lanes
//! instead of taking the connection pool from everybody else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use cloudtask_core::ids::UserId;
use tokio::sync::Semaphore;

pub struct UserLanes {
    per_user: usize,
    /// Held by the users' handles; a user without handles left is forgotten.
    lanes: Mutex<HashMap<UserId, Weak<Semaphore>>>,
}

impl UserLanes {
    pub fn new(per_user: usize) -> Self {
        UserLanes {
            per_user,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// The lanes of `user`, shared by all their handles alive now.
    pub fn of(&self, user: UserId) -> Arc<Semaphore> {
        let mut lanes = self.lanes.lock().expect("user lanes");
        if let Some(shared) = lanes.get(&user).and_then(Weak::upgrade) {
            return shared;
        }
        let shared = Arc::new(Semaphore::new(self.per_user));
        lanes.insert(user, Arc::downgrade(&shared));
        shared
    }

    /// Forgets users none of whose handles are left.
    pub fn forget_idle(&self) {
        self.lanes
            .lock()
            .expect("user lanes")
            .retain(|_, lanes| lanes.strong_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_handles_share_their_lanes_and_idle_users_are_forgotten() {
        let lanes = UserLanes::new(2);
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
