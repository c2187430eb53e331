//! The slim `JobEvent` the webhook puts on the bus, against every copy of its shape (issue 16).
//! The Rust type owns it; its JSON Schema (schemars, the serialize contract) is what the
//! copies are checked against:
//! - `docs/job-event.schema.json`, the schema consumers read, is the generated one;
//! - `docs/job-event.md`'s field table names exactly the schema's fields, and says which are
//!   always there;
//! - a rule of `template.yaml` on "GitLab Job Event" names only fields the schema has, and only
//!   statuses it lists: a field renamed in Rust alone would leave a rule that never matches
//!   (no error anywhere: the jobs just never get a runner).
//!
//! After a deliberate change to the event: `UPDATE_JOB_EVENT_SCHEMA=1 cargo test -p
//! ephemeral-core --test job_event_contract` rewrites the schema file; the docs table is
//! edited by hand (the test says what is missing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ephemeral_core::hook::{JobStatus, job_event_schema};
use ephemeral_core::webhook::{EVENT_SOURCE, JOB_EVENT_DETAIL_TYPE};
use serde_json::Value as Json;
use serde_norway::Value;

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(name)
}

/// A schema's `$ref` (`#/$defs/RunnerRef`) resolved; a nullable one (`anyOf: [$ref, null]`)
/// too; anything else as it is.
fn resolve<'a>(root: &'a Json, schema: &'a Json) -> &'a Json {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/$defs/");
        return &root["$defs"][name];
    }
    if let Some(branches) = schema["anyOf"].as_array() {
        let refs: Vec<_> = branches.iter().filter(|b| b["$ref"].is_string()).collect();
        if refs.len() == 1 {
            return resolve(root, refs[0]);
        }
    }
    schema
}

/// Every field path of the event (`runner.id`, ...), with whether it is always there.
fn schema_fields(root: &Json) -> BTreeMap<String, bool> {
    let mut fields = BTreeMap::new();
    collect(root, root, "", &mut fields);
    fields
}

fn collect(root: &Json, schema: &Json, prefix: &str, fields: &mut BTreeMap<String, bool>) {
    let schema = resolve(root, schema);
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .collect();
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        let path = format!("{prefix}{name}");
        fields.insert(path.clone(), required.contains(name.as_str()));
        collect(root, property, &format!("{path}."), fields);
    }
}

/// The statuses the schema lists by name (a later GitLab's are allowed beside them).
fn schema_statuses(root: &Json) -> BTreeSet<String> {
    let status = &root["$defs"]["JobStatus"]["anyOf"][0]["enum"];
    let statuses = status.as_array().expect("JobStatus lists its statuses");
    statuses
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn template() -> Value {
    let text = std::fs::read_to_string(repo_file("template.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
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

fn problems(template: &Value, schema: &Json) -> Vec<String> {
    let fields = schema_fields(schema);
    let known = schema_statuses(schema);
    let mut problems = Vec::new();
    for (rule, pattern) in &patterns(template) {
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
            if !fields.contains_key(&path) {
                problems.push(format!("{rule}: detail.{path} is not a JobEvent field"));
            }
            if path != "status" {
                continue;
            }
            for s in statuses(&values, &template["Parameters"]) {
                if !known.contains(&s) {
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
    assert_eq!(
        problems(&template, &job_event_schema()),
        Vec::<String>::new()
    );
}

/// A one-sided change is caught: the event loses a field a rule matches on.
#[test]
fn a_rule_on_a_field_the_event_lacks_is_caught() {
    let mut schema = job_event_schema();
    let properties = schema["properties"].as_object_mut().unwrap();
    assert!(properties.remove("status").is_some());
    let found = problems(&template(), &schema);
    assert!(
        found
            .iter()
            .any(|p| p.ends_with("detail.status is not a JobEvent field")),
        "{found:?}"
    );
}

/// The schema lists exactly the statuses the type knows, each by the name it goes out with.
#[test]
fn the_schema_lists_every_status_the_type_knows() {
    let known: BTreeSet<String> = JobStatus::KNOWN.iter().map(|s| s.to_string()).collect();
    assert_eq!(schema_statuses(&job_event_schema()), known);
    for status in JobStatus::KNOWN {
        assert_eq!(JobStatus::from(status.as_str()), status, "round trip");
    }
}

#[test]
fn the_committed_schema_is_the_generated_one() {
    let path = repo_file("docs/job-event.schema.json");
    let generated = serde_json::to_string_pretty(&job_event_schema()).unwrap() + "\n";
    if std::env::var_os("UPDATE_JOB_EVENT_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is not the schema of JobEvent; after a deliberate change, run \
         UPDATE_JOB_EVENT_SCHEMA=1 cargo test -p ephemeral-core --test job_event_contract",
        path.display()
    );
}

/// The rows of the docs' field table: `| `path` | type | always? | meaning |`.
fn documented_fields(doc: &str) -> BTreeMap<String, bool> {
    let table = doc
        .split("<!-- fields -->")
        .nth(1)
        .expect("docs/job-event.md marks its field table with <!-- fields -->");
    table
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let path = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((path.to_owned(), *cells.get(3)? == "always"))
        })
        .collect()
}

fn docs_problems(doc: &str, schema: &Json) -> Vec<String> {
    let documented = documented_fields(doc);
    let mut problems = Vec::new();
    for (path, always) in schema_fields(schema) {
        match documented.get(&path) {
            None => problems.push(format!("`{path}` is not in the table")),
            Some(&said) if said != always => problems.push(format!(
                "`{path}` is {}always there, the table says otherwise",
                if always { "" } else { "not " }
            )),
            Some(_) => {}
        }
    }
    let fields = schema_fields(schema);
    for path in documented.keys().filter(|p| !fields.contains_key(*p)) {
        problems.push(format!("`{path}` is in the table but not in the event"));
    }
    problems
}

#[test]
fn the_docs_table_names_exactly_the_events_fields() {
    let doc = std::fs::read_to_string(repo_file("docs/job-event.md")).unwrap();
    for status in schema_statuses(&job_event_schema()) {
        assert!(
            doc.contains(&format!("`{status}`")),
            "the docs omit status {status}"
        );
    }
    assert_eq!(
        docs_problems(&doc, &job_event_schema()),
        Vec::<String>::new()
    );
}

/// A one-sided change is caught: a field added to the event and not to the docs.
#[test]
fn a_field_missing_from_the_docs_is_caught() {
    let doc = std::fs::read_to_string(repo_file("docs/job-event.md")).unwrap();
    let mut schema = job_event_schema();
    schema["properties"]["queue"] = serde_json::json!({"type": "string"});
    let found = docs_problems(&doc, &schema);
    assert!(
        found.contains(&"`queue` is not in the table".to_owned()),
        "{found:?}"
    );
    // And the table says which fields are always there: `stage` is not.
    let claimed = doc.replace(
        "| `stage` | string | when known |",
        "| `stage` | string | always |",
    );
    let found = docs_problems(&claimed, &job_event_schema());
    assert_eq!(
        found,
        vec!["`stage` is not always there, the table says otherwise".to_owned()]
    );
}

/// What a real hook becomes on the bus is valid under the schema (GitLab's payloads of
/// several versions, the fixtures), and the validator does refuse what the schema excludes.
#[test]
fn the_events_of_real_hooks_are_valid_under_the_schema() {
    let validator = jsonschema::validator_for(&job_event_schema()).expect("a valid schema");
    let dir = repo_file("crates/core/tests/fixtures/job_hooks");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let hook = ephemeral_core::hook::parse_job_hook(&std::fs::read(&path).unwrap()).unwrap();
        let event = ephemeral_core::hook::JobEvent::from_hook(hook, "d".into(), 1);
        let event = serde_json::to_value(&event).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        checked += 1;
    }
    assert!(checked >= 8, "{checked} fixtures");
    let event = |edit: fn(&mut Json)| {
        let mut event = serde_json::to_value(ephemeral_core::testing::job_event(
            1,
            2,
            "build",
            JobStatus::Pending,
        ))
        .unwrap();
        edit(&mut event);
        event
    };
    assert!(validator.is_valid(&event(|_| {})));
    let refused: [fn(&mut Json); 4] = [
        |e| e["status"] = "".into(),
        |e| drop(e.as_object_mut().unwrap().remove("job_id")),
        |e| e["stage"] = Json::Null,
        |e| e["runner"] = serde_json::json!({"tags": []}),
    ];
    for edit in refused {
        let event = event(edit);
        assert!(!validator.is_valid(&event), "{event}");
    }
}
