//! The EventBridge rules of `template.yaml` against the slim `JobEvent` the webhook puts on the
//! bus (issue 16): a rule on "GitLab Job Event" may name only fields the event has, and only
//! statuses GitLab reports; a field renamed in Rust alone would leave a rule that never
//! matches (no error anywhere: the jobs just never get a runner).

use std::collections::BTreeSet;
use std::path::Path;

use ephemeral_core::hook::{JobStatus, RunnerRef};
use ephemeral_core::webhook::{EVENT_SOURCE, JOB_EVENT_DETAIL_TYPE};
use serde_norway::Value;

/// Every field path of a `JobEvent` as it goes on the bus (`runner.id`, ...), from an event
/// whose optional fields are all set: the serde shape is the event's schema.
fn event_fields() -> BTreeSet<String> {
    let mut event = ephemeral_core::testing::job_event(1, 2, "build", JobStatus::Running);
    event.failure_reason = Some("script_failure".into());
    event.allow_failure = Some(false);
    event.sha = Some("0".repeat(40));
    event.runner = Some(RunnerRef {
        id: 3,
        description: Some("r".into()),
        tags: vec!["docker".into()],
    });
    (event.created_at, event.started_at, event.finished_at) =
        (Some("t".into()), Some("t".into()), Some("t".into()));
    (event.duration_s, event.queued_duration_s) = (Some(1.0), Some(1.0));
    let mut fields = BTreeSet::new();
    collect("", &serde_json::to_value(&event).unwrap(), &mut fields);
    fields
}

fn collect(prefix: &str, value: &serde_json::Value, fields: &mut BTreeSet<String>) {
    if let serde_json::Value::Object(map) = value {
        for (k, v) in map {
            let path = format!("{prefix}{k}");
            collect(&format!("{path}."), v, fields);
            fields.insert(path);
        }
    }
}

fn template() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../template.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every event pattern in the template, by the name of the rule (or function event) it is in.
fn patterns(template: &Value) -> Vec<(String, Value)> {
    let mut found = Vec::new();
    for (name, resource) in template["Resources"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let properties = &resource["Properties"];
        if resource["Type"].as_str() == Some("AWS::Events::Rule") {
            found.push((name.to_owned(), properties["EventPattern"].clone()));
        }
        for (event, e) in properties["Events"].as_mapping().into_iter().flatten() {
            if e["Type"].as_str() == Some("EventBridgeRule") {
                let event = event.as_str().unwrap();
                found.push((
                    format!("{name}.{event}"),
                    e["Properties"]["Pattern"].clone(),
                ));
            }
        }
    }
    found
}

/// The field paths a pattern's `detail` names, and the literal statuses it matches.
fn detail_paths(prefix: &str, detail: &Value, paths: &mut Vec<(String, Value)>) {
    for (k, v) in detail.as_mapping().into_iter().flatten() {
        let path = format!("{prefix}{}", k.as_str().unwrap());
        match v {
            Value::Mapping(_) => detail_paths(&format!("{path}."), v, paths),
            _ => paths.push((path, v.clone())),
        }
    }
}

/// The statuses a pattern lists: a literal, or every AllowedValue of a parameter it refers to
/// (`!Ref ProvisionOn` reads as the parameter's name).
fn statuses(values: &Value, parameters: &Value) -> Vec<String> {
    let mut found = Vec::new();
    for value in values.as_sequence().into_iter().flatten() {
        let Some(text) = value.as_str() else { continue };
        match parameters[text]["AllowedValues"].as_sequence() {
            Some(allowed) => {
                found.extend(allowed.iter().filter_map(|v| v.as_str().map(str::to_owned)))
            }
            None => found.push(text.to_owned()),
        }
    }
    found
}

fn problems(template: &Value, fields: &BTreeSet<String>) -> Vec<String> {
    let patterns = patterns(template);
    let mut problems = Vec::new();
    for (rule, pattern) in &patterns {
        let on_job_events = pattern["detail-type"]
            .as_sequence()
            .is_some_and(|t| t.iter().any(|t| t.as_str() == Some(JOB_EVENT_DETAIL_TYPE)));
        if !on_job_events {
            continue;
        }
        assert_eq!(pattern["source"][0].as_str(), Some(EVENT_SOURCE), "{rule}");
        let mut paths = Vec::new();
        detail_paths("", &pattern["detail"], &mut paths);
        for (path, values) in paths {
            if !fields.contains(&path) {
                problems.push(format!("{rule}: detail.{path} is not a JobEvent field"));
            }
            if path != "status" {
                continue;
            }
            for s in statuses(&values, &template["Parameters"]) {
                if matches!(JobStatus::from(s.as_str()), JobStatus::Other(_)) {
                    problems.push(format!("{rule}: status `{s}` is not one GitLab reports"));
                }
            }
        }
    }
    problems
}

#[test]
fn the_rules_on_job_events_name_only_fields_and_statuses_the_event_has() {
    let template = template();
    let patterns = patterns(&template);
    let on_job_events = patterns
        .iter()
        .filter(|(_, p)| p["detail-type"][0].as_str() == Some(JOB_EVENT_DETAIL_TYPE))
        .count();
    assert!(
        on_job_events >= 3,
        "pending, finished, running: {patterns:?}"
    );
    assert_eq!(problems(&template, &event_fields()), Vec::<String>::new());
}

/// A one-sided change is caught: the event loses a field a rule matches on.
#[test]
fn a_rule_on_a_field_the_event_lacks_is_caught() {
    let mut fields = event_fields();
    assert!(fields.remove("status"));
    let found = problems(&template(), &fields);
    assert!(
        found
            .iter()
            .any(|p| p.ends_with("detail.status is not a JobEvent field")),
        "{found:?}"
    );
}
