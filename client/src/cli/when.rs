//! `--not-before TIME`: the forms people type, turned into ms since the epoch.
//!
//! Accepted: a delay from now (`+90m`, `+2h 30m`, `+45s`); an RFC 3339 time with `Z` or an offset
//! (`2026-12-24T06:00:00Z`, `2026-12-24T07:00+01:00`); a local date and time (`2026-12-24 06:00`,
//! seconds optional); a local time of day (`06:00`: the next one, today or tomorrow).

/// Parses `s` as of now.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    parse_at(s, now.as_millis() as u64, &local_to_utc)
}

/// Parses `s` at `now_ms`, with `local(date, time)` turning a local wall-clock time into seconds since
/// the epoch (a parameter, so tests do not depend on the machine's time zone).
pub fn parse_at(
    s: &str,
    now_ms: u64,
    local: &dyn Fn(Date, Time) -> Option<i64>,
) -> Result<u64, String> {
    let s = s.trim();
    let bad = |why: &str| {
        format!("'{s}' is not a time ({why}); use 2026-12-24T06:00:00Z, 2026-12-24 06:00, 06:00 or +90m")
    };
    if let Some(delay) = s.strip_prefix('+') {
        let d = humantime::parse_duration(delay.trim()).map_err(|e| bad(&e.to_string()))?;
        return Ok(now_ms.saturating_add(d.as_millis() as u64));
    }
    let secs = if let Some((date, rest)) = s.split_once(['T', 't', ' ']) {
        let date = Date::parse(date).ok_or_else(|| bad("the date is not YYYY-MM-DD"))?;
        let (clock, offset) = split_offset(rest.trim()).ok_or_else(|| bad("bad offset"))?;
        let time = Time::parse(clock).ok_or_else(|| bad("the time is not HH:MM[:SS]"))?;
        match offset {
            Some(off) => utc_seconds(date, time) - off,
            None => local(date, time).ok_or_else(|| bad("no such local time"))?,
        }
    } else {
        let time = Time::parse(s).ok_or_else(|| bad("the time is not HH:MM[:SS]"))?;
        // The next such time of day: today's, or tomorrow's if it has passed.
        let today = Date::of_local(now_ms / 1000).ok_or_else(|| bad("no local date"))?;
        let t = local(today, time).ok_or_else(|| bad("no such local time"))?;
        if t * 1000 > now_ms as i64 {
            t
        } else {
            local(today.next(), time).ok_or_else(|| bad("no such local time"))?
        }
    };
    u64::try_from(secs)
        .map(|s| s * 1000)
        .map_err(|_| bad("before 1970"))
}

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    /// Year.
    pub y: i64,
    /// Month, 1-12.
    pub m: u32,
    /// Day, 1-31.
    pub d: u32,
}

/// A time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    /// Hour, 0-23.
    pub h: u32,
    /// Minute.
    pub min: u32,
    /// Second.
    pub s: u32,
}

impl Date {
    fn parse(s: &str) -> Option<Date> {
        let mut it = s.split('-');
        let (y, m, d) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || y.len() != 4 {
            return None;
        }
        let date = Date {
            y: y.parse().ok()?,
            m: m.parse().ok()?,
            d: d.parse().ok()?,
        };
        ((1..=12).contains(&date.m) && (1..=days_in_month(date.y, date.m)).contains(&date.d))
            .then_some(date)
    }

    /// The local date at `secs` since the epoch.
    fn of_local(secs: u64) -> Option<Date> {
        let t = libc::time_t::try_from(secs).ok()?;
        // SAFETY: localtime_r only writes the tm we own; both pointers are valid for the call.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        ok.then(|| Date {
            y: i64::from(tm.tm_year) + 1900,
            m: (tm.tm_mon + 1) as u32,
            d: tm.tm_mday as u32,
        })
    }

    fn next(self) -> Date {
        if self.d < days_in_month(self.y, self.m) {
            Date {
                d: self.d + 1,
                ..self
            }
        } else if self.m < 12 {
            Date {
                m: self.m + 1,
                d: 1,
                ..self
            }
        } else {
            Date {
                y: self.y + 1,
                m: 1,
                d: 1,
            }
        }
    }
}

impl Time {
    fn parse(s: &str) -> Option<Time> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| (p.len() == 2).then(|| p.parse::<u32>().ok()).flatten();
        let t = match parts.as_slice() {
            [h, m] => Time {
                h: num(h)?,
                min: num(m)?,
                s: 0,
            },
            [h, m, sec] => Time {
                h: num(h)?,
                min: num(m)?,
                s: num(sec)?,
            },
            _ => return None,
        };
        (t.h < 24 && t.min < 60 && t.s < 60).then_some(t)
    }
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `HH:MM[:SS]` and its `Z` / `+HH:MM` / `-HH:MM` offset in seconds east of UTC (None: local time).
fn split_offset(s: &str) -> Option<(&str, Option<i64>)> {
    if let Some(clock) = s.strip_suffix(['Z', 'z']) {
        return Some((clock, Some(0)));
    }
    match s.rfind(['+', '-']) {
        Some(i) => {
            let (clock, off) = s.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let t = Time::parse(&off[1..])?;
            Some((clock, Some(sign * i64::from(t.h * 3600 + t.min * 60))))
        }
        None => Some((s, None)),
    }
}

/// Seconds since the epoch of a UTC date and time (days from the civil calendar, H. Hinnant's method).
fn utc_seconds(d: Date, t: Time) -> i64 {
    let y = if d.m <= 2 { d.y - 1 } else { d.y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(d.m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d.d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(t.h * 3600 + t.min * 60 + t.s)
}

/// A local wall-clock time as seconds since the epoch, by the C library's time zone rules (TZ,
/// /etc/localtime). None for a time that does not exist locally.
pub fn local_to_utc(d: Date, t: Time) -> Option<i64> {
    // SAFETY: mktime reads and normalises the tm we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = i32::try_from(d.y - 1900).ok()?;
    tm.tm_mon = d.m as i32 - 1;
    tm.tm_mday = d.d as i32;
    tm.tm_hour = t.h as i32;
    tm.tm_min = t.min as i32;
    tm.tm_sec = t.s as i32;
    tm.tm_isdst = -1;
    let secs = unsafe { libc::mktime(&mut tm) };
    (secs != -1).then_some(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "local" zone two hours east of UTC, for the tests.
    fn plus2(d: Date, t: Time) -> Option<i64> {
        Some(utc_seconds(d, t) - 7200)
    }

    const NOW: u64 = 1_796_000_000_000; // 2026-11-30T...Z

    #[test]
    fn utc_and_offsets() {
        assert_eq!(parse_at("1970-01-01T00:00:00Z", NOW, &plus2), Ok(0));
        assert_eq!(
            parse_at("2026-12-24T06:00:00Z", NOW, &plus2),
            Ok(1_798_092_000_000)
        );
        assert_eq!(
            parse_at("2026-12-24T07:00+01:00", NOW, &plus2),
            Ok(1_798_092_000_000)
        );
        assert_eq!(
            parse_at("2026-12-24T01:30-04:30", NOW, &plus2),
            Ok(1_798_092_000_000)
        );
        assert_eq!(
            parse_at("2026-12-24 08:00", NOW, &plus2),
            Ok(1_798_092_000_000),
            "local time"
        );
    }

    #[test]
    fn delays_and_times_of_day() {
        assert_eq!(parse_at("+90m", NOW, &plus2), Ok(NOW + 5_400_000));
        assert_eq!(parse_at("+2h 30m", NOW, &plus2), Ok(NOW + 9_000_000));
        let t = parse_at("06:00", NOW, &plus2).unwrap();
        assert!(t > NOW && t <= NOW + 86_400_000, "the next 06:00");
        assert_eq!((t / 1000 + 7200) % 86_400, 6 * 3600, "06:00 local");
    }

    #[test]
    fn nonsense_is_refused_with_the_forms() {
        for bad in [
            "tomorrow",
            "2026-13-01 00:00",
            "2026-02-30 00:00",
            "25:00",
            "+soon",
            "6:00",
        ] {
            let e = parse_at(bad, NOW, &plus2).unwrap_err();
            assert!(
                e.contains("is not a time") && e.contains("+90m"),
                "{bad}: {e}"
            );
        }
        assert!(
            parse_at("2024-02-29 00:00", NOW, &plus2).is_ok(),
            "a leap day"
        );
    }
}
