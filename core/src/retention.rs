//! How long a tenant's history is kept: runs, their log lines, audit entries. The platform
//! sets the longest horizons (its configuration); a tenant may keep less, never more.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Horizons of a tenant's history. `None`: no horizon (kept until something else
/// removes it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Runs created more than this many days ago are deleted with their lines.
    pub run_days: Option<u32>,
    /// Runs of a task beyond its newest this many are deleted with their lines.
    pub runs_per_task: Option<u32>,
    /// The lines of runs created more than this many days ago are deleted; the runs and
    /// their outcomes stay (until `run_days`).
    pub log_days: Option<u32>,
    /// Audit entries older than this many days are deleted.
    pub audit_days: Option<u32>,
}

/// Most days a horizon may be set to (a century).
pub const MAX_DAYS: u32 = 36_500;

impl Retention {
    /// The platform's horizons from its configuration, where 0 means none.
    pub fn from_config(run_days: u32, runs_per_task: u32, log_days: u32, audit_days: u32) -> Self {
        let set = |v: u32| (v > 0).then_some(v);
        Retention {
            run_days: set(run_days),
            runs_per_task: set(runs_per_task),
            log_days: set(log_days),
            audit_days: set(audit_days),
        }
    }

    /// What holds for a tenant that chose `own` (each horizon it left unset is the
    /// platform's): never longer than the platform's.
    pub fn within(&self, own: &Retention) -> Retention {
        let pick = |own: Option<u32>, platform: Option<u32>| match (own, platform) {
            (Some(o), Some(p)) => Some(o.min(p)),
            (o, p) => o.or(p),
        };
        Retention {
            run_days: pick(own.run_days, self.run_days),
            runs_per_task: pick(own.runs_per_task, self.runs_per_task),
            log_days: pick(own.log_days, self.log_days),
            audit_days: pick(own.audit_days, self.audit_days),
        }
    }

    /// Refuses a tenant's choice that keeps more than the platform allows, or a horizon
    /// of 0 (which would delete everything).
    pub fn check_own(&self, own: &Retention) -> Result<()> {
        let fields = [
            ("runDays", own.run_days, self.run_days, MAX_DAYS),
            (
                "runsPerTask",
                own.runs_per_task,
                self.runs_per_task,
                u32::MAX,
            ),
            ("logDays", own.log_days, self.log_days, MAX_DAYS),
            ("auditDays", own.audit_days, self.audit_days, MAX_DAYS),
        ];
        for (field, own, platform, most) in fields {
            let Some(own) = own else { continue };
            if own == 0 {
                return Err(Error::bad_input(
                    field,
                    "must be at least 1 (null: the platform's)",
                ));
            }
            let most = platform.unwrap_or(most);
            if own > most {
                return Err(Error::bad_input(
                    field,
                    format!("at most {most}: the platform keeps no more"),
                ));
            }
        }
        Ok(())
    }
}

/// What one pruning pass deleted of a tenant's history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pruned {
    pub at: Option<DateTime<Utc>>,
    pub runs: u64,
    pub log_lines: u64,
    pub audit_entries: u64,
    pub packages: u64,
}

impl Pruned {
    pub fn is_empty(&self) -> bool {
        self.runs == 0 && self.log_lines == 0 && self.audit_entries == 0 && self.packages == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_keeps_its_own_horizons_within_the_platforms() {
        let platform = Retention::from_config(90, 1_000, 30, 0);
        assert_eq!(platform.audit_days, None);
        let own = Retention {
            run_days: Some(7),
            log_days: None,
            runs_per_task: Some(5_000),
            audit_days: Some(400),
        };
        let held = platform.within(&own);
        assert_eq!(
            held,
            Retention {
                run_days: Some(7),
                runs_per_task: Some(1_000),
                log_days: Some(30),
                audit_days: Some(400),
            }
        );
        assert!(platform.check_own(&own).is_err(), "5,000 runs over 1,000");
        let fine = Retention {
            runs_per_task: Some(10),
            ..own
        };
        platform.check_own(&fine).unwrap();
        let zero = Retention {
            run_days: Some(0),
            ..fine
        };
        assert!(platform.check_own(&zero).is_err());
        let century = Retention {
            audit_days: Some(MAX_DAYS + 1),
            ..fine
        };
        assert!(platform.check_own(&century).is_err());
    }
}
