//! Cron schedules with Unix (Vixie cron) semantics, an IANA time zone, calendar rules and an
//! optional active window.
//!
//! # Expression grammar
//!
//! * 5 fields: `minute hour day-of-month month day-of-week` (seconds are `0`).
//! * 6 fields: a LEADING seconds field: `second minute hour day-of-month month day-of-week`.
//! * 7 fields: seconds, the five classic fields, and a trailing `year` (1970–2199).
//! * Macros: `@yearly` / `@annually`, `@monthly`, `@weekly`, `@daily` / `@midnight`, `@hourly`.
//!   `@reboot` is rejected (a schedule is a function of time; there is no boot to attach to).
//!
//! Every field takes `*`, numbers, `a-b` ranges, `/step` (`*/15`, `10-40/5`, `5/15` = `5-max/15`)
//! and comma lists. Months accept `JAN`–`DEC`, days of week `SUN`–`SAT` (case-insensitive).
//! Days of week are numbered as in Unix cron: `0` and `7` are Sunday, `1` Monday … `6` Saturday,
//! so `1-5` is Monday–Friday and `5-7` / `FRI-SUN` is Friday–Sunday. `?` is accepted as a
//! synonym of `*` in the two day fields.
//!
//! Calendar rules:
//! * day-of-month `L` = last day of the month, `L-n` = n days before it, `nW` = the weekday
//!   (Mon–Fri) nearest to day n within the same month (Quartz rule; no match when the month has
//!   no day n), `LW` = last weekday of the month.
//! * day-of-week `nL` (e.g. `5L`, `FRIL`) = last such weekday of the month, `n#k` (e.g. `1#2`)
//!   = k-th (1–5) such weekday of the month.
//!
//! Day matching follows Vixie cron: when BOTH day-of-month and day-of-week are restricted, a day
//! matches if EITHER field matches (`0 0 13 * 5` = every 13th and every Friday). A day field
//! counts as unrestricted only when it is exactly `*` (or `?`); unlike Vixie, which only looks at
//! the first character, `*/2` counts as restricted. When only one of them is restricted, only
//! that one is checked. (croner's `dom_and_dow` AND-mode is not used.)
//!
//! # Time zones and daylight saving time
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
//! through gaps. The search here works on bit sets (month by month for dates, bit scans for the
//! time of day) and only touches the zone database a handful of times, so `next_after` costs
//! about a microsecond (optimised build) however far away the next fire is.
//! Expressions that can never fire (`0 0 30 2 *`, or only past years) are rejected at parse time.

use std::fmt;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

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
    spec: Spec,
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
        let (spec, has_seconds) = parse_expression(expr).map_err(ScheduleError::Cron)?;
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

    /// First fire instant (Unix seconds) strictly greater than `a`, ignoring the window.
    fn next_fire(&self, a: i64) -> Option<i64> {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolved {
    Single(i64),
    /// (first pass, second pass)
    Ambiguous(i64, i64),
    Gap,
}

fn naive_from_secs(secs: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(secs, 0).map(|d| d.naive_utc())
}

fn secs_from_naive(n: NaiveDateTime) -> i64 {
    n.and_utc().timestamp()
}

fn days_in_month(year: i32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        _ => 28,
    }
}

// ----- bit sets ---------------------------------------------------------------------------------

/// A set of small integers (0..256).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Bits([u64; 4]);

impl Bits {
    fn insert(&mut self, i: u32) {
        self.0[(i / 64) as usize] |= 1 << (i % 64);
    }

    /// Smallest member >= `from`.
    fn next(&self, from: u32) -> Option<u32> {
        let mut idx = (from / 64) as usize;
        if idx >= 4 {
            return None;
        }
        let mut word = self.0[idx] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                return Some(idx as u32 * 64 + word.trailing_zeros());
            }
            idx += 1;
            if idx >= 4 {
                return None;
            }
            word = self.0[idx];
        }
    }

    fn last(&self) -> Option<u32> {
        (0..4)
            .rev()
            .find(|&i| self.0[i] != 0)
            .map(|i| i as u32 * 64 + 63 - self.0[i].leading_zeros())
    }
}

impl fmt::Debug for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut set = f.debug_set();
        let mut i = 0;
        while let Some(v) = self.next(i) {
            set.entry(&v);
            i = v + 1;
        }
        set.finish()
    }
}

// ----- the parsed expression --------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Spec {
    seconds: Bits,
    minutes: Bits,
    hours: Bits,
    months: Bits,
    /// Years as offsets from `MIN_YEAR`; `None` = any year.
    years: Option<Bits>,
    dom: DomSpec,
    dow: DowSpec,
    dom_star: bool,
    dow_star: bool,
    /// No `*` or `/` in the second, minute and hour fields (see the DST rules).
    fixed_time: bool,
}

#[derive(Clone, Debug, Default)]
struct DomSpec {
    /// Bits 1..=31.
    days: u32,
    /// Bit n set for `L-n` (`L` is `L-0`), n in 0..=30.
    last_minus: u32,
    /// Bit n set for `nW`.
    nearest_weekday: u32,
    /// `LW`.
    last_weekday: bool,
}

#[derive(Clone, Debug, Default)]
struct DowSpec {
    /// Bit 0 = Sunday … bit 6 = Saturday.
    days: u8,
    /// `nL`: last such weekday of the month.
    last: u8,
    /// `n#k`: bit k (1..=5) of `nth[n]`.
    nth: [u8; 7],
}

impl Spec {
    /// Last year worth searching from `from_year`. Without a year field the calendar repeats
    /// every 400 years, and `check_fires` made sure some date matches in any such period.
    fn horizon_year(&self, from_year: i32) -> i32 {
        match &self.years {
            Some(bits) => bits.last().map_or(i32::MIN, |i| (i + MIN_YEAR) as i32),
            None => from_year.saturating_add(401),
        }
    }

    /// Reject expressions that never fire from `today` on.
    fn check_fires(&self, today: NaiveDate) -> Result<(), String> {
        let start = today.pred_opt().unwrap_or(today);
        if self
            .next_date(start, self.horizon_year(start.year()))
            .is_some()
        {
            return Ok(());
        }
        let past_years = self
            .years
            .as_ref()
            .and_then(Bits::last)
            .is_some_and(|i| ((i + MIN_YEAR) as i32) < start.year());
        Err(if past_years {
            "expression never fires: every year in the year field is in the past".to_string()
        } else {
            "expression never fires: no date matches its day-of-month, month, day-of-week and \
             year fields (e.g. 30 February)"
                .to_string()
        })
    }

    /// First local wall time (as seconds) >= `wall` matching the expression, up to `horizon`.
    fn next_local(&self, wall: i64, horizon: i32) -> Option<i64> {
        let start = naive_from_secs(wall)?;
        let mut date = start.date();
        let (mut h, mut m, mut s) = (start.hour(), start.minute(), start.second());
        loop {
            let day = self.next_date(date, horizon)?;
            if day != date {
                (h, m, s) = (0, 0, 0);
            }
            if let Some((hh, mm, ss)) = self.first_time_at_or_after(h, m, s) {
                return Some(secs_from_naive(day.and_hms_opt(hh, mm, ss)?));
            }
            date = day.succ_opt()?;
            (h, m, s) = (0, 0, 0);
        }
    }

    /// First time of day >= h:m:s matching the time fields.
    fn first_time_at_or_after(&self, h: u32, m: u32, s: u32) -> Option<(u32, u32, u32)> {
        let mut hour = self.hours.next(h)?;
        loop {
            let mut minute = self.minutes.next(if hour == h { m } else { 0 });
            while let Some(min) = minute {
                let from = if hour == h && min == m { s } else { 0 };
                if let Some(sec) = self.seconds.next(from) {
                    return Some((hour, min, sec));
                }
                minute = self.minutes.next(min + 1);
            }
            hour = self.hours.next(hour + 1)?;
        }
    }

    /// First date >= `from` matching the date fields, up to the end of year `horizon`.
    fn next_date(&self, from: NaiveDate, horizon: i32) -> Option<NaiveDate> {
        let (mut y, mut m, mut d) = (from.year(), from.month(), from.day());
        loop {
            if y > horizon {
                return None;
            }
            if let Some(years) = &self.years {
                let idx = u32::try_from(y).ok().and_then(|y| y.checked_sub(MIN_YEAR));
                let next = years.next(idx.unwrap_or(0))? as i32 + MIN_YEAR as i32;
                if next != y {
                    (y, m, d) = (next, 1, 1);
                    continue;
                }
            }
            match self.months.next(m) {
                None => {
                    (y, m, d) = (y + 1, 1, 1);
                    continue;
                }
                Some(next) if next != m => (m, d) = (next, 1),
                Some(_) => {}
            }
            let candidates = (self.day_mask(y, m) >> d) << d;
            if candidates != 0 {
                return NaiveDate::from_ymd_opt(y, m, candidates.trailing_zeros());
            }
            (m, d) = (m + 1, 1);
            if m > 12 {
                (y, m) = (y + 1, 1);
            }
        }
    }

    /// Days (bits 1..=31) of the month that match the day-of-month/day-of-week fields.
    fn day_mask(&self, year: i32, month: u32) -> u32 {
        let len = days_in_month(year, month);
        let valid = (((1u64 << (len + 1)) - 1) as u32) & !1;
        if self.dom_star && self.dow_star {
            return valid;
        }
        // Weekday (0 = Sunday) of the first of the month.
        let first = NaiveDate::from_ymd_opt(year, month, 1)
            .map_or(0, |d| d.weekday().num_days_from_sunday());
        let weekday = |day: u32| (first + day - 1) % 7;
        let dom = || {
            let spec = &self.dom;
            let mut mask = spec.days & valid;
            let mut rest = spec.last_minus;
            while rest != 0 {
                let n = rest.trailing_zeros();
                rest &= rest - 1;
                if n < len {
                    mask |= 1 << (len - n);
                }
            }
            let mut rest = spec.nearest_weekday & valid;
            while rest != 0 {
                let n = rest.trailing_zeros();
                rest &= rest - 1;
                let day = match weekday(n) {
                    6 if n == 1 => 3,
                    6 => n - 1,
                    0 if n == len => n - 2,
                    0 => n + 1,
                    _ => n,
                };
                mask |= 1 << day;
            }
            if spec.last_weekday {
                let day = match weekday(len) {
                    6 => len - 1,
                    0 => len - 2,
                    _ => len,
                };
                mask |= 1 << day;
            }
            mask
        };
        let dow = || {
            let spec = &self.dow;
            let mut mask = 0u32;
            for day in 1..=len {
                let wd = weekday(day) as usize;
                let bit = 1u8 << wd;
                if spec.days & bit != 0
                    || (spec.last & bit != 0 && day + 7 > len)
                    || spec.nth[wd] & (1 << ((day - 1) / 7 + 1)) != 0
                {
                    mask |= 1 << day;
                }
            }
            mask
        };
        match (self.dom_star, self.dow_star) {
            (true, _) => dow(),
            (false, true) => dom(),
            (false, false) => dom() | dow(),
        }
    }
}

// ----- parsing ----------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Second,
    Minute,
    Hour,
    Dom,
    Month,
    Dow,
    Year,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Second => "second",
            Kind::Minute => "minute",
            Kind::Hour => "hour",
            Kind::Dom => "day-of-month",
            Kind::Month => "month",
            Kind::Dow => "day-of-week",
            Kind::Year => "year",
        }
    }

    fn bounds(self) -> (u32, u32) {
        match self {
            Kind::Second | Kind::Minute => (0, 59),
            Kind::Hour => (0, 23),
            Kind::Dom => (1, 31),
            Kind::Month => (1, 12),
            Kind::Dow => (0, 7),
            Kind::Year => (MIN_YEAR, MAX_YEAR),
        }
    }

    /// Upper end used for `*` and `a/step`.
    fn star_max(self) -> u32 {
        match self {
            Kind::Dow => 6,
            _ => self.bounds().1,
        }
    }
}

const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Parse an expression into its spec and whether it has a seconds field.
fn parse_expression(expr: &str) -> Result<(Spec, bool), String> {
    let text = expr.trim();
    if text.is_empty() {
        return Err("empty expression".to_string());
    }
    let text = match text.strip_prefix('@') {
        Some(name) => match name.to_ascii_lowercase().as_str() {
            "yearly" | "annually" => "0 0 1 1 *",
            "monthly" => "0 0 1 * *",
            "weekly" => "0 0 * * 0",
            "daily" | "midnight" => "0 0 * * *",
            "hourly" => "0 * * * *",
            "reboot" => {
                return Err(
                    "@reboot is not supported: schedules are time-based, there is \
                            no machine boot to run at"
                        .to_string(),
                );
            }
            _ => {
                return Err(format!(
                    "unknown macro @{name} (supported: @yearly, @annually, @monthly, @weekly, \
                     @daily, @midnight, @hourly)"
                ));
            }
        },
        None => text,
    };
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (second, classic, year) = match fields.len() {
        5 => ("0", &fields[..], None),
        6 => (fields[0], &fields[1..], None),
        7 => (fields[0], &fields[1..6], Some(fields[6])),
        n => return Err(format!("expected 5, 6 or 7 fields, got {n}")),
    };
    let [minute, hour, dom, month, dow] = classic else {
        unreachable!("classic fields are always five")
    };
    let years = match year {
        None | Some("*") => None,
        Some(text) => Some(parse_simple(text, Kind::Year)?),
    };
    let is_interval = |t: &str| t.contains('*') || t.contains('/');
    let spec = Spec {
        seconds: parse_simple(second, Kind::Second)?,
        minutes: parse_simple(minute, Kind::Minute)?,
        hours: parse_simple(hour, Kind::Hour)?,
        months: parse_simple(month, Kind::Month)?,
        years,
        dom: parse_dom(dom)?,
        dow: parse_dow(dow)?,
        dom_star: matches!(*dom, "*" | "?"),
        dow_star: matches!(*dow, "*" | "?"),
        fixed_time: !(is_interval(second) || is_interval(minute) || is_interval(hour)),
    };
    Ok((spec, fields.len() >= 6))
}

/// A plain field (second, minute, hour, month, year) as a bit set; years are stored as
/// offsets from `MIN_YEAR`.
fn parse_simple(text: &str, kind: Kind) -> Result<Bits, String> {
    let mut bits = Bits::default();
    for item in text.split(',') {
        let (lo, hi, step) = parse_range(item, kind)?;
        for v in (lo..=hi).step_by(step as usize) {
            bits.insert(if kind == Kind::Year { v - MIN_YEAR } else { v });
        }
    }
    Ok(bits)
}

fn parse_dom(text: &str) -> Result<DomSpec, String> {
    let mut spec = DomSpec::default();
    for item in text.split(',') {
        let upper = item.to_ascii_uppercase();
        if upper == "L" {
            spec.last_minus |= 1;
        } else if upper == "LW" {
            spec.last_weekday = true;
        } else if let Some(n) = upper.strip_prefix("L-") {
            let n = parse_number(n, Kind::Dom)?;
            if n > 30 {
                return Err(format!(
                    "day-of-month offset L-{n} out of range L-0 to L-30"
                ));
            }
            spec.last_minus |= 1 << n;
        } else if let Some(n) = upper.strip_suffix('W') {
            let n = parse_number(n, Kind::Dom)?;
            check_bounds(n, Kind::Dom)?;
            spec.nearest_weekday |= 1 << n;
        } else {
            let (lo, hi, step) = parse_range(item, Kind::Dom)?;
            for v in (lo..=hi).step_by(step as usize) {
                spec.days |= 1 << v;
            }
        }
    }
    Ok(spec)
}

fn parse_dow(text: &str) -> Result<DowSpec, String> {
    let mut spec = DowSpec::default();
    for item in text.split(',') {
        let upper = item.to_ascii_uppercase();
        if upper == "L" {
            return Err(
                "'L' in the day-of-week field needs a weekday, e.g. 5L or FRIL for the \
                        last Friday of the month"
                    .to_string(),
            );
        } else if let Some(day) = upper.strip_suffix('L') {
            spec.last |= 1 << (parse_value(day, Kind::Dow)? % 7);
        } else if let Some((day, nth)) = upper.split_once('#') {
            let day = parse_value(day, Kind::Dow)? % 7;
            let nth = parse_number(nth, Kind::Dow)?;
            if !(1..=5).contains(&nth) {
                return Err(format!(
                    "day-of-week occurrence #{nth} out of range #1-#5 in '{item}'"
                ));
            }
            spec.nth[day as usize] |= 1 << nth;
        } else {
            let (lo, hi, step) = parse_range(item, Kind::Dow)?;
            for v in (lo..=hi).step_by(step as usize) {
                spec.days |= 1 << (v % 7);
            }
        }
    }
    Ok(spec)
}

/// `*`, `a`, `a-b`, each optionally followed by `/step`, as (low, high, step).
fn parse_range(item: &str, kind: Kind) -> Result<(u32, u32, u32), String> {
    let name = kind.name();
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => {
            let step = step
                .parse::<u32>()
                .ok()
                .filter(|&s| s >= 1)
                .ok_or_else(|| {
                    format!("invalid step '/{step}' in {name} field: expected a positive number")
                })?;
            (range, Some(step))
        }
        None => (item, None),
    };
    let star = range == "*" || (range == "?" && matches!(kind, Kind::Dom | Kind::Dow));
    let (lo, hi) = if star {
        (kind.bounds().0, kind.star_max())
    } else if let Some((a, b)) = range.split_once('-') {
        let lo = parse_value(a, kind)?;
        let mut hi = parse_value(b, kind)?;
        // `FRI-SUN`: Sunday at the end of a range is 7.
        if kind == Kind::Dow && hi == 0 && lo > 0 && b.eq_ignore_ascii_case("SUN") {
            hi = 7;
        }
        if lo > hi {
            return Err(format!(
                "{name} range '{range}' is reversed: {lo} is greater than {hi}"
            ));
        }
        (lo, hi)
    } else {
        let v = parse_value(range, kind)?;
        match step {
            Some(_) => (v, kind.star_max().max(v)),
            None => (v, v),
        }
    };
    Ok((lo, hi, step.unwrap_or(1)))
}

/// A single value: a number within bounds, or a month/weekday name.
fn parse_value(text: &str, kind: Kind) -> Result<u32, String> {
    let names: &[&str] = match kind {
        Kind::Month => &MONTH_NAMES,
        Kind::Dow => &DAY_NAMES,
        _ => &[],
    };
    if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(text)) {
        return Ok(i as u32 + u32::from(kind == Kind::Month));
    }
    let v = parse_number(text, kind)?;
    check_bounds(v, kind)?;
    Ok(v)
}

fn parse_number(text: &str, kind: Kind) -> Result<u32, String> {
    if text.is_empty() {
        return Err(format!("empty value in {} field", kind.name()));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid {} value '{text}'", kind.name()));
    }
    text.parse::<u32>().map_err(|_| {
        let (lo, hi) = kind.bounds();
        format!("{} value {text} out of range {lo}-{hi}", kind.name())
    })
}

fn check_bounds(v: u32, kind: Kind) -> Result<(), String> {
    let (lo, hi) = kind.bounds();
    if v < lo || v > hi {
        return Err(format!("{} value {v} out of range {lo}-{hi}", kind.name()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap_or_else(|e| panic!("bad instant {s}: {e}"))
    }

    fn sched(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(expr, tz, None, None)
            .unwrap_or_else(|e| panic!("{expr} in {tz} should parse: {e}"))
    }

    fn times(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        sched(expr, tz)
            .upcoming(at(after), n)
            .iter()
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect()
    }

    fn cron_err(expr: &str) -> String {
        match Schedule::parse(expr, "UTC", None, None) {
            Err(ScheduleError::Cron(msg)) => msg,
            other => panic!("{expr}: expected a cron error, got {other:?}"),
        }
    }

    // ----- field syntax -------------------------------------------------------------------

    #[test]
    fn five_fields_every_five_minutes() {
        let s = sched("*/5 * * * *", "UTC");
        assert!(!s.has_seconds());
        assert_eq!(s.expression(), "*/5 * * * *");
        assert_eq!(s.timezone(), Tz::UTC);
        assert_eq!(
            times("*/5 * * * *", "UTC", "2027-01-01T10:02:00Z", 3),
            [
                "2027-01-01T10:05:00Z",
                "2027-01-01T10:10:00Z",
                "2027-01-01T10:15:00Z"
            ]
        );
    }

    #[test]
    fn strictly_after_and_sub_second_bounds() {
        let s = sched("0 * * * *", "UTC");
        assert_eq!(
            s.next_after(at("2027-01-01T10:00:00Z")),
            Some(at("2027-01-01T11:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2027-01-01T09:59:59.999Z")),
            Some(at("2027-01-01T10:00:00Z"))
        );
    }

    #[test]
    fn seconds_field() {
        let s = sched("*/10 * * * * *", "UTC");
        assert!(s.has_seconds());
        assert_eq!(
            times("*/10 * * * * *", "UTC", "2027-01-01T00:00:05Z", 3),
            [
                "2027-01-01T00:00:10Z",
                "2027-01-01T00:00:20Z",
                "2027-01-01T00:00:30Z"
            ]
        );
        assert_eq!(
            s.next_after(at("2027-01-01T00:00:09.5Z")),
            Some(at("2027-01-01T00:00:10Z"))
        );
        assert_eq!(
            s.next_after(at("2027-01-01T00:00:10.5Z")),
            Some(at("2027-01-01T00:00:20Z"))
        );
        // The seconds field leads: second 30 of minute 0 of hour 12.
        assert_eq!(
            times("30 0 12 * * *", "UTC", "2027-01-01T00:00:00Z", 2),
            ["2027-01-01T12:00:30Z", "2027-01-02T12:00:30Z"]
        );
    }

    #[test]
    fn year_field() {
        let s = sched("0 0 12 1 1 * 2099", "UTC");
        assert!(s.has_seconds());
        assert_eq!(
            s.upcoming(at("2027-01-01T00:00:00Z"), 5),
            [at("2099-01-01T12:00:00Z")]
        );
        assert_eq!(s.next_after(at("2099-01-01T12:00:00Z")), None);
        // 2100 is not a leap year, 2104 is.
        assert_eq!(
            times("0 0 0 29 2 * 2097-2105", "UTC", "2027-01-01T00:00:00Z", 3),
            ["2104-02-29T00:00:00Z"]
        );
        assert_eq!(
            times("0 0 0 1 1 * 2098,2101", "UTC", "2027-01-01T00:00:00Z", 3),
            ["2098-01-01T00:00:00Z", "2101-01-01T00:00:00Z"]
        );
        assert_eq!(
            times("0 0 0 1 1 * *", "UTC", "2027-06-01T00:00:00Z", 1),
            ["2028-01-01T00:00:00Z"]
        );
    }

    #[test]
    fn macros() {
        let after = "2027-03-01T10:15:00Z";
        for (m, expected) in [
            ("@yearly", "2028-01-01T00:00:00Z"),
            ("@annually", "2028-01-01T00:00:00Z"),
            ("@monthly", "2027-04-01T00:00:00Z"),
            ("@weekly", "2027-03-07T00:00:00Z"),
            ("@daily", "2027-03-02T00:00:00Z"),
            ("@midnight", "2027-03-02T00:00:00Z"),
            ("@hourly", "2027-03-01T11:00:00Z"),
            ("@DAILY", "2027-03-02T00:00:00Z"),
        ] {
            let s = sched(m, "UTC");
            assert!(!s.has_seconds(), "{m}");
            assert_eq!(s.next_after(at(after)), Some(at(expected)), "{m}");
        }
        // Macros are evaluated in the schedule's zone (CET = UTC+1).
        assert_eq!(
            times("@daily", "Europe/Berlin", "2027-03-01T00:00:00Z", 1),
            ["2027-03-01T23:00:00Z"]
        );
        assert!(cron_err("@reboot").contains("@reboot is not supported"));
        assert!(cron_err("@every 5m").contains("unknown macro"));
        assert!(cron_err("@fortnightly").contains("unknown macro @fortnightly"));
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        let expected = ["2027-01-03T12:00:00Z", "2027-01-10T12:00:00Z"];
        for expr in ["0 12 * * 0", "0 12 * * 7", "0 12 * * SUN", "0 12 * * sun"] {
            assert_eq!(
                times(expr, "UTC", "2027-01-01T00:00:00Z", 2),
                expected,
                "{expr}"
            );
        }
    }

    #[test]
    fn weekday_ranges() {
        // 2027-01-01 is a Friday.
        let mon_fri = [
            "2027-01-04T12:00:00Z",
            "2027-01-05T12:00:00Z",
            "2027-01-06T12:00:00Z",
            "2027-01-07T12:00:00Z",
            "2027-01-08T12:00:00Z",
            "2027-01-11T12:00:00Z",
        ];
        for expr in ["0 12 * * 1-5", "0 12 * * MON-FRI", "0 12 * * mon-fri"] {
            assert_eq!(
                times(expr, "UTC", "2027-01-01T13:00:00Z", 6),
                mon_fri,
                "{expr}"
            );
        }
        let fri_sun = [
            "2027-01-02T12:00:00Z",
            "2027-01-03T12:00:00Z",
            "2027-01-08T12:00:00Z",
        ];
        for expr in ["0 12 * * 5-7", "0 12 * * FRI-SUN", "0 12 * * 5,6,0"] {
            assert_eq!(
                times(expr, "UTC", "2027-01-01T13:00:00Z", 3),
                fri_sun,
                "{expr}"
            );
        }
        assert_eq!(
            times("0 12 * * SAT-SUN", "UTC", "2027-01-01T13:00:00Z", 3),
            [
                "2027-01-02T12:00:00Z",
                "2027-01-03T12:00:00Z",
                "2027-01-09T12:00:00Z"
            ]
        );
    }

    #[test]
    fn month_names_and_steps() {
        assert_eq!(
            times("0 0 1 jan-mar/2 *", "UTC", "2027-01-01T00:00:00Z", 3),
            [
                "2027-03-01T00:00:00Z",
                "2028-01-01T00:00:00Z",
                "2028-03-01T00:00:00Z"
            ]
        );
        assert_eq!(
            times("5/20 * * * *", "UTC", "2027-01-01T00:00:00Z", 4),
            [
                "2027-01-01T00:05:00Z",
                "2027-01-01T00:25:00Z",
                "2027-01-01T00:45:00Z",
                "2027-01-01T01:05:00Z"
            ]
        );
    }

    #[test]
    fn vixie_dom_or_dow() {
        // Both restricted: the 13th OR any Friday (2027-01-01 is a Friday).
        assert_eq!(
            times("0 0 13 * 5", "UTC", "2027-01-01T00:00:00Z", 8),
            [
                "2027-01-08T00:00:00Z",
                "2027-01-13T00:00:00Z",
                "2027-01-15T00:00:00Z",
                "2027-01-22T00:00:00Z",
                "2027-01-29T00:00:00Z",
                "2027-02-05T00:00:00Z",
                "2027-02-12T00:00:00Z",
                "2027-02-13T00:00:00Z",
            ]
        );
        // Only one restricted: only that one counts.
        assert_eq!(
            times("0 0 13 * *", "UTC", "2027-01-01T00:00:00Z", 2),
            ["2027-01-13T00:00:00Z", "2027-02-13T00:00:00Z"]
        );
        for expr in ["0 0 * * 5", "0 0 ? * FRI"] {
            assert_eq!(
                times(expr, "UTC", "2027-01-01T00:00:00Z", 2),
                ["2027-01-08T00:00:00Z", "2027-01-15T00:00:00Z"],
                "{expr}"
            );
        }
        // `*/10` counts as restricted, so days 1, 11, 21, 31 OR Mondays.
        assert_eq!(
            times("0 0 */10 * 1", "UTC", "2027-01-01T00:00:00Z", 4),
            [
                "2027-01-04T00:00:00Z",
                "2027-01-11T00:00:00Z",
                "2027-01-18T00:00:00Z",
                "2027-01-21T00:00:00Z"
            ]
        );
    }

    // ----- calendar rules -----------------------------------------------------------------

    #[test]
    fn february_29_only_in_leap_years() {
        assert_eq!(
            times("0 0 29 2 *", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]
        );
    }

    #[test]
    fn last_day_of_month() {
        assert_eq!(
            times("0 0 L * *", "UTC", "2027-01-01T00:00:00Z", 4),
            [
                "2027-01-31T00:00:00Z",
                "2027-02-28T00:00:00Z",
                "2027-03-31T00:00:00Z",
                "2027-04-30T00:00:00Z"
            ]
        );
        assert_eq!(
            times("0 0 L * *", "UTC", "2028-02-01T00:00:00Z", 1),
            ["2028-02-29T00:00:00Z"]
        );
        assert_eq!(
            times("0 0 L-2 * *", "UTC", "2027-01-01T00:00:00Z", 3),
            [
                "2027-01-29T00:00:00Z",
                "2027-02-26T00:00:00Z",
                "2027-03-29T00:00:00Z"
            ]
        );
    }

    #[test]
    fn day_31_skips_short_months() {
        assert_eq!(
            times("0 0 31 * *", "UTC", "2027-01-31T00:00:00Z", 4),
            [
                "2027-03-31T00:00:00Z",
                "2027-05-31T00:00:00Z",
                "2027-07-31T00:00:00Z",
                "2027-08-31T00:00:00Z"
            ]
        );
    }

    #[test]
    fn nearest_weekday() {
        // 2027-05-01 is a Saturday: 1W moves forward to Monday the 3rd, 15W (Saturday) back to
        // Friday the 14th.
        assert_eq!(
            times("0 0 1W * *", "UTC", "2027-04-15T00:00:00Z", 1),
            ["2027-05-03T00:00:00Z"]
        );
        assert_eq!(
            times("0 0 15W * *", "UTC", "2027-05-01T00:00:00Z", 1),
            ["2027-05-14T00:00:00Z"]
        );
        // Last weekday: 2027-01-31 and 2027-02-28 are Sundays.
        assert_eq!(
            times("0 0 LW * *", "UTC", "2027-01-01T00:00:00Z", 3),
            [
                "2027-01-29T00:00:00Z",
                "2027-02-26T00:00:00Z",
                "2027-03-31T00:00:00Z"
            ]
        );
    }

    #[test]
    fn last_friday() {
        for expr in ["0 0 * * 5L", "0 0 * * FRIL"] {
            assert_eq!(
                times(expr, "UTC", "2027-01-01T00:00:00Z", 3),
                [
                    "2027-01-29T00:00:00Z",
                    "2027-02-26T00:00:00Z",
                    "2027-03-26T00:00:00Z"
                ],
                "{expr}"
            );
        }
    }

    #[test]
    fn nth_weekday() {
        for expr in ["0 0 * * 1#2", "0 0 * * MON#2"] {
            assert_eq!(
                times(expr, "UTC", "2027-01-01T00:00:00Z", 3),
                [
                    "2027-01-11T00:00:00Z",
                    "2027-02-08T00:00:00Z",
                    "2027-03-08T00:00:00Z"
                ],
                "{expr}"
            );
        }
        // Fifth Sunday (0#5 and 7#5 alike) only exists in some months.
        assert_eq!(
            times("0 0 * * 7#5", "UTC", "2027-01-01T00:00:00Z", 2),
            ["2027-01-31T00:00:00Z", "2027-05-30T00:00:00Z"]
        );
    }

    // ----- time zones and DST -------------------------------------------------------------

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

    // ----- active window ------------------------------------------------------------------

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

    // ----- errors -------------------------------------------------------------------------

    #[test]
    fn field_count_errors() {
        assert_eq!(cron_err("* * *"), "expected 5, 6 or 7 fields, got 3");
        assert_eq!(
            cron_err("* * * * * * * *"),
            "expected 5, 6 or 7 fields, got 8"
        );
        assert_eq!(cron_err("   "), "empty expression");
        assert_eq!(
            ScheduleError::Cron("x".into()).to_string(),
            "invalid cron expression: x"
        );
    }

    #[test]
    fn value_errors() {
        for (expr, msg) in [
            ("60 * * * *", "minute value 60 out of range 0-59"),
            ("* 24 * * *", "hour value 24 out of range 0-23"),
            ("0 0 0 * *", "day-of-month value 0 out of range 1-31"),
            ("0 0 32 * *", "day-of-month value 32 out of range 1-31"),
            ("0 0 * 13 *", "month value 13 out of range 1-12"),
            ("0 0 * * 8", "day-of-week value 8 out of range 0-7"),
            ("60 * * * * *", "second value 60 out of range 0-59"),
            ("0 0 0 1 1 * 2300", "year value 2300 out of range 1970-2199"),
            (
                "*/0 * * * *",
                "invalid step '/0' in minute field: expected a positive number",
            ),
            (
                "5-1 * * * *",
                "minute range '5-1' is reversed: 5 is greater than 1",
            ),
            ("a * * * *", "invalid minute value 'a'"),
            ("1,,2 * * * *", "empty value in minute field"),
            (
                "0 0 * * 1#6",
                "day-of-week occurrence #6 out of range #1-#5 in '1#6'",
            ),
            (
                "0 0 L-31 * *",
                "day-of-month offset L-31 out of range L-0 to L-30",
            ),
            ("0 0 * FOO *", "invalid month value 'FOO'"),
            (
                "99999999999 * * * *",
                "minute value 99999999999 out of range 0-59",
            ),
        ] {
            assert_eq!(cron_err(expr), msg, "{expr}");
        }
        assert!(cron_err("0 0 * * L").contains("needs a weekday"));
    }

    #[test]
    fn never_fires_errors() {
        for expr in ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 0 30 2 * *"] {
            assert!(cron_err(expr).contains("never fires"), "{expr}");
        }
        assert!(cron_err("0 0 0 1 1 * 2000").contains("in the past"));
        // Rare but possible dates are fine: the fifth Monday of February.
        sched("0 0 * 2 1#5", "UTC");
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

    #[test]
    fn rare_schedules_keep_firing_for_years() {
        let exprs = [
            "*/10 * * * * *",
            "0 0 29 2 *",
            "0 0 * 2 1#5",
            "30 2 * * *",
            "0 0 L * 5",
        ];
        for expr in exprs {
            let s = sched(expr, "America/New_York");
            let mut t = at("2021-01-01T00:00:00Z");
            for _ in 0..2_000 {
                let next = s.next_after(t).expect("fires");
                assert!(next > t, "{expr}: {next} does not follow {t}");
                t = next;
            }
        }
    }
}
