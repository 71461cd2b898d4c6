//! Cron schedules with Unix (Vixie cron) semantics, an IANA time zone, calendar rules and an
//! optional active window.
//!
//! * `parse`: the expression grammar (fields, names, steps, macros, calendar rules);
//! * `calendar`: from a local wall-clock time to the next one the expression matches;
//! * `zone`: local occurrences to UTC instants, through DST gaps and overlaps;
//! * here: [`Schedule`] itself and its active window.
//!
//! # Active window
//!
//! `active_from` is inclusive and `active_until` exclusive: fires before `active_from` are never
//! returned (the first fire at or after `active_from` is), fires at or after `active_until` give
//! `None`.
//!
//! # Evaluation
//!
//! The evaluator is implemented here rather than delegated to croner 3.0.1, whose stateless
//! `find_next_occurrence` gets fall-back overlaps wrong for this use: in New York on 2021-11-07,
//! `30 1 * * *` asked "next after 06:10 UTC" answers 05:30 UTC (before the bound), and
//! `0 * * * *` asked after 05:00 UTC skips 06:00 UTC (01:00 EST); it also steps second by second
//! through gaps. The search works on bit sets (month by month for dates, bit scans for the
//! time of day) and only touches the zone database a handful of times, so `next_after` costs
//! about a microsecond (optimised build) however far away the next fire is.
//! Expressions that can never fire (`0 0 30 2 *`, or only past years) are rejected at parse time.

mod calendar;
mod parse;
mod zone;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

pub use zone::validate_timezone;

/// Smallest year accepted in the year field.
const MIN_YEAR: u32 = 1970;
/// Largest year accepted in the year field.
const MAX_YEAR: u32 = 2199;

/// Why a schedule could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ScheduleError {
    #[error("invalid cron expression: {0}")]
    Cron(String),
    #[error("unknown timezone: {0}")]
    Timezone(String),
    #[error("active window ends before it starts")]
    Window,
}

/// A parsed cron schedule bound to a time zone and an optional active window.
#[derive(Clone, Debug)]
pub struct Schedule {
    expr: String,
    tz: Tz,
    active_from: Option<DateTime<Utc>>,
    active_until: Option<DateTime<Utc>>,
    has_seconds: bool,
    spec: calendar::Spec,
}

impl Schedule {
    /// expr: cron expression; tz: IANA name ("UTC" default handled by caller);
    /// active_from / active_until: optional window (UTC instants, inclusive start, exclusive end).
    pub fn parse(
        expr: &str,
        tz: &str,
        active_from: Option<DateTime<Utc>>,
        active_until: Option<DateTime<Utc>>,
    ) -> Result<Schedule, ScheduleError> {
        let (spec, has_seconds) = parse::parse_expression(expr).map_err(ScheduleError::Cron)?;
        let tz = validate_timezone(tz)?;
        if let (Some(from), Some(until)) = (active_from, active_until)
            && until <= from
        {
            return Err(ScheduleError::Window);
        }
        spec.check_fires(Utc::now().date_naive())
            .map_err(ScheduleError::Cron)?;
        Ok(Schedule {
            expr: expr.trim().to_string(),
            tz,
            active_from,
            active_until,
            has_seconds,
            spec,
        })
    }

    /// First fire time strictly after `after`, in UTC, or None if there is none (window over,
    /// impossible date).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if let Some(until) = self.active_until
            && after >= until
        {
            return None;
        }
        // Fire times are whole seconds: `f > after` <=> `f > floor(after)`.
        let mut bound = after.timestamp();
        if let Some(from) = self.active_from {
            // `f >= from` <=> `f > ceil(from) - 1`.
            let from_bound = if from.timestamp_subsec_nanos() == 0 {
                from.timestamp() - 1
            } else {
                from.timestamp()
            };
            bound = bound.max(from_bound);
        }
        let fire = DateTime::from_timestamp(self.next_fire(bound)?, 0)?;
        match self.active_until {
            Some(until) if fire >= until => None,
            _ => Some(fire),
        }
    }

    /// Up to `count` next fire times strictly after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, count: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count.min(1024));
        let mut cursor = after;
        while out.len() < count {
            match self.next_after(cursor) {
                Some(t) => {
                    out.push(t);
                    cursor = t;
                }
                None => break,
            }
        }
        out
    }

    /// The expression as given (surrounding whitespace trimmed).
    pub fn expression(&self) -> &str {
        &self.expr
    }

    /// The zone the expression is evaluated in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// true when the expression has a seconds field (so callers know the resolution)
    pub fn has_seconds(&self) -> bool {
        self.has_seconds
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap_or_else(|e| panic!("bad instant {s}: {e}"))
    }

    pub(crate) fn sched(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(expr, tz, None, None)
            .unwrap_or_else(|e| panic!("{expr} in {tz} should parse: {e}"))
    }

    pub(crate) fn times(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        sched(expr, tz)
            .upcoming(at(after), n)
            .iter()
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect()
    }

    pub(crate) fn cron_err(expr: &str) -> String {
        match Schedule::parse(expr, "UTC", None, None) {
            Err(ScheduleError::Cron(msg)) => msg,
            other => panic!("{expr}: expected a cron error, got {other:?}"),
        }
    }

    #[test]
    fn active_window() {
        let from = at("2027-01-01T10:00:00Z");
        let until = at("2027-01-01T13:00:00Z");
        let s = Schedule::parse("0 * * * *", "UTC", Some(from), Some(until)).unwrap();
        // Jumps to the first fire at or after active_from (inclusive).
        assert_eq!(s.next_after(at("2026-12-01T00:00:00Z")), Some(from));
        assert_eq!(s.next_after(from), Some(at("2027-01-01T11:00:00Z")));
        // active_until is exclusive.
        assert_eq!(s.next_after(at("2027-01-01T12:00:00Z")), None);
        assert_eq!(s.next_after(until), None);
        assert_eq!(s.next_after(at("2030-01-01T00:00:00Z")), None);
        assert_eq!(
            s.upcoming(at("2026-01-01T00:00:00Z"), 10),
            [from, at("2027-01-01T11:00:00Z"), at("2027-01-01T12:00:00Z")]
        );
        // A start that is not on a whole second.
        let s =
            Schedule::parse("0 * * * *", "UTC", Some(at("2027-01-01T10:00:00.5Z")), None).unwrap();
        assert_eq!(
            s.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2027-01-01T11:00:00Z"))
        );
        // Open-ended on either side.
        let s = Schedule::parse("0 * * * *", "UTC", None, Some(until)).unwrap();
        assert_eq!(
            s.next_after(at("2027-01-01T11:30:00Z")),
            Some(at("2027-01-01T12:00:00Z"))
        );
    }

    #[test]
    fn window_must_not_end_before_it_starts() {
        let t = at("2027-01-01T10:00:00Z");
        assert_eq!(
            Schedule::parse("* * * * *", "UTC", Some(t), Some(t)).unwrap_err(),
            ScheduleError::Window
        );
        assert_eq!(
            Schedule::parse(
                "* * * * *",
                "UTC",
                Some(t),
                Some(at("2027-01-01T09:00:00Z"))
            )
            .unwrap_err(),
            ScheduleError::Window
        );
    }
}
