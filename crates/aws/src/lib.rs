//! Shared by the function crates: JSON logging as Lambda expects it, SDK errors turned into the
//! core's [`PortError`], and DynamoDB items as JSON (the core parses items without the SDK).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use ephemeral_core::secrets::Secret;
use ephemeral_core::webhook::PortError;
use serde_json::{Map, Number, Value};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The wall clock, Unix milliseconds: what every function stamps its decisions with (the core
/// takes the time as an argument and never reads a clock).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// JSON log lines on stdout (see [`json_subscriber`]), at the level Lambda's advanced logging
/// controls ask for (`AWS_LAMBDA_LOG_LEVEL`), else `RUST_LOG`, else INFO.
pub fn init_logging() {
    let level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|l| parse_level(&l))
        .unwrap_or(tracing::Level::INFO);
    json_subscriber(level, std::io::stdout).init();
}

/// A level name as Lambda or `RUST_LOG` spells it. Lambda's FATAL has no tracing level: ERROR
/// is the nearest (Lambda then drops what is not FATAL itself).
fn parse_level(name: &str) -> Option<tracing::Level> {
    if name.trim().eq_ignore_ascii_case("fatal") {
        return Some(tracing::Level::ERROR);
    }
    name.trim().parse().ok()
}

/// The subscriber every function logs through, writing to `writer`: one JSON object a line,
/// with `timestamp` (RFC 3339 in UTC, microseconds: `2026-11-23T19:00:00.123456Z`), `level`
/// (TRACE, DEBUG, INFO, WARN or ERROR, names Lambda's log-level filtering knows), `message`
/// and the event's fields at the top level.
///
/// The timestamp matters: with the JSON log format Lambda files a line without a valid RFC
/// 3339 `timestamp` as INFO whatever its `level`, so at LogLevel WARN or ERROR it would drop
/// our error lines.
pub fn json_subscriber<W>(
    level: tracing::Level,
    writer: W,
) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .with_max_level(level)
        .with_target(false)
        .with_current_span(false)
        .flatten_event(true)
        .with_writer(writer)
        .finish()
}

/// An SDK error as a [`PortError`]: the service's code and message, which never include our
/// request's values (no secrets, no item contents).
pub fn port_error<E>(what: &str, e: E) -> PortError
where
    E: std::error::Error + Send + Sync + 'static,
{
    PortError(format!(
        "{what}: {}",
        aws_sdk_dynamodb::error::DisplayErrorContext(e)
    ))
}

/// A SecureString parameter's value (trimmed), read at cold start by the functions that need
/// a token. The error names the parameter, never a value; an empty value is an error.
pub async fn read_secret(ssm: &aws_sdk_ssm::Client, name: &str) -> Result<Secret, PortError> {
    let out = ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| port_error(&format!("reading SSM parameter {name}"), e))?;
    out.parameter()
        .and_then(|p| p.value())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(Secret::new)
        .ok_or_else(|| PortError(format!("SSM parameter {name} has no value")))
}

/// The drain switch ([`ephemeral_core::drain`]): the jobs table's control item
/// ([`ephemeral_core::jobs_table::DRAIN_KEY`]), read consistently. The provision step reads
/// it before it starts a runner and the reconciler before it counts free slots.
pub async fn read_drain(
    client: &aws_sdk_dynamodb::Client,
    jobs_table: &str,
) -> Result<Option<ephemeral_core::drain::Drain>, PortError> {
    use ephemeral_core::jobs_table::{DRAIN_KEY, KEY, drain_of};
    let out = client
        .get_item()
        .table_name(jobs_table)
        .key(KEY, AttributeValue::S(DRAIN_KEY.to_owned()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| port_error("DynamoDB GetItem (jobs, the drain switch)", e))?;
    Ok(drain_of(
        out.item().map(|i| Value::Object(item_to_json(i))).as_ref(),
    ))
}

/// A DynamoDB attribute as JSON: S as string, N as number (string if it does not fit), BOOL,
/// NULL, L/SS/NS as arrays, M as object. Reading accepts whatever another tool may have
/// written, so a surprising item is reported by the rule parser with its field named instead
/// of failing a whole scan. Binary values (no table of ours has any) become a string saying so.
pub fn attribute_to_json(value: &AttributeValue) -> Value {
    let number = |n: &str| {
        n.parse::<u64>()
            .map(Value::from)
            .or_else(|_| n.parse::<i64>().map(Value::from))
            .or_else(|_| {
                n.parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map(Value::Number)
                    .ok_or(())
            })
            .unwrap_or_else(|()| Value::String(n.to_owned()))
    };
    match value {
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::N(n) => number(n),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::L(items) => Value::Array(items.iter().map(attribute_to_json).collect()),
        AttributeValue::Ss(items) => {
            Value::Array(items.iter().cloned().map(Value::String).collect())
        }
        AttributeValue::Ns(items) => Value::Array(items.iter().map(|n| number(n)).collect()),
        AttributeValue::M(map) => Value::Object(item_to_json(map)),
        AttributeValue::B(b) => Value::String(format!("<binary, {} bytes>", b.as_ref().len())),
        AttributeValue::Bs(items) => Value::String(format!("<binary set, {} values>", items.len())),
        _ => Value::String("<attribute type unknown to this tool>".into()),
    }
}

pub fn item_to_json(item: &HashMap<String, AttributeValue>) -> Map<String, Value> {
    item.iter()
        .map(|(k, v)| (k.clone(), attribute_to_json(v)))
        .collect()
}

/// JSON as a DynamoDB attribute: strings S, numbers N, arrays L, objects M.
pub fn json_to_attribute(value: &Value) -> AttributeValue {
    match value {
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Null => AttributeValue::Null(true),
        Value::Array(items) => AttributeValue::L(items.iter().map(json_to_attribute).collect()),
        Value::Object(map) => AttributeValue::M(json_to_item(map)),
    }
}

pub fn json_to_item(item: &Map<String, Value>) -> HashMap<String, AttributeValue> {
    item.iter()
        .map(|(k, v)| (k.clone(), json_to_attribute(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_parse_as_lambda_and_rust_log_spell_them() {
        use tracing::Level;
        for (name, level) in [
            ("TRACE", Level::TRACE),
            ("debug", Level::DEBUG),
            ("INFO", Level::INFO),
            ("WARN", Level::WARN),
            ("ERROR", Level::ERROR),
            ("FATAL", Level::ERROR),
        ] {
            assert_eq!(parse_level(name), Some(level), "{name}");
        }
        assert_eq!(parse_level("info,aws=warn"), None);
    }

    #[test]
    fn items_round_trip_through_json() {
        let v = json!({"pk": "job#b", "n": 18446744073709551615u64, "neg": -3, "f": 1.5,
                       "l": ["a", 1], "m": {"x": true, "y": null}});
        let item = json_to_item(v.as_object().unwrap());
        assert_eq!(Value::Object(item_to_json(&item)), v);
        let ss = AttributeValue::Ss(vec!["subnet-1".into()]);
        assert_eq!(attribute_to_json(&ss), json!(["subnet-1"]));
    }
}
