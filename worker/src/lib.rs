//! The CloudTask worker (`cloudtask worker`): joins one cluster through the API, registers
//! in ZooKeeper, and follows the tasks the scheduler assigns to it. It talks to ZooKeeper
//! and the API only, never to the database.
//!
//! So far: joining ([`join`]) and membership ([`Membership`]); timers and execution
//! consume the published [`Assignments`] later.

mod backoff;
pub mod join;
pub mod membership;

use std::sync::Arc;
use std::time::Duration;

use cloudtask_coord::layout::{self, WorkerNode};
use cloudtask_coord::zk::ZkCoordinator;
use cloudtask_core::config::Config;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use join::{JoinError, JoinedCluster, join};
pub use membership::{Assignments, Membership, MembershipStatus, run_membership};

/// The `cloudtask worker` entry point: runs until `shutdown`, then leaves the cluster.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    anyhow::ensure!(
        layout::valid_worker_name(&name),
        "worker name {name:?} cannot be used: use 1 to 128 letters, digits, '-', '_' or '.' \
         (CLOUDTASK_WORKER_NAME)"
    );
    let joined = match join(&config.api_url, token, &shutdown).await {
        Ok(joined) => joined,
        Err(JoinError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(cluster = %joined.cluster_id, tenant = %joined.tenant_id, worker = %name,
        "joined the cluster");
    let me = WorkerNode {
        name,
        hostname,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        capacity: config.worker_capacity,
        labels: config.worker_label_set(),
        started_at: chrono::Utc::now(),
    };
    let session_timeout = Duration::from_millis(config.zookeeper_session_timeout_ms);
    let coordinator = Arc::new(ZkCoordinator::new(&config.zookeeper, session_timeout));
    let (assignments, mut published) = watch::channel(Assignments::default());
    // Until the timers exist, the assignments are only logged.
    let logger = tokio::spawn(async move {
        while published.changed().await.is_ok() {
            let current = published.borrow_and_update().clone();
            tracing::info!(
                epoch = current.epoch,
                tasks = current.tasks.len(),
                "assignments changed"
            );
            tracing::debug!(tasks = ?current.tasks, "assigned tasks");
        }
    });
    let result = Membership::new(coordinator, joined.cluster_id, me)
        .previous_incarnation_wait(session_timeout * 2)
        .run(assignments, shutdown)
        .await;
    logger.await.ok();
    result
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
            assert!(layout::valid_worker_name(&name));
        }
        assert_eq!(worker_name_from_hostname(&"x".repeat(300)).len(), 128);
        assert!(layout::valid_worker_name(&worker_name_from_hostname(
            &hostname()
        )));
    }

    #[tokio::test]
    async fn a_missing_cluster_token_is_named() {
        let config = Config::default();
        let err = run(&config, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("CLOUDTASK_CLUSTER_TOKEN"), "{err}");
    }
}
