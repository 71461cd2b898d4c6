//! The sockets open on this replica, counted per user (`ws_max_sockets_per_user`), and a
//! signal per user that their account changed (memberships, roles, logins), so their
//! sockets re-check at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cloudtask_core::ids::UserId;
use tokio::sync::watch;

type Users = Arc<Mutex<HashMap<UserId, UserSockets>>>;

pub struct SocketRegistry {
    max_per_user: usize,
    users: Users,
}

struct UserSockets {
    open: usize,
    /// Bumped when one of the user's memberships changes on this replica.
    membership: watch::Sender<u64>,
}

/// One open socket of a user; dropping it releases the place.
pub struct SocketSlot {
    users: Users,
    user: UserId,
    pub(super) membership: watch::Receiver<u64>,
}

impl SocketRegistry {
    pub fn new(max_per_user: usize) -> Self {
        SocketRegistry {
            max_per_user,
            users: Arc::default(),
        }
    }

    /// A place for one more socket of `user`, or the limit it would pass.
    pub fn open(&self, user: UserId) -> Result<SocketSlot, usize> {
        let mut users = self.users.lock().expect("socket registry");
        let entry = users.entry(user).or_insert_with(|| UserSockets {
            open: 0,
            membership: watch::channel(0).0,
        });
        if entry.open >= self.max_per_user {
            return Err(self.max_per_user);
        }
        entry.open += 1;
        Ok(SocketSlot {
            users: self.users.clone(),
            user,
            membership: entry.membership.subscribe(),
        })
    }

    /// The user's role, memberships or logins changed: their sockets here check their
    /// session now.
    pub fn account_changed(&self, user: UserId) {
        if let Some(entry) = self.users.lock().expect("socket registry").get(&user) {
            entry.membership.send_modify(|generation| *generation += 1);
        }
    }

    /// Events may have been missed: every socket checks its session now.
    pub fn all_changed(&self) {
        for entry in self.users.lock().expect("socket registry").values() {
            entry.membership.send_modify(|generation| *generation += 1);
        }
    }

    #[cfg(test)]
    fn open_of(&self, user: UserId) -> usize {
        let users = self.users.lock().expect("socket registry");
        users.get(&user).map_or(0, |entry| entry.open)
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut users = self.users.lock().expect("socket registry");
        if let Some(entry) = users.get_mut(&self.user) {
            entry.open -= 1;
            if entry.open == 0 {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_user_and_released_on_drop() {
        let registry = SocketRegistry::new(2);
        let (alice, bob) = (UserId::new(), UserId::new());
        let first = registry.open(alice).unwrap();
        let _second = registry.open(alice).unwrap();
        assert_eq!(registry.open(alice).err(), Some(2), "the third is refused");
        let _bobs = registry
            .open(bob)
            .expect("another user has places of their own");
        drop(first);
        assert_eq!(registry.open_of(alice), 1);
        let _again = registry
            .open(alice)
            .expect("a released place is free again");
    }

    #[test]
    fn a_membership_change_reaches_the_users_sockets() {
        let registry = SocketRegistry::new(2);
        let alice = UserId::new();
        let mut slot = registry.open(alice).unwrap();
        registry.account_changed(UserId::new());
        assert!(!slot.membership.has_changed().unwrap());
        registry.account_changed(alice);
        assert!(slot.membership.has_changed().unwrap());
        slot.membership.mark_unchanged();
        drop(slot);
        assert_eq!(
            registry.open_of(alice),
            0,
            "the entry is gone with its last socket"
        );
    }
}
