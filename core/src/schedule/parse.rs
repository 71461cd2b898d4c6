//! Parsing a cron expression into its bit sets.
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

use super::calendar::{Bits, DomSpec, DowSpec, Spec};
use super::{MAX_YEAR, MIN_YEAR};

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
pub(super) fn parse_expression(expr: &str) -> Result<(Spec, bool), String> {
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
    use chrono_tz::Tz;

    use crate::schedule::ScheduleError;
    use crate::schedule::tests::{at, cron_err, sched, times};

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
}
