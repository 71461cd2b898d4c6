//! The calendar walk: the parsed expression as bit sets, and from a local wall-clock time
//! the next one it matches (dates month by month, times of day by bit scans), up to a
//! horizon year past which nothing new can match.

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike};

use super::MIN_YEAR;

pub(super) fn naive_from_secs(secs: i64) -> Option<NaiveDateTime> {
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

/// A set of small integers (0..256).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Bits([u64; 4]);

impl Bits {
    pub(super) fn insert(&mut self, i: u32) {
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

#[derive(Clone, Debug)]
pub(super) struct Spec {
    pub(super) seconds: Bits,
    pub(super) minutes: Bits,
    pub(super) hours: Bits,
    pub(super) months: Bits,
    /// Years as offsets from `MIN_YEAR`; `None` = any year.
    pub(super) years: Option<Bits>,
    pub(super) dom: DomSpec,
    pub(super) dow: DowSpec,
    pub(super) dom_star: bool,
    pub(super) dow_star: bool,
    /// No `*` or `/` in the second, minute and hour fields (see the DST rules).
    pub(super) fixed_time: bool,
}

#[derive(Clone, Debug, Default)]
pub(super) struct DomSpec {
    /// Bits 1..=31.
    pub(super) days: u32,
    /// Bit n set for `L-n` (`L` is `L-0`), n in 0..=30.
    pub(super) last_minus: u32,
    /// Bit n set for `nW`.
    pub(super) nearest_weekday: u32,
    /// `LW`.
    pub(super) last_weekday: bool,
}

#[derive(Clone, Debug, Default)]
pub(super) struct DowSpec {
    /// Bit 0 = Sunday … bit 6 = Saturday.
    pub(super) days: u8,
    /// `nL`: last such weekday of the month.
    pub(super) last: u8,
    /// `n#k`: bit k (1..=5) of `nth[n]`.
    pub(super) nth: [u8; 7],
}

impl Spec {
    /// Last year worth searching from `from_year`. Without a year field the calendar repeats
    /// every 400 years, and `check_fires` made sure some date matches in any such period.
    pub(super) fn horizon_year(&self, from_year: i32) -> i32 {
        match &self.years {
            Some(bits) => bits.last().map_or(i32::MIN, |i| (i + MIN_YEAR) as i32),
            None => from_year.saturating_add(401),
        }
    }

    /// Reject expressions that never fire from `today` on.
    pub(super) fn check_fires(&self, today: NaiveDate) -> Result<(), String> {
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
    pub(super) fn next_local(&self, wall: i64, horizon: i32) -> Option<i64> {
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

#[cfg(test)]
mod tests {
    use crate::schedule::tests::{at, cron_err, sched, times};

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
