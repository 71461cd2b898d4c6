//! The overlap policy: what a fire does about a run of its task still going.

use cloudtask_core::task::OverlapPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Overlap {
    /// Starts at once: nothing is running, or the policy allows overlap.
    StartNow,
    /// Recorded SKIPPED.
    Skip,
    /// Starts once the running runs, stopped, have ended.
    Replace,
}

/// The one place that decides it, for the pass that lets staged shells go and for the
/// dispatch of every fire.
pub(super) fn overlap(policy: OverlapPolicy, running: bool) -> Overlap {
    match policy {
        _ if !running => Overlap::StartNow,
        OverlapPolicy::Allow => Overlap::StartNow,
        OverlapPolicy::Skip => Overlap::Skip,
        OverlapPolicy::Replace => Overlap::Replace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fire_with_nothing_running_starts_whatever_the_policy() {
        for policy in [
            OverlapPolicy::Skip,
            OverlapPolicy::Allow,
            OverlapPolicy::Replace,
        ] {
            assert_eq!(overlap(policy, false), Overlap::StartNow, "{policy:?}");
        }
    }

    #[test]
    fn a_fire_over_a_running_one_follows_the_policy() {
        assert_eq!(overlap(OverlapPolicy::Skip, true), Overlap::Skip);
        assert_eq!(overlap(OverlapPolicy::Allow, true), Overlap::StartNow);
        assert_eq!(overlap(OverlapPolicy::Replace, true), Overlap::Replace);
    }
}
