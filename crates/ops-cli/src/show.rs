//! Output helpers: aligned tables (`runner-mappings`' own), JSON, times and ages.

use serde_json::Value;

use crate::Outcome;

pub use mapping_cli::cli::columns;

pub fn print_json(out: &mut Outcome, value: &Value) {
    out.stdout
        .push_str(&serde_json::to_string_pretty(value).expect("JSON values serialize"));
    out.stdout.push('\n');
}

/// A table with a header row, or `none` when there are no rows.
pub fn table(out: &mut Outcome, header: &[&str], rows: Vec<Vec<String>>) {
    if rows.is_empty() {
        out.stdout.push_str("  none\n");
        return;
    }
    let mut all = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    all.extend(rows);
    for line in columns(&all).lines() {
        out.stdout.push_str("  ");
        out.stdout.push_str(line);
        out.stdout.push('\n');
    }
}

pub fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `2026-12-01T10:00:00Z` for ms since the epoch (UTC, to the second).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// How long ago, roughly: `42s`, `5m 3s`, `2h 4m`, `3d 2h`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `2026-12-01T10:00:00Z (5m 3s ago)`.
pub fn when(ms: u64, now_ms: u64) -> String {
    format!("{} ({} ago)", utc(ms), age(now_ms.saturating_sub(ms)))
}

pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_460_400_000), "2026-11-23T19:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(303_000), "5m 3s");
        assert_eq!(age(7_440_000), "2h 4m");
        assert_eq!(age(266_400_000), "3d 2h");
    }
}
