//! Time zones and daylight saving time: from local occurrences to UTC instants.
//!
//! The expression is matched against the local wall-clock time of the schedule's zone; every
//! matching wall time (a "local occurrence") is mapped to UTC instants as follows:
//!
//! 1. The wall time exists exactly once: it fires at that instant.
//! 2. Spring-forward gap (the wall time does not exist, e.g. 02:30 on 2021-03-14 in
//!    America/New_York): it fires ONCE at the first instant after the gap, i.e. the transition
//!    instant (03:00 EDT = 07:00 UTC). All occurrences inside one gap collapse into that single
//!    fire, and when that instant is also a regular occurrence (e.g. 03:00 for an hourly job) it
//!    still fires only once. This applies to every job ("run it, don't skip it"), so `5 * * * *`
//!    fires at 03:00 and 03:05 EDT that night.
//! 3. Fall-back overlap (the wall time occurs twice, e.g. 01:30 on 2021-11-07 in New York):
//!    * a FIXED-TIME job, whose second, minute and hour fields consist only of explicit numbers,
//!      lists and ranges (no `*`, no `/`), fires ONCE, at the FIRST occurrence (01:30 EDT =
//!      05:30 UTC). 5-field expressions have an implicit seconds field `0`, which is fixed.
//!    * an INTERVAL job, where any of second, minute or hour contains `*` or a `/` step
//!      (`*/15 * * * *`, `0 * * * *`, `*/10 2 * * *`), fires at BOTH occurrences: it follows real
//!      elapsed time (01:00 EDT, 01:00 EST, 02:00 EST for an hourly job).
//!
//!    This is the Vixie cron rule (Vixie recognises wildcard jobs by a leading `*` in the
//!    minute or hour field; steps are treated as intervals here too).
//!
//! The same rules hold for zones shifting by 30 minutes (Australia/Lord_Howe) or other amounts.
//! Fire times are whole seconds.

use chrono::{DateTime, Datelike, LocalResult, Offset, TimeZone};
use chrono_tz::Tz;

use super::calendar::naive_from_secs;
use super::{Schedule, ScheduleError};

impl Schedule {
    // ----- evaluation in UTC ------------------------------------------------------------------
    //
    // Walls ("local wall-clock times") and instants are both handled as i64 seconds: an instant
    // is a Unix timestamp, a wall is the Unix timestamp the naive local time would have in UTC.
    //
    // Every local occurrence `w` (a wall matching the expression) has an earliest fire E(w) and a
    // latest fire L(w): the instant itself, the two instants of an overlap, or the gap end for
    // both in a gap. Both are non-decreasing in `w`. Fixed-time jobs fire at E(w) only, interval
    // jobs at E(w) and L(w). So the first fire after `a` is E of the first occurrence at or after
    // W_E = min{w : E(w) > a} (and, for interval jobs, L of the first occurrence at or after
    // W_L = min{w : L(w) > a}); W_E and W_L come from the wall of `a` itself.

    pub(super) fn next_fire(&self, a: i64) -> Option<i64> {
        let x = a + self.offset_at(a)?;
        let (w_e, w_l) = match self.resolve(x)? {
            Resolved::Ambiguous(early, late) => {
                // `a` lies in a fall-back overlap; find the transition instant.
                let t = self.transition_in(early, late)?;
                let (old_offset, new_offset) = (x - early, x - late);
                if a == early {
                    // First pass: the second pass of the overlap starts at wall t + new_offset.
                    (x + 1, t + new_offset)
                } else {
                    // Second pass: earliest fires only resume once the overlap walls are over.
                    (t + old_offset, x + 1)
                }
            }
            _ => (x + 1, x + 1),
        };
        let horizon = self
            .spec
            .horizon_year(naive_from_secs(w_e.min(w_l))?.year());
        let early = self.fire_from_wall(w_e, false, horizon);
        if self.spec.fixed_time || w_l == w_e {
            return early;
        }
        let late = self.fire_from_wall(w_l, true, horizon);
        match (early, late) {
            (Some(e), Some(l)) => Some(e.min(l)),
            (e, l) => e.or(l),
        }
    }

    /// The fire (earliest or latest pass) of the first local occurrence at or after wall `w0`.
    fn fire_from_wall(&self, w0: i64, latest: bool, horizon: i32) -> Option<i64> {
        let w = self.spec.next_local(w0, horizon)?;
        match self.resolve(w)? {
            Resolved::Single(u) => Some(u),
            Resolved::Ambiguous(e, l) => Some(if latest { l } else { e }),
            Resolved::Gap => self.gap_end(w),
        }
    }

    /// UTC offset in seconds at instant `t`.
    fn offset_at(&self, t: i64) -> Option<i64> {
        let utc = DateTime::from_timestamp(t, 0)?.naive_utc();
        Some(i64::from(
            self.tz
                .offset_from_utc_datetime(&utc)
                .fix()
                .local_minus_utc(),
        ))
    }

    /// Instants a wall time maps to.
    fn resolve(&self, wall: i64) -> Option<Resolved> {
        let local = naive_from_secs(wall)?;
        let off = |o: &<Tz as TimeZone>::Offset| i64::from(o.fix().local_minus_utc());
        Some(match self.tz.offset_from_local_datetime(&local) {
            LocalResult::Single(o) => Resolved::Single(wall - off(&o)),
            LocalResult::Ambiguous(o1, o2) => {
                let (a, b) = (wall - off(&o1), wall - off(&o2));
                if a == b {
                    Resolved::Single(a)
                } else {
                    Resolved::Ambiguous(a.min(b), a.max(b))
                }
            }
            LocalResult::None => Resolved::Gap,
        })
    }

    /// Smallest instant in `(lo, hi]` whose offset differs from the offset at `lo`.
    fn transition_in(&self, mut lo: i64, mut hi: i64) -> Option<i64> {
        let base = self.offset_at(lo)?;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.offset_at(mid)? == base {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(hi)
    }

    /// First instant after the spring-forward gap containing wall `wall`.
    fn gap_end(&self, wall: i64) -> Option<i64> {
        let local = naive_from_secs(wall)?;
        if let Some(end) = chrono_tz::GapInfo::new(&local, &self.tz).and_then(|g| g.end) {
            return Some(end.timestamp());
        }
        // Fallback: search for the first existing wall after the gap.
        let (mut lo, mut step) = (wall, 1i64);
        let mut hi = loop {
            let c = wall + step;
            if !matches!(self.resolve(c)?, Resolved::Gap) {
                break c;
            }
            lo = c;
            if step > 8 * 86_400 {
                return None;
            }
            step *= 2;
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if matches!(self.resolve(mid)?, Resolved::Gap) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi = match self.resolve(hi)? {
            Resolved::Single(u) | Resolved::Ambiguous(u, _) => u,
            Resolved::Gap => return None,
        };
        Some(hi)
    }
}

/// Parse and check an IANA zone name (exact, or case-insensitive as a fallback).
pub fn validate_timezone(tz: &str) -> Result<chrono_tz::Tz, ScheduleError> {
    let name = tz.trim();
    if let Ok(zone) = name.parse::<Tz>() {
        return Ok(zone);
    }
    chrono_tz::TZ_VARIANTS
        .iter()
        .copied()
        .find(|z| z.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| ScheduleError::Timezone(tz.to_string()))
}

enum Resolved {
    Single(i64),
    /// (first pass, second pass)
    Ambiguous(i64, i64),
    Gap,
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use crate::schedule::tests::{at, sched, times};

    use super::*;

    #[test]
    fn evaluated_in_local_time() {
        // Berlin: CET (UTC+1) in winter, CEST (UTC+2) in summer.
        assert_eq!(
            times("0 9 * * *", "Europe/Berlin", "2027-01-10T00:00:00Z", 1),
            ["2027-01-10T08:00:00Z"]
        );
        assert_eq!(
            times("0 9 * * *", "Europe/Berlin", "2027-07-10T00:00:00Z", 1),
            ["2027-07-10T07:00:00Z"]
        );
    }

    #[test]
    fn new_york_spring_gap_fixed_time() {
        // 2021-03-14 02:00 EST -> 03:00 EDT at 07:00 UTC; 02:30 does not exist.
        assert_eq!(
            times("30 2 * * *", "America/New_York", "2021-03-13T12:00:00Z", 2),
            ["2021-03-14T07:00:00Z", "2021-03-15T06:30:00Z"]
        );
        // 02:00 (in the gap) and 03:00 (regular) both land on 07:00 UTC: fired once.
        assert_eq!(
            times("0 2,3 * * *", "America/New_York", "2021-03-14T00:00:00Z", 3),
            [
                "2021-03-14T07:00:00Z",
                "2021-03-15T06:00:00Z",
                "2021-03-15T07:00:00Z"
            ]
        );
    }

    #[test]
    fn new_york_spring_gap_interval() {
        assert_eq!(
            times(
                "*/15 * * * *",
                "America/New_York",
                "2021-03-14T06:30:00Z",
                3
            ),
            [
                "2021-03-14T06:45:00Z",
                "2021-03-14T07:00:00Z",
                "2021-03-14T07:15:00Z"
            ]
        );
        assert_eq!(
            times("0 * * * *", "America/New_York", "2021-03-14T05:30:00Z", 3),
            [
                "2021-03-14T06:00:00Z",
                "2021-03-14T07:00:00Z",
                "2021-03-14T08:00:00Z"
            ]
        );
        // 02:05 does not exist: it runs at the end of the gap, then 03:05 as usual.
        assert_eq!(
            times("5 * * * *", "America/New_York", "2021-03-14T06:00:00Z", 3),
            [
                "2021-03-14T06:05:00Z",
                "2021-03-14T07:00:00Z",
                "2021-03-14T07:05:00Z"
            ]
        );
    }

    #[test]
    fn new_york_fall_overlap_fixed_time() {
        // 2021-11-07 02:00 EDT -> 01:00 EST at 06:00 UTC; 01:30 happens twice.
        let s = sched("30 1 * * *", "America/New_York");
        assert_eq!(
            s.upcoming(at("2021-11-07T00:00:00Z"), 2),
            [at("2021-11-07T05:30:00Z"), at("2021-11-08T06:30:00Z")]
        );
        // Asking from inside the second pass does not return the first one again.
        for after in [
            "2021-11-07T05:30:00Z",
            "2021-11-07T06:10:00Z",
            "2021-11-07T06:30:00Z",
        ] {
            assert_eq!(
                s.next_after(at(after)),
                Some(at("2021-11-08T06:30:00Z")),
                "{after}"
            );
        }
        assert_eq!(
            times(
                "0,30 1 * * *",
                "America/New_York",
                "2021-11-07T04:00:00Z",
                4
            ),
            [
                "2021-11-07T05:00:00Z",
                "2021-11-07T05:30:00Z",
                "2021-11-08T06:00:00Z",
                "2021-11-08T06:30:00Z"
            ]
        );
    }

    #[test]
    fn new_york_fall_overlap_interval() {
        assert_eq!(
            times(
                "*/15 * * * *",
                "America/New_York",
                "2021-11-07T05:30:00Z",
                6
            ),
            [
                "2021-11-07T05:45:00Z",
                "2021-11-07T06:00:00Z",
                "2021-11-07T06:15:00Z",
                "2021-11-07T06:30:00Z",
                "2021-11-07T06:45:00Z",
                "2021-11-07T07:00:00Z"
            ]
        );
        assert_eq!(
            times("0 * * * *", "America/New_York", "2021-11-07T04:30:00Z", 3),
            [
                "2021-11-07T05:00:00Z",
                "2021-11-07T06:00:00Z",
                "2021-11-07T07:00:00Z"
            ]
        );
        // From inside the second pass.
        assert_eq!(
            times(
                "*/15 * * * *",
                "America/New_York",
                "2021-11-07T06:05:00Z",
                1
            ),
            ["2021-11-07T06:15:00Z"]
        );
        // A wildcard minute with a fixed hour is an interval job too (Vixie).
        assert_eq!(
            times(
                "*/20 1 * * *",
                "America/New_York",
                "2021-11-07T04:00:00Z",
                7
            ),
            [
                "2021-11-07T05:00:00Z",
                "2021-11-07T05:20:00Z",
                "2021-11-07T05:40:00Z",
                "2021-11-07T06:00:00Z",
                "2021-11-07T06:20:00Z",
                "2021-11-07T06:40:00Z",
                "2021-11-08T06:00:00Z"
            ]
        );
    }

    #[test]
    fn lord_howe_transitions_are_real() {
        // The dates the tests below rely on: LHDT (+11) ends on the first Sunday of April,
        // starts on the first Sunday of October.
        let tz: Tz = "Australia/Lord_Howe".parse().unwrap();
        let off = |s: &str| {
            tz.offset_from_utc_datetime(&at(s).naive_utc())
                .fix()
                .local_minus_utc()
        };
        assert_eq!(off("2026-04-04T14:59:59Z"), 11 * 3600);
        assert_eq!(off("2026-04-04T15:00:00Z"), 10 * 3600 + 1800);
        assert_eq!(off("2026-10-03T15:29:59Z"), 10 * 3600 + 1800);
        assert_eq!(off("2026-10-03T15:30:00Z"), 11 * 3600);
    }

    #[test]
    fn lord_howe_autumn_overlap() {
        // 2026-04-05 02:00 LHDT (+11) -> 01:30 LHST (+10:30) at 15:00 UTC: 01:30-01:59 twice.
        assert_eq!(
            times(
                "45 1 * * *",
                "Australia/Lord_Howe",
                "2026-04-04T00:00:00Z",
                2
            ),
            ["2026-04-04T14:45:00Z", "2026-04-05T15:15:00Z"]
        );
        assert_eq!(
            times(
                "*/15 * * * *",
                "Australia/Lord_Howe",
                "2026-04-04T14:20:00Z",
                5
            ),
            [
                "2026-04-04T14:30:00Z",
                "2026-04-04T14:45:00Z",
                "2026-04-04T15:00:00Z",
                "2026-04-04T15:15:00Z",
                "2026-04-04T15:30:00Z"
            ]
        );
    }

    #[test]
    fn lord_howe_spring_gap() {
        // 2026-10-04 02:00 LHST (+10:30) -> 02:30 LHDT (+11) at 15:30 UTC: 02:00-02:29 missing.
        assert_eq!(
            times(
                "15 2 * * *",
                "Australia/Lord_Howe",
                "2026-10-03T00:00:00Z",
                2
            ),
            ["2026-10-03T15:30:00Z", "2026-10-04T15:15:00Z"]
        );
        // 02:15 (gap) and 02:30 (regular) coincide: once.
        assert_eq!(
            times(
                "15,30 2 * * *",
                "Australia/Lord_Howe",
                "2026-10-03T00:00:00Z",
                3
            ),
            [
                "2026-10-03T15:30:00Z",
                "2026-10-04T15:15:00Z",
                "2026-10-04T15:30:00Z"
            ]
        );
        assert_eq!(
            times(
                "0 * * * *",
                "Australia/Lord_Howe",
                "2026-10-03T14:00:00Z",
                3
            ),
            [
                "2026-10-03T14:30:00Z",
                "2026-10-03T15:30:00Z",
                "2026-10-03T16:00:00Z"
            ]
        );
    }

    /// Ground truth by brute force, minute by minute, straight from the documented rules.
    fn brute_force_fires(s: &Schedule, from: i64, to: i64) -> Vec<i64> {
        let matches = |wall: i64| s.spec.next_local(wall, 3000) == Some(wall);
        let mut out = Vec::new();
        let mut u = from;
        while u <= to {
            let (off, prev) = (s.offset_at(u).unwrap(), s.offset_at(u - 1).unwrap());
            let wall = u + off;
            let regular = matches(wall)
                && match s.resolve(wall).unwrap() {
                    Resolved::Ambiguous(e, _) => !s.spec.fixed_time || u == e,
                    _ => true,
                };
            // Gap end: some wall in [u - 1 + prev + 1, u + off) matches.
            let gap = off > prev
                && s.spec
                    .next_local(u + prev, 3000)
                    .is_some_and(|w| w < u + off);
            if regular || gap {
                out.push(u);
            }
            u += 60;
        }
        out
    }

    #[test]
    fn matches_brute_force_around_transitions() {
        let exprs = [
            "*/15 * * * *",
            "0 * * * *",
            "5 * * * *",
            "30 1 * * *",
            "45 1 * * *",
            "15 2 * * *",
            "30 2 * * *",
            "*/20 1 * * *",
            "0,30 1-2 * * *",
            "10-20/5 1,2 * * *",
        ];
        let windows = [
            ("America/New_York", "2021-03-13T12:00:00Z"),
            ("America/New_York", "2021-11-06T12:00:00Z"),
            ("Australia/Lord_Howe", "2026-04-04T00:00:00Z"),
            ("Australia/Lord_Howe", "2026-10-03T00:00:00Z"),
        ];
        for (tz, start) in windows {
            for expr in exprs {
                let s = sched(expr, tz);
                let from = at(start).timestamp();
                let truth = brute_force_fires(&s, from, from + 3 * 86_400);
                let mut t = from - 1;
                while t < from + 2 * 86_400 {
                    let want = truth.iter().copied().find(|&f| f > t);
                    let got = s
                        .next_after(DateTime::from_timestamp(t, 0).unwrap())
                        .map(|d| d.timestamp());
                    assert_eq!(got, want, "{expr} in {tz} after {t}");
                    t += 7 * 60 + 13;
                }
            }
        }
    }

    #[test]
    fn timezone_errors() {
        assert_eq!(
            Schedule::parse("* * * * *", "Mars/Olympus_Mons", None, None).unwrap_err(),
            ScheduleError::Timezone("Mars/Olympus_Mons".into())
        );
        assert_eq!(validate_timezone("UTC"), Ok(Tz::UTC));
        assert_eq!(validate_timezone("Europe/Berlin"), Ok(Tz::Europe__Berlin));
        assert_eq!(validate_timezone("europe/berlin"), Ok(Tz::Europe__Berlin));
        assert!(validate_timezone("").is_err());
    }
}
