//! Passwords: argon2id hashes, the rule for new passwords, and a bound on the hashing the
//! API does at once. Each hash or check holds ~19 MiB for its duration, so at most
//! `password_hash_concurrency` run together, `password_hash_queue` more callers wait, and
//! the rest are answered RATE_LIMITED: memory has a ceiling whatever clients send.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use cloudtask_core::{Error, Result};
use tokio::sync::Semaphore;

/// zxcvbn's scores: 3 is "safely unguessable" (about 10^10 guesses) and up.
const MIN_SCORE: u8 = 3;
const MIN_CHARS: usize = 8;
const MAX_BYTES: usize = 1024;

/// argon2id with the crate's defaults (19 MiB, 2 passes), salt generated per hash.
pub fn hash_password(password: &str) -> Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("hashing a password: {e}")))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), hash)
        .is_ok()
}

/// Does the work of one password check against a fixed hash, for logins of unknown
/// accounts: their answer takes as long as a wrong password's.
fn burn_password_check(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = DUMMY.get_or_init(|| hash_password("dummy password").unwrap_or_default());
    let _ = verify_password(password, hash);
}

/// Checks a new password for the account `email`: 8 characters or more, and not easy to
/// guess (zxcvbn score 3 or more, judged with the email as a known word). The message
/// says why, with zxcvbn's advice.
pub fn validate_password(field: &str, password: &str, email: &str) -> Result<()> {
    if password.chars().count() < MIN_CHARS {
        return Err(Error::bad_input(
            field,
            format!("must be at least {MIN_CHARS} characters"),
        ));
    }
    if password.len() > MAX_BYTES {
        return Err(Error::bad_input(
            field,
            format!("must be at most {MAX_BYTES} bytes"),
        ));
    }
    let email = email.trim();
    if password.trim().eq_ignore_ascii_case(email) {
        return Err(Error::bad_input(field, "must not be the email address"));
    }
    let name = email.split('@').next().unwrap_or_default();
    let estimate = zxcvbn::zxcvbn(password, &[email, name]);
    if u8::from(estimate.score()) < MIN_SCORE {
        let advice = estimate
            .feedback()
            .map(|f| f.to_string())
            .filter(|f| !f.is_empty())
            .unwrap_or_else(|| "Add another word or two. Uncommon words are better.".into());
        return Err(Error::bad_input(
            field,
            format!("is too easy to guess. {advice}"),
        ));
    }
    Ok(())
}

/// The API's password hashing, bounded (see the module doc).
#[derive(Debug)]
pub struct PasswordHashing {
    /// Callers admitted: running plus waiting.
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
}

impl PasswordHashing {
    pub fn new(concurrency: usize, queue: usize) -> Self {
        PasswordHashing {
            admitted: Arc::new(Semaphore::new(concurrency.saturating_add(queue))),
            running: Arc::new(Semaphore::new(concurrency)),
        }
    }

    /// Runs `work` on the blocking pool once a slot is free; RATE_LIMITED when the queue
    /// is full. The permits go with the work, so a caller that gives up (a dropped
    /// request) still holds its slot until the hashing really ends.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let admitted =
            self.admitted
                .clone()
                .try_acquire_owned()
                .map_err(|_| Error::RateLimited {
                    retry_after_secs: 1,
                })?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(Error::internal)?;
        tokio::task::spawn_blocking(move || {
            let _permits = (admitted, running);
            work()
        })
        .await
        .map_err(Error::internal)
    }

    /// Checks a new password for the account `email` (see [`validate_password`]) and
    /// hashes it; `field` names the input in a refusal.
    pub async fn hash_new(&self, field: &str, password: String, email: &str) -> Result<String> {
        validate_password(field, &password, email)?;
        self.run(move || hash_password(&password)).await?
    }

    /// Whether `password` matches `hash`; without a hash (an unknown account), the same
    /// work is done and the answer is no, so timing does not tell which accounts exist.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool> {
        self.run(move || match hash {
            Some(hash) => verify_password(&password, &hash),
            None => {
                burn_password_check(&password);
                false
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
    }

    #[test]
    fn common_trivial_and_personal_passwords_are_refused() {
        let email = "ada@example.com";
        for weak in [
            "password",
            "12345678",
            "        ",
            "qwertyuiop",
            "ada@example.com",
            "ADA@example.com",
            "ada12345",
            "short",
        ] {
            let refused = validate_password("password", weak, email);
            assert!(
                matches!(&refused, Err(Error::BadInput { field, .. }) if field == "password"),
                "{weak:?}: {refused:?}"
            );
        }
        let Err(Error::BadInput { message, .. }) = validate_password("p", "password", email) else {
            panic!("refused")
        };
        assert!(message.contains("common password"), "{message}");
        // Judged on its first 100 characters, so a long one costs no more.
        let long = format!("correct horse battery {}", "x".repeat(1000 - 22));
        for strong in ["correct horse battery", "Tr0ub4dor&3x", &long] {
            assert!(
                validate_password("password", strong, email).is_ok(),
                "{strong:?}"
            );
        }
    }

    #[tokio::test]
    async fn hashing_past_the_queue_is_rate_limited() {
        let hashing = Arc::new(PasswordHashing::new(1, 1));
        let start = |work: Box<dyn FnOnce() -> bool + Send>| {
            let hashing = hashing.clone();
            tokio::spawn(async move { hashing.run(work).await })
        };
        let (release, held) = std::sync::mpsc::channel::<()>();
        let running = start(Box::new(move || held.recv().is_ok()));
        while hashing.running.available_permits() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let waiting = start(Box::new(|| true));
        while hashing.admitted.available_permits() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let refused = hashing.run(|| ()).await;
        assert!(
            matches!(refused, Err(Error::RateLimited { .. })),
            "{refused:?}"
        );
        release.send(()).unwrap();
        assert!(running.await.unwrap().unwrap());
        assert!(waiting.await.unwrap().unwrap());
    }
}
