//! Real Job Hook payloads (see fixtures/job_hooks/SOURCES.md) parse and slim correctly, as do
//! their variants with `runner: null`, `user: null` and unknown extra fields.

use std::path::PathBuf;

use ephemeral_core::hook::{JobEvent, parse_job_hook};
use serde_json::Value;

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/job_hooks");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 5, "expected several real payloads in {dir:?}");
    out
}

fn slim(raw: &Value) -> JobEvent {
    let body = serde_json::to_vec(raw).unwrap();
    JobEvent::from_hook(parse_job_hook(&body).unwrap(), "delivery".into(), 1)
}

/// Every value the event carries equals the one in the raw payload.
fn assert_faithful(name: &str, raw: &Value, ev: &JobEvent) {
    assert_eq!(Some(ev.job_id), raw["build_id"].as_u64(), "{name}: job id");
    assert_eq!(
        Some(ev.job_name.as_str()),
        raw["build_name"].as_str(),
        "{name}: name"
    );
    assert_eq!(
        ev.stage.as_deref(),
        raw["build_stage"].as_str(),
        "{name}: stage"
    );
    assert_eq!(
        Some(ev.status.as_str()),
        raw["build_status"].as_str(),
        "{name}: status"
    );
    assert_eq!(
        Some(ev.project_id),
        raw["project_id"].as_u64(),
        "{name}: project"
    );
    assert_eq!(
        ev.pipeline_id,
        raw["pipeline_id"].as_u64(),
        "{name}: pipeline"
    );
    assert_eq!(ev.git_ref.as_deref(), raw["ref"].as_str(), "{name}: ref");
    assert_eq!(
        u64::from(ev.retries),
        raw["retries_count"].as_u64().unwrap_or(0),
        "{name}: retries"
    );
    match (&ev.runner, &raw["runner"]) {
        (None, Value::Null) => {}
        (Some(r), Value::Object(o)) => {
            assert_eq!(Some(r.id), o["id"].as_u64(), "{name}: runner id");
            let tags: Vec<&str> = o
                .get("tags")
                .and_then(Value::as_array)
                .map_or(vec![], |t| t.iter().filter_map(Value::as_str).collect());
            assert_eq!(r.tags, tags, "{name}: runner tags");
        }
        (ours, theirs) => panic!("{name}: runner {ours:?} vs {theirs}"),
    }
    if let Some(path) = raw["project"]["path_with_namespace"].as_str() {
        assert_eq!(
            ev.project_path.as_deref(),
            Some(path),
            "{name}: project path"
        );
    }
}

/// No personal data or credentials from the hook survive slimming.
fn assert_no_personal_data(name: &str, raw: &Value, ev: &JobEvent) {
    let mut forwarded = serde_json::to_string(ev).unwrap();
    // A project in a personal namespace has the username in its path: that is the project's
    // identity, which routing needs, so it is left out of this check.
    if let Some(path) = &ev.project_path {
        forwarded = forwarded.replace(path.as_str(), "<project path>");
    }
    for pointer in [
        "/user/email",
        "/user/name",
        "/user/username",
        "/commit/author_email",
        "/commit/author_name",
    ] {
        if let Some(value) = raw.pointer(pointer).and_then(Value::as_str)
            && value.len() > 3
        {
            assert!(
                !forwarded.contains(value),
                "{name}: {pointer} leaked into the event"
            );
        }
    }
    assert!(!forwarded.contains("\"user\""), "{name}");
    assert!(!forwarded.contains("\"commit\""), "{name}");
}

#[test]
fn real_payloads_parse_faithfully_without_personal_data() {
    for (name, raw) in fixtures() {
        let ev = slim(&raw);
        assert_faithful(&name, &raw, &ev);
        assert_no_personal_data(&name, &raw, &ev);
    }
}

#[test]
fn runner_null_and_user_null_are_accepted() {
    for (name, mut raw) in fixtures() {
        raw["runner"] = Value::Null;
        raw["user"] = Value::Null;
        raw["build_status"] = "pending".into();
        let ev = slim(&raw);
        assert_eq!(ev.runner, None, "{name}");
        assert_faithful(&name, &raw, &ev);
    }
}

#[test]
fn unknown_extra_fields_are_ignored() {
    for (name, mut raw) in fixtures() {
        let obj = raw.as_object_mut().unwrap();
        obj.insert(
            "field_from_gitlab_99".into(),
            serde_json::json!({"nested": [1, 2, {"x": null}]}),
        );
        obj.insert("build_new_flag".into(), true.into());
        if let Some(Value::Object(runner)) = obj.get_mut("runner") {
            runner.insert("maintenance_note".into(), "new in some version".into());
        }
        let ev = slim(&raw);
        assert_faithful(&name, &raw, &ev);
    }
}

#[test]
fn wrong_types_are_unusable_with_the_field_named() {
    let (_, mut raw) = fixtures().remove(0);
    raw["build_id"] = "not a number".into();
    let err = parse_job_hook(&serde_json::to_vec(&raw).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid type"), "{err}");
    raw.as_object_mut().unwrap().remove("build_id");
    let err = parse_job_hook(&serde_json::to_vec(&raw).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing field `build_id`"), "{err}");
}
