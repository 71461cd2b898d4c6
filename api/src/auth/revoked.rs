//! Logins revoked while their access tokens are still valid. An access token is a signed
//! claim checked without the database; once its login (refresh-token family) is revoked —
//! a logout, a refresh token replayed — every request and socket of that token is refused
//! here, on every replica, until the token would have expired anyway.
//!
//! Each replica keeps the revoked logins of the last access-token lifetime in memory: the
//! replica that revokes learns it before it answers, the others when they hear the user's
//! account event (`sockets::follow_accounts`), and all of them reload the whole list after
//! missed events and at start. A request pays a map look-up, not a round trip.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use cloudtask_catalogue::Catalogue;
use cloudtask_core::Result;
use cloudtask_core::ids::UserId;
use uuid::Uuid;

pub struct RevokedLogins {
    /// Login → when every access token of it has expired (then it is forgotten).
    revoked: Mutex<HashMap<Uuid, DateTime<Utc>>>,
    access_ttl: Duration,
}

impl RevokedLogins {
    pub fn new(access_ttl: Duration) -> Self {
        RevokedLogins {
            revoked: Mutex::new(HashMap::new()),
            access_ttl,
        }
    }

    pub fn is_revoked(&self, login: Uuid) -> bool {
        self.revoked
            .lock()
            .expect("revoked logins")
            .contains_key(&login)
    }

    /// Reads the logins revoked within an access token's lifetime, of `user` (after their
    /// account event) or of everyone (at start, after missed events).
    pub async fn learn(&self, catalogue: &Catalogue, user: Option<UserId>) -> Result<()> {
        let now = Utc::now();
        let logins = catalogue
            .logins_revoked_since(now - self.access_ttl, user)
            .await?;
        self.remember(logins, now);
        Ok(())
    }

    /// Remembers logins revoked at `at` (or later), forgetting those whose tokens are all
    /// expired.
    fn remember(&self, logins: impl IntoIterator<Item = Uuid>, at: DateTime<Utc>) {
        let until = at + self.access_ttl;
        let mut revoked = self.revoked.lock().expect("revoked logins");
        revoked.retain(|_, expires| *expires > at);
        for login in logins {
            let expires = revoked.entry(login).or_insert(until);
            *expires = (*expires).max(until);
        }
    }

    /// A login revoked by this replica, refused here before the revocation is answered.
    pub fn revoked_here(&self, login: Uuid) {
        self.remember([login], Utc::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_login_is_forgotten_once_its_tokens_have_expired() {
        let revoked = RevokedLogins::new(Duration::seconds(900));
        let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
        let start = Utc::now();
        revoked.remember([old], start);
        assert!(revoked.is_revoked(old));
        assert!(!revoked.is_revoked(new));
        // Learning it again later keeps it for a whole lifetime from then.
        revoked.remember([old], start + Duration::seconds(600));
        revoked.remember([new], start + Duration::seconds(1000));
        assert!(revoked.is_revoked(old), "kept until 1,500 s");
        revoked.remember([], start + Duration::seconds(1501));
        assert!(!revoked.is_revoked(old));
        assert!(revoked.is_revoked(new));
    }
}
