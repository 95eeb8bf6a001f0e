//! UTC timestamps from microseconds since the Unix epoch (the unit of
//! `change.commit-time-us`), without a calendar dependency.

/// Microseconds since the Unix epoch, now (the host's wall clock, `wasi:clocks`).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// (year, month, day, hour, minute, second, microsecond) in UTC of `us` µs since the
/// Unix epoch (proleptic Gregorian; H. Hinnant's `civil_from_days`).
pub fn civil(us: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = us.div_euclid(86_400_000_000);
    let rem = us.rem_euclid(86_400_000_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let secs = rem / 1_000_000;
    (
        y,
        m,
        d,
        (secs / 3600) as u32,
        (secs / 60 % 60) as u32,
        (secs % 60) as u32,
        (rem % 1_000_000) as u32,
    )
}

/// RFC 3339 in UTC with microseconds: `2024-01-02T03:04:05.123456Z`.
pub fn rfc3339(us: i64) -> String {
    let (y, m, d, h, mi, s, f) = civil(us);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{f:06}Z")
}

/// SQL `DATETIME` text in UTC with microseconds: `2024-01-02 03:04:05.123456`.
pub fn sql_datetime(us: i64) -> String {
    let (y, m, d, h, mi, s, f) = civil(us);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}.{f:06}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(sql_datetime(-1), "1969-12-31 23:59:59.999999");
    }
}
