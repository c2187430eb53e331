//! DynamoDB attribute values as JSON, the form `ephemeral_core::mapping` reads and writes.
//!
//! Reading accepts whatever another tool may have written (sets, numbers, maps), so that a
//! surprising item is reported by the rule parser with its field named instead of failing
//! the whole scan. Writing produces only S, N, BOOL, NULL, L and M.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::{Map, Number, Value};

/// S -> string, N -> number, BOOL, NULL -> null, L -> array, SS/NS -> array, M -> object.
/// Binary values cannot be shown as JSON: they become a string saying so (no mapping
/// attribute is binary, so the rule parser then names the field).
pub fn to_json(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::N(n) => number(n),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::L(items) => Value::Array(items.iter().map(to_json).collect()),
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

/// A DynamoDB number as a JSON number: integers exactly, others as f64. A number JSON cannot
/// hold (beyond f64) stays a string rather than silently changing its value.
fn number(text: &str) -> Value {
    if let Ok(i) = text.parse::<i64>() {
        return Value::Number(i.into());
    }
    if let Ok(u) = text.parse::<u64>() {
        return Value::Number(u.into());
    }
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .unwrap_or_else(|| Value::String(text.to_owned()))
}

pub fn item_to_json(item: &HashMap<String, AttributeValue>) -> Map<String, Value> {
    item.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()
}

/// string -> S, number -> N, bool -> BOOL, null -> NULL, array -> L, object -> M.
pub fn from_json(value: &Value) -> AttributeValue {
    match value {
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Null => AttributeValue::Null(true),
        Value::Array(items) => AttributeValue::L(items.iter().map(from_json).collect()),
        Value::Object(map) => AttributeValue::M(item_from_json(map)),
    }
}

pub fn item_from_json(item: &Map<String, Value>) -> HashMap<String, AttributeValue> {
    item.iter()
        .map(|(k, v)| (k.clone(), from_json(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_readable_type_converts() {
        let item: HashMap<String, AttributeValue> = [
            ("s", AttributeValue::S("x".into())),
            ("n", AttributeValue::N("42".into())),
            ("neg", AttributeValue::N("-7".into())),
            ("big", AttributeValue::N("18446744073709551615".into())),
            ("f", AttributeValue::N("1.5".into())),
            ("huge", AttributeValue::N("1e400".into())),
            ("b", AttributeValue::Bool(true)),
            ("z", AttributeValue::Null(true)),
            (
                "l",
                AttributeValue::L(vec![
                    AttributeValue::S("a".into()),
                    AttributeValue::N("1".into()),
                ]),
            ),
            ("ss", AttributeValue::Ss(vec!["a".into(), "b".into()])),
            ("ns", AttributeValue::Ns(vec!["1".into(), "2".into()])),
            (
                "m",
                AttributeValue::M([("k".to_owned(), AttributeValue::S("v".into()))].into()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(
            Value::Object(item_to_json(&item)),
            json!({"s": "x", "n": 42, "neg": -7, "big": 18446744073709551615u64, "f": 1.5,
                   "huge": "1e400", "b": true, "z": null, "l": ["a", 1], "ss": ["a", "b"],
                   "ns": [1, 2], "m": {"k": "v"}})
        );
    }

    #[test]
    fn json_round_trips_through_attribute_values() {
        let v = json!({"pk": "job#a", "subnets": ["subnet-1"], "n": 3, "ok": false, "none": null,
                       "m": {"x": [1, "y"]}});
        let item = v.as_object().unwrap();
        assert_eq!(item_to_json(&item_from_json(item)), *item);
        assert!(matches!(from_json(&json!(["a"])), AttributeValue::L(_)));
    }
}
