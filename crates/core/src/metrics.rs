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

/// A metric one function emits: its `Function` dimension and its name, as alarms name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub function: &'static str,
    pub name: &'static str,
}

impl Metric {
    /// The EMF line counting `value` of this metric.
    pub fn count(self, value: u64, timestamp_ms: u64) -> String {
        emf_count(self.function, self.name, value, timestamp_ms)
    }

    /// The EMF line with `value` of this metric in `unit`.
    pub fn value(self, value: u64, unit: &str, timestamp_ms: u64) -> String {
        emf_value(self.function, self.name, value, unit, timestamp_ms)
    }
}

macro_rules! alarmed_metrics {
    ($($(#[$doc:meta])* $id:ident = $function:literal, $name:literal;)*) => {
        /// The metrics `template.yaml`'s alarms watch; each is emitted through its constant
        /// here, and a contract test checks the template's alarms against [`ALARMED`] (no
        /// alarm on a metric nobody writes).
        pub mod alarmed {
            use super::Metric;
            $($(#[$doc])* pub const $id: Metric = Metric { function: $function, name: $name };)*
        }
        /// Every alarmed metric, with its constant's name (for the contract test).
        pub const ALARMED: &[(&str, Metric)] = &[$((stringify!($id), alarmed::$id)),*];
    };
}

alarmed_metrics! {
    /// Nothing durable took an authentic hook, or no secrets to authenticate with (503).
    HOOKS_FAILED = "webhook", "HooksFailed";
    /// An authentic hook could not be used and was set aside.
    HOOKS_DEAD_LETTERED = "webhook", "HooksDeadLettered";
    /// The jobs table or the bus failed for a hook: it went to the intake fallback queue.
    INTAKE_FALLBACKS = "webhook", "IntakeFallbacks";
    /// A provision step failed (recorded on the job's item).
    LAUNCH_FAILURES = "ec2-provision", "LaunchFailures";
    /// A finished hook GitLab did not confirm: nothing was destroyed.
    TEARDOWNS_UNCONFIRMED = "ec2-teardown", "TeardownsUnconfirmed";
    /// Instances the reaper killed: something outlived its job.
    INSTANCES_REAPED = "reaper", "InstancesReaped";
    /// The oldest job GitLab lists as pending, as the reconciler saw it.
    OLDEST_PENDING_AGE = "reconciler", "OldestPendingAge";
    /// Jobs the reconciler stopped trying to provision.
    ATTEMPTS_GIVEN_UP = "reconciler", "AttemptsGivenUp";
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
