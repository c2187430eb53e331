//! CloudWatch metrics as Embedded Metric Format (EMF) log lines: one JSON object on stdout,
//! turned into metrics by CloudWatch Logs, with no API call and no SDK.

use serde_json::{Map, Value, json};

/// Namespace of every metric the product emits.
pub const NAMESPACE: &str = "EphemeralRunners";

/// The dimension every metric has: the function that emits it.
pub const FUNCTION_DIMENSION: &str = "Function";

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
    emf_line(function, &[], metric, value, unit, timestamp_ms)
}

/// One EMF line with `value` of `metric` in `unit` for `function`; with `dimensions`
/// (name, value), it is published twice: under `Function` alone (every value at once, so a
/// percentile covers them all) and under `Function` and all of `dimensions`.
fn emf_line(
    function: &str,
    dimensions: &[(&str, &str)],
    metric: &str,
    value: u64,
    unit: &str,
    timestamp_ms: u64,
) -> String {
    let mut sets = vec![json!([FUNCTION_DIMENSION])];
    if !dimensions.is_empty() {
        let mut all = vec![FUNCTION_DIMENSION];
        all.extend(dimensions.iter().map(|(name, _)| *name));
        sets.push(json!(all));
    }
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": sets,
                "Metrics": [{"Name": metric, "Unit": unit}],
            }],
        }),
    );
    root.insert(FUNCTION_DIMENSION.into(), Value::from(function));
    for (name, value) in dimensions {
        root.insert((*name).into(), Value::from(dimension_value(value)));
    }
    root.insert(metric.into(), Value::from(value));
    Value::Object(root).to_string()
}

/// CloudWatch takes dimension values of 1 to 1024 ASCII characters, not all whitespace, with no
/// control character, and drops the metric of an EMF line with another: a job name or tag
/// in a route (`route_matched`) may be anything, so the rest becomes `?`, and an empty value
/// `unknown`.
fn dimension_value(value: &str) -> String {
    let mut clean: String = value
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .take(1024)
        .collect();
    if clean.trim().is_empty() {
        clean = "unknown".into();
    }
    clean
}

/// A metric one function emits: its `Function` dimension and its name, as alarms and the
/// dashboard name it, and the further dimensions it is also published under (none for most).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    pub function: &'static str,
    pub name: &'static str,
    /// Published under `Function` alone and under `Function` with all of these.
    pub dimensions: &'static [&'static str],
}

impl Metric {
    /// The EMF line counting `value` of this metric.
    pub fn count(self, value: u64, timestamp_ms: u64) -> String {
        self.value(value, "Count", timestamp_ms)
    }

    /// The EMF line with `value` of this metric in `unit`.
    pub fn value(self, value: u64, unit: &str, timestamp_ms: u64) -> String {
        debug_assert!(self.dimensions.is_empty(), "{}: use value_by", self.name);
        emf_value(self.function, self.name, value, unit, timestamp_ms)
    }

    /// The EMF line with `value` of this metric in `unit`, with a value for each of its
    /// [`Self::dimensions`], in their order.
    pub fn value_by(self, values: &[&str], value: u64, unit: &str, timestamp_ms: u64) -> String {
        assert_eq!(
            values.len(),
            self.dimensions.len(),
            "{}: one value per dimension {:?}",
            self.name,
            self.dimensions
        );
        let dimensions: Vec<(&str, &str)> = self
            .dimensions
            .iter()
            .copied()
            .zip(values.iter().copied())
            .collect();
        emf_line(
            self.function,
            &dimensions,
            self.name,
            value,
            unit,
            timestamp_ms,
        )
    }
}

macro_rules! metric_set {
    (
        $(#[$module_doc:meta])* mod $module:ident;
        $(#[$all_doc:meta])* const $all:ident;
        $($(#[$doc:meta])* $id:ident = $function:literal, $name:literal $([$($dimension:literal),+])?;)*
    ) => {
        $(#[$module_doc])*
        pub mod $module {
            use super::Metric;
            $($(#[$doc])* pub const $id: Metric = Metric {
                function: $function,
                name: $name,
                dimensions: &[$($($dimension),+)?],
            };)*
        }
        $(#[$all_doc])*
        pub const $all: &[(&str, Metric)] = &[$((stringify!($id), $module::$id)),*];
    };
}

metric_set! {
    /// The metrics `template.yaml`'s alarms watch; each is emitted through its constant
    /// here, and a contract test checks the template's alarms against [`ALARMED`] (no
    /// alarm on a metric nobody writes).
    mod alarmed;
    /// Every alarmed metric, with its constant's name (for the contract test).
    const ALARMED;
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
    /// Every pass: pending jobs waiting for a slot under an instance cap, not started (the
    /// caps are full; alarmed when above 0 for `AtCapAlarmMinutes`).
    JOBS_WAITING_FOR_SLOT = "reconciler", "JobsWaitingForSlot";
}

metric_set! {
    /// The metrics the stack's dashboard (`template.yaml`, `Dashboard`) shows besides the
    /// alarmed ones; a contract test checks that every metric the dashboard names is here or
    /// in [`alarmed`] with the same dimensions, that each of these is on the dashboard, and
    /// that each is emitted.
    mod charted;
    /// Every charted metric, with its constant's name (for the contract test).
    const CHARTED;
    /// A job hook was published to the bus.
    HOOKS_FORWARDED = "webhook", "HooksForwarded";
    /// A redelivery of a hook already forwarded.
    HOOKS_DUPLICATE = "webhook", "HooksDuplicate";
    /// A redelivery while the first is still being forwarded.
    HOOKS_IN_FLIGHT = "webhook", "HooksInFlight";
    /// Authentic, but nothing to forward.
    HOOKS_IGNORED = "webhook", "HooksIgnored";
    /// Authentication failed (401).
    HOOKS_UNAUTHORIZED = "webhook", "HooksUnauthorized";
    /// A job mapped to EC2 (timestamped at the hook's receipt).
    ROUTED_TO_EC2 = "mapper", "RoutedToEc2";
    /// A job mapped to LAMBDA (timestamped at the hook's receipt).
    ROUTED_TO_LAMBDA = "mapper", "RoutedToLambda";
    /// GitLab reports the job not pending: nothing provisioned.
    SKIPPED_NOT_PENDING = "mapper", "SkippedNotPending";
    /// An instance launched for a job (crates/fleet emits it by name).
    RUNNERS_LAUNCHED = "ec2-provision", "RunnersLaunched";
    /// Every reaper pass: slots held by jobs with no live instance, given back (crates/fleet
    /// emits it by name).
    LEAKED_SLOTS_GIVEN_BACK = "reaper", "LeakedSlotsGivenBack";
    /// Every reconciler pass: attempts it started.
    JOBS_RECONCILED = "reconciler", "JobsReconciled";
    /// Every reconciler pass: the EC2 runners of ours the runner registry holds (created,
    /// not torn down yet: one instance each, or an orphan the reaper removes).
    RUNNERS_REGISTERED = "reconciler", "RunnersRegistered";
    /// GitLab's `queued_duration` of a job, in ms, from its first running hook: how long it
    /// waited for a runner (the number users judge us by). `Route` is the mapping item that
    /// matched (`route_matched` on the job's item, or `default`), `Executor` its type
    /// (`route_type`: `EC2`, `LAMBDA`); `unknown` when the item holds no route.
    PICKUP_LATENCY = "router", "PickupLatency" ["Route", "Executor"];
    /// From the provision step having the job's runner ready (an instance launched with its
    /// runner, or a Lambda job's runner made) to the job's first running hook, in ms: the
    /// instance's boot, install and poll (or the shell runner's invoke and cold start), what
    /// a baked AMI or a warm pool shortens. Same dimensions.
    READY_TO_RUNNING = "router", "ReadyToRunning" ["Route", "Executor"];
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
        assert_eq!(
            latency["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Function"]])
        );
    }

    #[test]
    fn a_dimensioned_metric_is_published_alone_and_with_its_dimensions() {
        let line = charted::PICKUP_LATENCY.value_by(
            &["job#build/tags#docker", "EC2"],
            12_345,
            "Milliseconds",
            7,
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["PickupLatency"], 12_345);
        assert_eq!(
            (
                v["Function"].as_str(),
                v["Route"].as_str(),
                v["Executor"].as_str()
            ),
            (Some("router"), Some("job#build/tags#docker"), Some("EC2"))
        );
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], NAMESPACE);
        assert_eq!(
            directive["Dimensions"],
            json!([["Function"], ["Function", "Route", "Executor"]])
        );
        assert_eq!(
            directive["Metrics"],
            json!([{"Name": "PickupLatency", "Unit": "Milliseconds"}])
        );
    }

    #[test]
    fn dimension_values_are_ones_cloudwatch_takes() {
        let long = "x".repeat(2000);
        for (given, taken) in [
            ("job#tests ✓/tags#docker", "job#tests ?/tags#docker"),
            ("a\tb", "a?b"),
            ("  ", "unknown"),
            ("", "unknown"),
            (long.as_str(), &long[..1024]),
        ] {
            let line = charted::PICKUP_LATENCY.value_by(&[given, "EC2"], 1, "Milliseconds", 1);
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["Route"], taken, "{given:?}");
        }
    }

    #[test]
    #[should_panic(expected = "one value per dimension")]
    fn a_dimensioned_metric_needs_a_value_per_dimension() {
        charted::PICKUP_LATENCY.value_by(&["EC2"], 1, "Milliseconds", 1);
    }
}
