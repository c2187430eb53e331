//! The shape of our log lines, as Lambda's JSON log format and log-level filtering read them:
//! one JSON object a line, a `timestamp` in RFC 3339 (else Lambda files the line as INFO,
//! whatever its level), a `level` Lambda knows, a `message`. The lines come from the subscriber
//! `init_logging` installs, pointed at memory instead of stdout.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ephemeral_aws::json_subscriber;
use serde_json::{Map, Value};

/// Lambda's application log levels.
const LAMBDA_LEVELS: [&str; 6] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"];

#[derive(Clone, Default)]
struct Memory(Arc<Mutex<Vec<u8>>>);

impl io::Write for Memory {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the functions' subscriber writes, at `level`, for an info, an error and a debug event.
fn lines_at(level: tracing::Level) -> Vec<Map<String, Value>> {
    let memory = Memory::default();
    let writer = memory.clone();
    let subscriber = json_subscriber(level, move || writer.clone());
    tracing::subscriber::with_default(subscriber, || {
        tracing::info!(delivery_id = "msg_1", "hook accepted");
        tracing::error!(error = "bus unavailable", "could not publish the event");
        tracing::debug!("only at DEBUG");
    });
    let text = String::from_utf8(memory.0.lock().unwrap().clone()).unwrap();
    assert!(text.ends_with('\n'), "{text:?}");
    text.lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => object,
            other => panic!("not one JSON object: {line:?} ({other:?})"),
        })
        .collect()
}

/// Unix seconds of an RFC 3339 `date-time` (section 5.6: `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`,
/// with the calendar's month lengths and leap years), or `None` if `s` is not one.
fn rfc3339_unix_seconds(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |at: usize, len: usize| -> Option<i64> {
        let digits = b.get(at..at + len)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if !separators.iter().all(|&(at, c)| b.get(at) == Some(&c)) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let mut rest = s.get(19..)?;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes() {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(s.len() - 5, 2)?, num(s.len() - 2, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            (h * 3600 + m * 60) * if *sign == b'-' { -1 } else { 1 }
        }
        _ => return None,
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        28 + i64::from(leap),
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let valid = (1..=12).contains(&month)
        && (1..=month_days[(month - 1).clamp(0, 11) as usize]).contains(&day)
        && hour <= 23
        && minute <= 59
        && second <= 60;
    if !valid {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * m + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

#[test]
fn the_rfc3339_check_accepts_only_rfc3339() {
    let good = [
        ("1970-01-01T00:00:00Z", 0),
        ("2024-11-02T16:51:31.587199Z", 1_730_566_291),
        ("2000-02-29T23:59:60Z", 951_868_800),
        ("1970-01-01T00:00:00+01:00", -3600),
    ];
    for (text, seconds) in good {
        assert_eq!(rfc3339_unix_seconds(text), Some(seconds), "{text}");
    }
    let bad = [
        "",
        "1730566291",
        "2024-11-02 16:51:31Z",
        "2024-11-02T16:51:31",
        "2024-11-02T16:51:31.Z",
        "2024-11-02T16:51:31.5z",
        "2024-11-02T16:51:31+0100",
        "2024-11-02T24:00:00Z",
        "2023-02-29T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-11-2T16:51:31Z",
        "2024-11-02T16:51:31Z ",
    ];
    for text in bad {
        assert_eq!(rfc3339_unix_seconds(text), None, "{text}");
    }
}

#[test]
fn each_line_is_one_json_object_with_an_rfc3339_timestamp_and_a_lambda_level() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lines = lines_at(tracing::Level::INFO);
    assert_eq!(lines.len(), 2, "the debug event is below INFO: {lines:#?}");
    for (line, (level, message)) in lines.iter().zip([
        ("INFO", "hook accepted"),
        ("ERROR", "could not publish the event"),
    ]) {
        let timestamp = line["timestamp"].as_str().expect("a timestamp string");
        let at = rfc3339_unix_seconds(timestamp)
            .unwrap_or_else(|| panic!("not RFC 3339: {timestamp:?}"));
        assert!((at - now).abs() < 300, "{timestamp} is not now ({now})");
        assert!(LAMBDA_LEVELS.contains(&line["level"].as_str().unwrap_or_default()));
        assert_eq!(line["level"], level);
        assert_eq!(line["message"], message);
    }
    // Fields sit at the top level, beside the message; no target or span noise.
    assert_eq!(lines[0]["delivery_id"], "msg_1");
    assert_eq!(lines[1]["error"], "bus unavailable");
    for line in &lines {
        for noise in ["fields", "target", "span"] {
            assert!(!line.contains_key(noise), "{noise} in {line:?}");
        }
    }
}

#[test]
fn at_warn_and_error_the_error_line_is_still_written() {
    for level in [tracing::Level::WARN, tracing::Level::ERROR] {
        let lines = lines_at(level);
        assert_eq!(lines.len(), 1, "{level}: {lines:#?}");
        assert_eq!(lines[0]["level"], "ERROR");
        assert!(rfc3339_unix_seconds(lines[0]["timestamp"].as_str().unwrap()).is_some());
    }
}
