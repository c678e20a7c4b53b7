//! Wall-clock time as text, without a calendar dependency.

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (the proleptic Gregorian calendar, as `date -u` prints it); with
/// `millis`, `YYYY-MM-DDTHH:MM:SS.mmmZ` of the milliseconds it adds.
pub fn utc_rfc3339(secs: u64, millis: Option<u32>) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac = millis.map(|m| format!(".{:03}", m.min(999))).unwrap_or_default();
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_match_the_calendar() {
        assert_eq!(utc_rfc3339(0, None), "1970-01-01T00:00:00Z");
        assert_eq!(utc_rfc3339(951_782_400, None), "2000-02-29T00:00:00Z");
        assert_eq!(utc_rfc3339(1_796_460_000, Some(7)), "2026-12-05T08:40:00.007Z");
        assert_eq!(utc_rfc3339(4_107_542_399, None), "2100-02-28T23:59:59Z");
    }
}
