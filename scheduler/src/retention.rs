//! Retention, enforced while this replica leads: a pruning pass over every tenant at the
//! start of each term and then every `retention_interval_secs` (see
//! `Catalogue::prune`, which deletes in small batches of short transactions).

use std::time::Duration;

use cloudtask_catalogue::Catalogue;
use cloudtask_core::config::Config;
use cloudtask_core::retention::Retention;
use tokio_util::sync::CancellationToken;

/// How this replica prunes when it leads.
#[derive(Debug, Clone)]
pub struct Pruning {
    /// The platform's horizons; each tenant's own stay within them.
    pub platform: Retention,
    pub every: Duration,
    /// Rows one statement deletes at most.
    pub batch: u32,
}

impl Pruning {
    /// From `retention_*`; none when `retention_interval_secs` is 0.
    pub fn from_config(config: &Config) -> Option<Pruning> {
        (config.retention_interval_secs > 0).then(|| Pruning {
            platform: config.retention(),
            every: Duration::from_secs(config.retention_interval_secs),
            batch: config.retention_batch,
        })
    }

    /// Prunes now and every `every` until `term` ends.
    pub async fn run(self, catalogue: Catalogue, term: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pass = catalogue.prune(&self.platform, self.batch, chrono::Utc::now());
            tokio::select! {
                _ = term.cancelled() => return,
                done = pass => match done {
                    Ok(tenants) => tracing::debug!(tenants = tenants.len(), "pruning pass done"),
                    Err(e) => tracing::warn!(error = %e, "pruning pass failed; next at its time"),
                },
            }
        }
    }
}
