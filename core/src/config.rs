//! Configuration: every key with its default, and the checks that hold for every role.
//! The binary loads it (defaults, then a TOML file, then `CLOUDTASK_*` environment
//! variables), validates it once at start-up, and passes it down by value.
//!
//! Every key is flat and snake_case, so `CLOUDTASK_DATABASE_URL` and `database_url` in the
//! file name the same thing; an unknown key is refused (it is a typo).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Postgres URL of the catalogue.
    pub database_url: String,
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Where users reach the console and API; used in links in mails.
    pub public_url: String,
    /// HMAC secret for access tokens (at least 32 bytes). Required by `api`.
    pub jwt_secret: Option<String>,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
    /// ZooKeeper connect string; a chroot suffix (`host:2181/root`) is honoured.
    pub zookeeper: String,
    pub zookeeper_session_timeout_ms: u64,
    /// The platform's ZooKeeper digest credential, `user:password` (scheduler and API):
    /// it owns the tree; workers get identities of their own at join. Unset: the tree is
    /// world-writable (development only). Never give it to a worker.
    pub zookeeper_auth: Option<String>,
    /// PEM file of the CA certificates that `tcp+tls://` ZooKeeper hosts are verified
    /// against.
    pub zookeeper_tls_ca: Option<PathBuf>,
    /// Where the scheduler leader sends mail: `smtp://host:port` (add `?tls=required` for
    /// STARTTLS, or `?tls=opportunistic`), `smtps://host:port` for TLS from the start;
    /// credentials as `smtp://user:password@host`. Unset: no mail is sent (webhooks still are).
    pub smtp_url: Option<String>,
    /// Networks webhooks may reach besides public addresses (comma-separated CIDRs or
    /// addresses, e.g. `10.1.0.0/16`); loopback, private, link-local and metadata
    /// addresses are refused otherwise.
    pub webhook_allow_networks: String,
    /// The From of notification mails.
    pub smtp_from: String,
    /// How long one SMTP conversation may take.
    pub smtp_timeout_secs: u64,
    /// After a mail about a task's failure, further failures of that task within this
    /// window are held and sent together as one digest when it ends.
    pub notify_digest_window_secs: u64,
    /// A queued run (manual, or a retry) that no worker has taken within this long ends
    /// FAILED with reason QUEUE_EXPIRED, and is mailed like a failure (scheduler).
    pub queue_expiry_secs: u64,
    /// Runs created more than this many days ago are deleted with their lines; the
    /// longest a tenant may keep them (0: no horizon). Pruned by the scheduler leader.
    pub retention_run_days: u32,
    /// Runs of a task beyond its newest this many are deleted (0: no cap).
    pub retention_runs_per_task: u32,
    /// The lines of runs created more than this many days ago are deleted, their
    /// outcomes kept (0: no horizon).
    pub retention_log_days: u32,
    /// Audit entries older than this many days are deleted (0: no horizon).
    pub retention_audit_days: u32,
    /// How often the scheduler leader prunes (0: never).
    pub retention_interval_secs: u64,
    /// Rows one pruning statement deletes at most: each is its own short transaction.
    pub retention_batch: u32,
    /// The API a worker talks to.
    pub api_url: String,
    /// The join token a worker presents for its cluster.
    pub cluster_token: Option<String>,
    /// Worker spool; the standalone database and access-token secret. Private to the
    /// server's user (0700), tightened at start.
    pub data_dir: PathBuf,
    /// Where runs work: each worker's package folders and its runs' home, under
    /// `<run_dir>/<cluster id>/<worker name>`. Must be outside `data_dir`. Unset: the
    /// folder `cloudtask-runs` in the system's temporary folder.
    pub run_dir: Option<PathBuf>,
    /// Whom a root worker runs tasks as: a range `first-last` of user ids, of which each
    /// cluster served on this machine gets one of its own (group id the same number),
    /// or one user for all runs of this worker (a name such as `nobody`, or `uid[:gid]`).
    /// A worker that is not root runs tasks as its own user and ignores this.
    pub run_user: String,
    pub worker_name: Option<String>,
    /// A worker's weight on the allocation ring (1 to 64).
    pub worker_capacity: u32,
    /// A worker's labels, comma-separated; tasks may require some.
    pub worker_labels: String,
    /// Standalone bootstrap admin.
    pub admin_email: String,
    pub admin_password: Option<String>,
    /// Largest package archive accepted at upload.
    pub max_package_bytes: u64,
    /// Largest total size of a package's files once unpacked (archive-bomb guard).
    pub max_unpacked_bytes: u64,
    pub max_package_entries: u64,
    /// A connection that has not sent a whole request head within this long (including
    /// the wait for the next request on a kept-alive connection) is closed.
    pub http_header_timeout_secs: u64,
    /// A request body that sends nothing for this long is cut off.
    pub http_body_idle_timeout_secs: u64,
    /// Uploads (multipart requests) received at once per API replica; more are refused
    /// with RATE_LIMITED.
    pub max_uploads_in_flight: usize,
    /// Largest GraphQL request body that is not an upload.
    pub max_request_bytes: u64,
    pub query_max_depth: usize,
    /// What one request (or HTTP batch) may cost: every field costs 1, and a list its
    /// requested size (`first`, `limit`, `count`) times what each item costs.
    pub query_max_complexity: usize,
    /// Largest answer, in bytes of text, one request (or HTTP batch) may produce.
    pub query_max_answer_bytes: usize,
    /// Queries and mutations that cost at least this much (as `query_max_complexity`
    /// counts) are heavy: a caller's heavy operations run one at a time on each replica,
    /// their answers written included; the next waits its turn.
    pub query_heavy_complexity: usize,
    /// Most operations in one HTTP batch.
    pub query_max_batch: usize,
    /// Bounds on a query's text, checked before it is parsed: characters, tokens, and how
    /// deep `{`, `[` and `(` nest (selections and argument values alike).
    pub query_max_chars: usize,
    pub query_max_tokens: usize,
    pub query_max_nesting: usize,
    /// Aliases and directives a query may write.
    pub query_max_aliases: usize,
    pub query_max_directives: usize,
    /// Failed logins a client address may make within the window (past it: RATE_LIMITED);
    /// an account's failures past it slow further logins down (see `api::limits`).
    pub login_max_attempts: u32,
    pub login_window_secs: u64,
    /// The longest a login waits because of its account's recent failures.
    pub login_account_max_delay_secs: u64,
    /// Password hashes and checks (argon2id, ~19 MiB each) running at once; more callers
    /// wait, up to `password_hash_queue`, and past that are answered RATE_LIMITED.
    pub password_hash_concurrency: usize,
    pub password_hash_queue: usize,
    /// Proxies whose `X-Forwarded-For` is believed (comma-separated CIDRs or addresses).
    pub trusted_proxies: String,
    /// A WebSocket that has not sent `connection_init` within this long is closed (4408).
    pub ws_init_timeout_secs: u64,
    /// Operations (subscriptions, queries, mutations) in flight at once on one socket.
    pub ws_max_subscriptions: usize,
    /// Open sockets per user on one API replica.
    pub ws_max_sockets_per_user: usize,
    /// Catalogue connections one user's requests and sockets may hold at once, on one API
    /// replica (of the 20 it keeps).
    pub db_connections_per_user: usize,
    /// Requests (HTTP requests and operations started on sockets) a signed-in user may
    /// make per minute, and an anonymous client address; see `api::budget`.
    pub rate_requests_per_minute: u64,
    pub rate_anonymous_requests_per_minute: u64,
    /// Query cost (complexity, as `query_max_complexity` counts it) a caller may spend per
    /// minute.
    pub rate_cost_per_minute: u64,
    /// Most log lines kept per run; past it, one SYSTEM line says how many were dropped.
    pub run_max_log_lines: u64,
    /// Longer output lines are split at this many bytes (at most
    /// [`crate::protocol::MAX_LINE_BYTES`], so that a line always fits a report).
    pub run_max_line_bytes: u64,
    /// Most bytes of output kept per run; past it (or past `run_max_log_lines`), one
    /// SYSTEM line says how much was dropped and the run is FAILED.
    pub run_max_output_bytes: u64,
    /// After SIGTERM (timeout, stop, shutdown), how long a run's process group has before
    /// SIGKILL.
    pub run_kill_grace_secs: u64,
    /// How a worker holds every process of a run: `auto` (cgroup v1 controllers, else
    /// cgroup v2, else the process tree), `cgroup-v1`, `cgroup-v2`, `process-tree`.
    pub containment: String,
    /// `text` or `json`.
    pub log_format: String,
    /// A tracing filter such as `info` or `cloudtask_api=debug,info`.
    pub log_level: String,
}

/// The values of `containment`.
pub const CONTAINMENTS: [&str; 4] = ["auto", "cgroup-v1", "cgroup-v2", "process-tree"];

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/cloudtask".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: "http://127.0.0.1:8080".into(),
            jwt_secret: None,
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            zookeeper: "127.0.0.1:2181/cloudtask".into(),
            zookeeper_session_timeout_ms: 10_000,
            zookeeper_auth: None,
            zookeeper_tls_ca: None,
            smtp_url: None,
            webhook_allow_networks: String::new(),
            smtp_from: "CloudTask <cloudtask@localhost>".into(),
            smtp_timeout_secs: 30,
            notify_digest_window_secs: 60,
            queue_expiry_secs: 300,
            retention_run_days: 90,
            retention_runs_per_task: 10_000,
            retention_log_days: 30,
            retention_audit_days: 365,
            retention_interval_secs: 300,
            retention_batch: 1_000,
            api_url: "http://127.0.0.1:8080".into(),
            cluster_token: None,
            data_dir: PathBuf::from("./cloudtask-data"),
            run_dir: None,
            run_user: DEFAULT_RUN_USERS.into(),
            worker_name: None,
            worker_capacity: 1,
            worker_labels: String::new(),
            admin_email: "admin@localhost".into(),
            admin_password: None,
            max_package_bytes: 64 << 20,
            max_unpacked_bytes: 512 << 20,
            max_package_entries: 10_000,
            http_header_timeout_secs: 10,
            http_body_idle_timeout_secs: 30,
            max_uploads_in_flight: 4,
            max_request_bytes: 1 << 20,
            query_max_depth: 12,
            query_max_complexity: 1_000_000,
            query_max_answer_bytes: 16 << 20,
            query_heavy_complexity: 10_000,
            query_max_batch: 10,
            query_max_chars: 20_000,
            query_max_tokens: 2_000,
            query_max_nesting: 32,
            query_max_aliases: 50,
            query_max_directives: 50,
            login_max_attempts: 5,
            login_window_secs: 300,
            login_account_max_delay_secs: 10,
            password_hash_concurrency: 2,
            password_hash_queue: 32,
            trusted_proxies: String::new(),
            ws_init_timeout_secs: 10,
            ws_max_subscriptions: 100,
            ws_max_sockets_per_user: 20,
            db_connections_per_user: 4,
            rate_requests_per_minute: 3_000,
            rate_anonymous_requests_per_minute: 300,
            rate_cost_per_minute: 20_000_000,
            run_max_log_lines: 100_000,
            run_max_line_bytes: 16 << 10,
            run_max_output_bytes: 64 << 20,
            run_kill_grace_secs: 10,
            containment: "auto".into(),
            log_format: "text".into(),
            log_level: "info,sqlx=warn".into(),
        }
    }
}

/// The default `run_user`: a range of user ids far from those of people and of systemd's
/// dynamic users (61184-65519), one per cluster.
pub const DEFAULT_RUN_USERS: &str = "1700000000-1700099999";

/// A parsed `run_user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunUser {
    /// One id of the range per cluster.
    Range { first: u32, last: u32 },
    /// A numeric user id, and group id if given.
    Id { uid: u32, gid: Option<u32> },
    /// A user name, looked up on the worker's machine.
    Name(String),
}

impl RunUser {
    pub fn parse(text: &str) -> Result<RunUser, String> {
        let text = text.trim();
        let number = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("{t:?} is not a user id"))
        };
        if let Some((first, last)) = text.split_once('-')
            && first.trim().chars().all(|c| c.is_ascii_digit())
        {
            let (first, last) = (number(first)?, number(last)?);
            if first == 0 || first > last {
                return Err("a range must be `first-last` with 0 < first <= last".into());
            }
            return Ok(RunUser::Range { first, last });
        }
        if text.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let (uid, gid) = match text.split_once(':') {
                Some((uid, gid)) => (number(uid)?, Some(number(gid)?)),
                None => (number(text)?, None),
            };
            if uid == 0 || gid == Some(0) {
                return Err("tasks never run as root (id 0)".into());
            }
            return Ok(RunUser::Id { uid, gid });
        }
        let valid = !text.is_empty()
            && text.len() <= 32
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid || text == "root" {
            return Err(format!(
                "{text:?}: use a range `first-last`, a user id `uid[:gid]` or a user name (not root)"
            ));
        }
        Ok(RunUser::Name(text.to_owned()))
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("configuration key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// The networks webhooks may reach (validated at start-up).
    pub fn outbound_policy(&self) -> crate::net::OutboundPolicy {
        crate::net::OutboundPolicy::parse(&self.webhook_allow_networks).unwrap_or_default()
    }

    /// Checks that hold for every role; role-specific ones (a JWT secret for the API, a
    /// cluster token for a worker) are in `require_*`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_endpoints()?;
        for (key, value) in [
            ("access_token_ttl_secs", self.access_token_ttl_secs),
            ("refresh_token_ttl_secs", self.refresh_token_ttl_secs),
            ("max_package_bytes", self.max_package_bytes),
            ("max_unpacked_bytes", self.max_unpacked_bytes),
            ("max_package_entries", self.max_package_entries),
            ("max_request_bytes", self.max_request_bytes),
            ("http_header_timeout_secs", self.http_header_timeout_secs),
            (
                "http_body_idle_timeout_secs",
                self.http_body_idle_timeout_secs,
            ),
            ("login_window_secs", self.login_window_secs),
            ("ws_init_timeout_secs", self.ws_init_timeout_secs),
            ("run_max_log_lines", self.run_max_log_lines),
            ("run_max_line_bytes", self.run_max_line_bytes),
            ("run_max_output_bytes", self.run_max_output_bytes),
            ("smtp_timeout_secs", self.smtp_timeout_secs),
            ("queue_expiry_secs", self.queue_expiry_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        self.validate_worker()?;
        if self.login_max_attempts == 0 {
            return Err(ConfigError::new(
                "login_max_attempts",
                "must be greater than 0",
            ));
        }
        for (key, value) in [
            ("query_max_depth", self.query_max_depth),
            ("query_max_complexity", self.query_max_complexity),
            ("query_max_answer_bytes", self.query_max_answer_bytes),
            ("query_heavy_complexity", self.query_heavy_complexity),
            ("query_max_batch", self.query_max_batch),
            ("max_uploads_in_flight", self.max_uploads_in_flight),
            ("query_max_chars", self.query_max_chars),
            ("query_max_tokens", self.query_max_tokens),
            ("query_max_nesting", self.query_max_nesting),
            ("query_max_aliases", self.query_max_aliases),
            ("query_max_directives", self.query_max_directives),
            ("password_hash_concurrency", self.password_hash_concurrency),
            ("ws_max_subscriptions", self.ws_max_subscriptions),
            ("ws_max_sockets_per_user", self.ws_max_sockets_per_user),
            ("db_connections_per_user", self.db_connections_per_user),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        for (key, value) in [
            ("rate_requests_per_minute", self.rate_requests_per_minute),
            (
                "rate_anonymous_requests_per_minute",
                self.rate_anonymous_requests_per_minute,
            ),
            ("rate_cost_per_minute", self.rate_cost_per_minute),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::new("log_format", "must be `text` or `json`"));
        }
        if let Some(secret) = &self.jwt_secret
            && secret.len() < 32
        {
            return Err(ConfigError::new("jwt_secret", "must be at least 32 bytes"));
        }
        Ok(())
    }

    /// Where the catalogue, the API, mail and ZooKeeper are.
    fn validate_endpoints(&self) -> Result<(), ConfigError> {
        let scheme_ok = |url: &str, schemes: &[&str]| schemes.iter().any(|s| url.starts_with(s));
        if !scheme_ok(
            &self.database_url,
            &["postgres://", "postgresql://", "sqlite:"],
        ) {
            return Err(ConfigError::new(
                "database_url",
                "must be a postgres:// or sqlite: URL",
            ));
        }
        for (key, url) in [("public_url", &self.public_url), ("api_url", &self.api_url)] {
            if !scheme_ok(url, &["http://", "https://"]) {
                return Err(ConfigError::new(key, "must be an http:// or https:// URL"));
            }
        }
        if let Some(smtp) = &self.smtp_url
            && !scheme_ok(smtp, &["smtp://", "smtps://"])
        {
            return Err(ConfigError::new(
                "smtp_url",
                "must be an smtp:// or smtps:// URL",
            ));
        }
        if let Err(message) = crate::net::OutboundPolicy::parse(&self.webhook_allow_networks) {
            return Err(ConfigError::new("webhook_allow_networks", message));
        }
        if let Err(message) = crate::net::parse_networks(&self.trusted_proxies) {
            return Err(ConfigError::new("trusted_proxies", message));
        }
        if self.zookeeper.trim().is_empty() {
            return Err(ConfigError::new("zookeeper", "must not be empty"));
        }
        if let Some(auth) = &self.zookeeper_auth
            && !auth
                .split_once(':')
                .is_some_and(|(user, password)| !user.is_empty() && !password.is_empty())
        {
            return Err(ConfigError::new(
                "zookeeper_auth",
                "must be `user:password` (a ZooKeeper digest credential)",
            ));
        }
        if self.zookeeper_tls_ca.is_none()
            && self
                .zookeeper
                .split(',')
                .any(|host| host.trim().starts_with("tcp+tls://"))
        {
            return Err(ConfigError::new(
                "zookeeper_tls_ca",
                "is required when a ZooKeeper host is tcp+tls:// (a PEM file of the CA that \
                 signed the servers' certificates)",
            ));
        }
        for (key, days) in [
            ("retention_run_days", self.retention_run_days),
            ("retention_log_days", self.retention_log_days),
            ("retention_audit_days", self.retention_audit_days),
        ] {
            if days > crate::retention::MAX_DAYS {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "must be at most {} (0: no horizon)",
                        crate::retention::MAX_DAYS
                    ),
                ));
            }
        }
        if !(1..=100_000).contains(&self.retention_batch) {
            return Err(ConfigError::new(
                "retention_batch",
                "must be between 1 and 100000",
            ));
        }
        if !(1_000..=600_000).contains(&self.zookeeper_session_timeout_ms) {
            return Err(ConfigError::new(
                "zookeeper_session_timeout_ms",
                "must be between 1000 and 600000",
            ));
        }
        Ok(())
    }

    /// A worker's own keys.
    fn validate_worker(&self) -> Result<(), ConfigError> {
        RunUser::parse(&self.run_user).map_err(|message| ConfigError::new("run_user", message))?;
        if let Some(run_dir) = &self.run_dir
            && (run_dir.as_os_str().is_empty() || run_dir.starts_with(&self.data_dir))
        {
            return Err(ConfigError::new(
                "run_dir",
                "must be set to a folder outside data_dir",
            ));
        }
        if self.run_max_line_bytes > crate::protocol::MAX_LINE_BYTES as u64 {
            return Err(ConfigError::new(
                "run_max_line_bytes",
                format!("must be at most {}", crate::protocol::MAX_LINE_BYTES),
            ));
        }
        if !(1..=64).contains(&self.worker_capacity) {
            return Err(ConfigError::new(
                "worker_capacity",
                "must be between 1 and 64",
            ));
        }
        if let Some(name) = &self.worker_name
            && !crate::ids::WorkerId::is_valid(name)
        {
            return Err(ConfigError::new(
                "worker_name",
                "use letters, digits, '-', '_' or '.'",
            ));
        }
        if !CONTAINMENTS.contains(&self.containment.as_str()) {
            return Err(ConfigError::new(
                "containment",
                format!("must be one of {}", CONTAINMENTS.join(", ")),
            ));
        }
        if let Some(label) = self
            .worker_label_set()
            .iter()
            .find(|l| !crate::task::valid_label(l))
        {
            return Err(ConfigError::new(
                "worker_labels",
                format!("bad label {label:?}: {}", crate::task::LABEL_RULE),
            ));
        }
        Ok(())
    }

    /// The platform's retention horizons.
    pub fn retention(&self) -> crate::retention::Retention {
        crate::retention::Retention::from_config(
            self.retention_run_days,
            self.retention_runs_per_task,
            self.retention_log_days,
            self.retention_audit_days,
        )
    }

    /// Where runs work (`run_dir`, or its default).
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("cloudtask-runs"))
    }

    /// `worker_labels` as a set.
    pub fn worker_label_set(&self) -> std::collections::BTreeSet<String> {
        self.worker_labels
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// The API signs tokens: it needs a secret.
    pub fn require_jwt_secret(&self) -> Result<&str, ConfigError> {
        self.jwt_secret
            .as_deref()
            .ok_or_else(|| ConfigError::new("jwt_secret", "is required (CLOUDTASK_JWT_SECRET)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_users_parse_and_root_is_refused() {
        assert_eq!(
            RunUser::parse(DEFAULT_RUN_USERS),
            Ok(RunUser::Range {
                first: 1_700_000_000,
                last: 1_700_099_999
            })
        );
        assert_eq!(
            RunUser::parse("1234:99"),
            Ok(RunUser::Id {
                uid: 1234,
                gid: Some(99)
            })
        );
        assert_eq!(RunUser::parse("nobody"), Ok(RunUser::Name("nobody".into())));
        for bad in ["root", "0", "5:0", "0-10", "10-5", "", "a b", "x-y-z/"] {
            assert!(RunUser::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_run_dir_inside_the_data_dir_is_refused() {
        let config = Config {
            run_dir: Some(PathBuf::from("./cloudtask-data/runs")),
            ..Config::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "run_dir");
    }

    #[test]
    fn a_tls_zookeeper_host_needs_the_ca() {
        let tls = Config {
            zookeeper: "tcp://zk1:2181,tcp+tls://zk2:2281/cloudtask".into(),
            ..Config::default()
        };
        let refused = tls.validate().unwrap_err();
        assert_eq!(refused.key, "zookeeper_tls_ca");
        assert!(
            refused.message.contains("tcp+tls://"),
            "{}",
            refused.message
        );
        let with_ca = Config {
            zookeeper_tls_ca: Some(PathBuf::from("zookeeper-ca.pem")),
            ..tls
        };
        assert!(with_ca.validate().is_ok());
    }
}
