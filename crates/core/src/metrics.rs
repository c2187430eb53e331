//! CloudWatch metrics as Embedded Metric Format (EMF) log lines: one JSON object on stdout,
//! turned into metrics by CloudWatch Logs, with no API call and no SDK.

use serde_json::{Map, Value, json};

/// Namespace of every metric the product emits.
pub const NAMESPACE: &str = "EphemeralRunners";

/// One EMF line counting `value` of `metric` for `function`.
pub fn emf_count(function: &str, metric: &str, value: u64, timestamp_ms: u64) -> String {
    emf_value(function, metric, value, "Count", timestamp_ms)
}

/// One EMF line with `value` of `metric` in `unit` (a CloudWatch unit: `Count`,
/// `Milliseconds`, ...) for `function`.
pub fn emf_value(
    function: &str,
    metric: &str,
    value: u64,
    unit: &str,
    timestamp_ms: u64,
) -> String {
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Function"]],
                "Metrics": [{"Name": metric, "Unit": unit}],
            }],
        }),
    );
    root.insert("Function".into(), Value::from(function));
    root.insert(metric.into(), Value::from(value));
    Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_line_has_the_metric_at_top_level() {
        let line = emf_count("webhook", "HooksDeadLettered", 1, 42);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["HooksDeadLettered"], 1);
        assert_eq!(v["Function"], "webhook");
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "HooksDeadLettered"
        );
        assert_eq!(v["_aws"]["Timestamp"], 42);
        let latency: Value = serde_json::from_str(&emf_value(
            "ec2-provision",
            "HookToLaunch",
            812,
            "Milliseconds",
            1,
        ))
        .unwrap();
        assert_eq!(latency["HookToLaunch"], 812);
        assert_eq!(
            latency["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"],
            "Milliseconds"
        );
    }
}
