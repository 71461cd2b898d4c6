//! The CloudTask worker (`cloudtask worker`): joins one cluster through the API, registers
//! in ZooKeeper, and follows the tasks the scheduler assigns to it. It talks to ZooKeeper
//! and the API only, never to the database.
//!
//! Joining ([`join`]) and membership ([`Membership`]) publish the assigned tasks; the
//! [`firing`] engine fires them, [`exec`] runs them, and [`report`] ships logs and outcomes,
//! spooling to disk what the API cannot take now.

mod backoff;
pub mod claims;
pub mod client;
pub mod clock;
pub mod exec;
pub mod firing;
pub mod join;
pub mod membership;
pub mod packages;
pub mod private;
pub mod report;

use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout::WorkerNode;
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_coord::{Access, Coordinator, Credential};
use cloudtask_core::archive;
use cloudtask_core::config::Config;
use cloudtask_core::ids::WorkerId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use client::ApiClient;
pub use exec::ExecLimits;
pub use firing::Engine;
pub use join::{JoinError, JoinedCluster, join};
pub use membership::{Assignments, Membership, MembershipStatus, run_membership};
pub use packages::Packages;

/// The longest hurried grace (SIGTERM to SIGKILL of a run stopped because the worker
/// fenced itself off or lost its session), whatever the session timeout: out quickly,
/// also when the server granted a shorter timeout than was asked for.
const HURRIED_GRACE_CAP: Duration = Duration::from_secs(2);

/// The `cloudtask worker` entry point: runs until `shutdown`, then leaves the cluster.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_clock(config, Arc::new(clock::SystemClock), shutdown).await
}

/// [`run`], firing by `clock` (tests drive a manual one through DST changes).
pub async fn run_with_clock(
    config: &Config,
    clock: Arc<dyn clock::Clock>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coordinator = Arc::new(ZkCoordinator::from_config(config)?);
    run_on(config, coordinator, clock, shutdown).await
}

/// [`run`] on a given coordination service (the in-memory one in standalone mode), reached
/// with the identity the join hands out.
pub async fn run_on(
    config: &Config,
    coordinator: Arc<dyn Coordinator>,
    clock: Arc<dyn clock::Clock>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    exec::raise_open_files_limit();
    private::seal_process();
    let (token, hostname, name) = identity(config)?;
    // The spool holds run output and outcomes: the worker's user's alone.
    private::private_dir(&config.data_dir)?;
    private::private_dir(&config.data_dir.join("spool"))?;
    private::private_file(&config.data_dir.join("spool").join("reports.jsonl"))?;
    // Before anything runs: clears what a crashed predecessor left, and says how runs
    // are held (logged, and in the worker's facts).
    let mode =
        exec::ContainmentMode::parse(&config.containment).unwrap_or(exec::ContainmentMode::Auto);
    let containment = exec::Containment::detect(mode, &config.data_dir);
    let joined = match join(&config.api_url, token, &shutdown).await {
        Ok(joined) => joined,
        Err(JoinError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(cluster = %joined.cluster_id, tenant = %joined.tenant_id, worker = %name,
        "joined the cluster");
    let coordinator = with_cluster_identity(coordinator, &joined)?;
    let area = exec::identity::prepare(config, &joined.cluster_id.to_string(), name.as_ref())?;
    tracing::info!(run_dir = %area.dir.display(), run_user = ?area.identity.user,
        sealed = ?private::sealed(),
        "runs work in their own folders, as this user (none: the worker's own)");
    let me = WorkerNode {
        name,
        hostname,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        capacity: config.worker_capacity,
        labels: config.worker_label_set(),
        started_at: chrono::Utc::now(),
        containment: containment.describe(),
    };
    let session_timeout = Duration::from_millis(config.zookeeper_session_timeout_ms);
    let (assignments, published) = watch::channel(Assignments::default());

    // Runs stop before the membership leaves, and the reporter outlives both: a clean
    // shutdown stops the processes, reports them STOPPED, then leaves the cluster.
    let engine_stop = CancellationToken::new();
    let reporter_stop = CancellationToken::new();
    let client = Arc::new(ApiClient::new(
        &config.api_url,
        token,
        joined.credential.clone(),
        reporter_stop.clone(),
    ));
    let (reporter, reporter_task) = report::spawn(
        client.clone(),
        config.data_dir.join("spool"),
        reporter_stop.clone(),
    );
    let packages = Arc::new(Packages::new(&area, package_limits(config), client.clone()));
    let engine = Engine {
        clock,
        cluster: joined.cluster_id,
        worker: me.name.clone(),
        coordinator: coordinator.clone(),
        client,
        reporter,
        packages,
        limits: exec_limits(config, session_timeout, containment.clone()),
    };
    let (commands, delivered) = tokio::sync::mpsc::unbounded_channel();
    let engine_task = tokio::spawn(engine.run(published, delivered, engine_stop.clone()));
    let membership_stop = CancellationToken::new();
    let mut membership = tokio::spawn(
        Membership::new(coordinator, joined.cluster_id, me)
            .deliver_commands(commands)
            .previous_incarnation_wait(session_timeout * 2)
            // Cut off: noticed by 9/20 of the timeout after the last contact, fenced a
            // fifth later, SIGKILL a fifth after that at the latest (the hurried
            // grace): all gone by 0.85 of the timeout, before the server can expire
            // the session.
            .fence_after(session_timeout / 5)
            .run(assignments, membership_stop.clone()),
    );
    // Membership ends early only when starting over cannot help (a name held by a live
    // worker, an identity the tree no longer admits): the worker stops with its error.
    let ended_early = tokio::select! {
        _ = shutdown.cancelled() => None,
        ended = &mut membership => Some(ended),
    };
    engine_stop.cancel();
    engine_task.await.ok();
    membership_stop.cancel();
    let ended = match ended_early {
        Some(ended) => ended,
        None => membership.await,
    };
    let result = ended.unwrap_or_else(|e| Err(anyhow::anyhow!("membership task failed: {e}")));
    reporter_stop.cancel();
    reporter_task.await.ok();
    containment.close();
    result
}

/// The coordination service reached as the cluster's workers' identity, when the join
/// handed one out (the tree has ACLs); as it is otherwise (an open tree).
fn with_cluster_identity(
    coordinator: Arc<dyn Coordinator>,
    joined: &JoinedCluster,
) -> anyhow::Result<Arc<dyn Coordinator>> {
    let Some(identity) = &joined.zookeeper else {
        return Ok(coordinator);
    };
    let credential = Credential::new(&identity.user, &identity.password)?;
    Ok(coordinator.with_access(Access::cluster_worker(
        credential,
        joined.cluster_id,
        &identity.owner_id,
    )))
}

/// The limits a package is unpacked within: the same as at upload.
fn package_limits(config: &Config) -> archive::Limits {
    archive::Limits {
        max_archive_bytes: config.max_package_bytes,
        max_unpacked_bytes: config.max_unpacked_bytes,
        max_entries: config.max_package_entries,
    }
}

/// The cluster's join token, the machine's name and the worker's, checked.
fn identity(config: &Config) -> anyhow::Result<(&str, String, WorkerId)> {
    let token = config
        .cluster_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "a worker needs its cluster's join token: set CLOUDTASK_CLUSTER_TOKEN \
                 (or `cluster_token` in the configuration file)"
            )
        })?;
    let hostname = hostname();
    let name = match &config.worker_name {
        Some(name) => name.clone(),
        None => worker_name_from_hostname(&hostname),
    };
    let name: WorkerId = name.parse().map_err(|_| {
        anyhow::anyhow!(
            "worker name {name:?} cannot be used: use 1 to 128 letters, digits, '-', '_' or '.' \
             (CLOUDTASK_WORKER_NAME)"
        )
    })?;
    Ok((token, hostname, name))
}

/// Per-run limits from the configuration; the hurried grace follows the session timeout.
fn exec_limits(
    config: &Config,
    session_timeout: Duration,
    containment: exec::Containment,
) -> ExecLimits {
    ExecLimits {
        max_lines: config.run_max_log_lines,
        max_output_bytes: config.run_max_output_bytes,
        max_line_bytes: config.run_max_line_bytes as usize,
        kill_grace: Duration::from_secs(config.run_kill_grace_secs),
        hurried_grace: (session_timeout / 5).min(HURRIED_GRACE_CAP),
        containment,
    }
}

/// The machine's name, as the kernel knows it.
fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .chain(
            ["HOSTNAME", "COMPUTERNAME"]
                .iter()
                .filter_map(|v| std::env::var(v).ok()),
        )
        .map(|name| name.trim().to_owned())
        .find(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A worker name from a hostname: the name becomes a znode path segment, so anything
/// outside `[A-Za-z0-9._-]` becomes `-`.
fn worker_name_from_hostname(hostname: &str) -> String {
    let name: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() || name == "." || name == ".." {
        "worker".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_become_valid_worker_names() {
        for (hostname, expected) in [
            ("node-1.example.com", "node-1.example.com"),
            ("Bad Host/ü", "Bad-Host--"),
            ("", "worker"),
            ("..", "worker"),
        ] {
            let name = worker_name_from_hostname(hostname);
            assert_eq!(name, expected);
            assert!(WorkerId::is_valid(&name));
        }
        assert_eq!(worker_name_from_hostname(&"x".repeat(300)).len(), 128);
        assert!(WorkerId::is_valid(&worker_name_from_hostname(&hostname())));
    }

    #[tokio::test]
    async fn a_missing_cluster_token_is_named() {
        let config = Config::default();
        let err = run(&config, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("CLOUDTASK_CLUSTER_TOKEN"), "{err}");
    }
}
