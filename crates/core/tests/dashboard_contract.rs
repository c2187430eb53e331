//! The template's dashboard against the metrics the functions emit (issue 14): every metric of
//! our namespace it shows is in `metrics::ALARMED` or `metrics::CHARTED` with the same
//! `Function` and dimensions, every charted metric is on it and is emitted by some function's
//! code, and every `AWS/Lambda` metric names a function of the template (guarded by the
//! function's condition). A metric renamed on one side only fails here, not on a blank graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ephemeral_core::metrics::{ALARMED, CHARTED, FUNCTION_DIMENSION, Metric, NAMESPACE};
use serde_json::Value as Json;
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn template() -> Value {
    let text = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// `template.yaml`'s one dashboard body as CloudFormation would render it with every
/// condition `true` (or every one `false`): parameters take their defaults, pseudo
/// parameters an example value, and a reference to a resource `X` becomes `<<X>>`.
fn rendered_body(template: &Value, conditions: bool) -> Json {
    let dashboards: Vec<&Value> = template["Resources"]
        .as_mapping()
        .unwrap()
        .values()
        .filter(|r| r["Type"].as_str() == Some("AWS::CloudWatch::Dashboard"))
        .collect();
    assert_eq!(dashboards.len(), 1, "one dashboard");
    let text = render(
        template,
        &dashboards[0]["Properties"]["DashboardBody"],
        &BTreeMap::new(),
        conditions,
    );
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("the dashboard body (conditions {conditions}) is not JSON: {e}\n{text}")
    })
}

fn render(
    template: &Value,
    value: &Value,
    vars: &BTreeMap<String, String>,
    conditions: bool,
) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Tagged(tagged) if tagged.tag == "Sub" => {
            let (text, map) = match &tagged.value {
                Value::String(s) => (s.as_str(), None),
                Value::Sequence(seq) => (seq[0].as_str().unwrap(), seq[1].as_mapping()),
                other => panic!("!Sub of {other:?}"),
            };
            let mut inner = vars.clone();
            for (k, v) in map.into_iter().flatten() {
                inner.insert(
                    k.as_str().unwrap().to_owned(),
                    render(template, v, vars, conditions),
                );
            }
            substitute(template, text, &inner)
        }
        Value::Tagged(tagged) if tagged.tag == "If" => {
            let branches = tagged.value.as_sequence().unwrap();
            let condition = branches[0].as_str().unwrap();
            assert!(
                !template["Conditions"][condition].is_null(),
                "!If on an unknown condition {condition}"
            );
            render(
                template,
                &branches[if conditions { 1 } else { 2 }],
                vars,
                conditions,
            )
        }
        Value::Tagged(tagged) if tagged.tag == "Ref" => {
            reference(template, tagged.value.as_str().unwrap())
        }
        other => panic!("the dashboard body holds {other:?}"),
    }
}

fn reference(template: &Value, name: &str) -> String {
    match name {
        "AWS::Region" => "eu-west-1".into(),
        "AWS::StackName" => "ephemeral-runners".into(),
        "AWS::AccountId" => "123456789012".into(),
        "AWS::Partition" => "aws".into(),
        _ if !template["Parameters"][name].is_null() => render(
            template,
            &template["Parameters"][name]["Default"],
            &BTreeMap::new(),
            true,
        ),
        _ if !template["Resources"][name].is_null() => format!("<<{name}>>"),
        _ => panic!("${{{name}}} names nothing in the template"),
    }
}

fn substitute(template: &Value, text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let name = &rest[start + 2..end];
        if let Some(literal) = name.strip_prefix('!') {
            out.push_str(&format!("${{{literal}}}"));
        } else if let Some(value) = vars.get(name) {
            out.push_str(value);
        } else {
            assert!(
                !name.contains('.'),
                "${{{name}}}: no attributes on the dashboard"
            );
            out.push_str(&reference(template, name));
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// A metric the dashboard shows: namespace, name and dimensions (name to value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Shown {
    namespace: String,
    name: String,
    dimensions: BTreeMap<String, String>,
}

/// Every metric of every metric widget: `[namespace, name, dim, value, ..., {options}]`
/// entries (with `"."` repeating the entry before), and the schema of `SEARCH` expressions.
fn shown_metrics(body: &Json) -> Vec<Shown> {
    let mut shown = Vec::new();
    for widget in body["widgets"].as_array().unwrap() {
        if widget["type"] != "metric" {
            continue;
        }
        let mut previous: Vec<String> = Vec::new();
        for entry in widget["properties"]["metrics"].as_array().unwrap() {
            let entry = entry.as_array().unwrap();
            if let Some(expression) = entry[0].get("expression").and_then(Json::as_str) {
                shown.extend(searched(expression));
                continue;
            }
            let parts: Vec<String> = entry
                .iter()
                .take_while(|p| p.is_string())
                .enumerate()
                .map(|(i, p)| match p.as_str().unwrap() {
                    "." => previous[i].clone(),
                    s => s.to_owned(),
                })
                .collect();
            assert!(
                parts.len() >= 2 && parts.len().is_multiple_of(2),
                "{entry:?}"
            );
            shown.push(Shown {
                namespace: parts[0].clone(),
                name: parts[1].clone(),
                dimensions: parts[2..]
                    .chunks(2)
                    .map(|d| (d[0].clone(), d[1].clone()))
                    .collect(),
            });
            previous = parts;
        }
    }
    shown
}

/// `SEARCH('{Namespace,Dim,...} Dim="value" MetricName="Name"', ...)`: the metric it finds,
/// with the schema's dimensions (values it does not fix are `*`). Math without SEARCH
/// (`SUM([...])`) shows only metrics listed on their own.
fn searched(expression: &str) -> Option<Shown> {
    let query = expression.strip_prefix("SEARCH('")?;
    let query = &query[..query.find('\'').unwrap()];
    let schema = &query[query.find('{').unwrap() + 1..query.find('}').unwrap()];
    let mut names = schema.split(',').map(str::trim);
    let namespace = names.next().unwrap().to_owned();
    let mut dimensions: BTreeMap<String, String> =
        names.map(|d| (d.to_owned(), "*".to_owned())).collect();
    let mut name = None;
    for term in query[query.find('}').unwrap() + 1..].split_whitespace() {
        let (key, value) = term
            .split_once('=')
            .unwrap_or_else(|| panic!("SEARCH term {term}"));
        let value = value.trim_matches('"').to_owned();
        if key == "MetricName" {
            name = Some(value);
        } else {
            assert!(
                dimensions.contains_key(key),
                "{key} is not in the schema of {expression}"
            );
            dimensions.insert(key.to_owned(), value);
        }
    }
    Some(Shown {
        namespace,
        name: name.unwrap_or_else(|| panic!("{expression}: a SEARCH must name its metric")),
        dimensions,
    })
}

/// What is wrong with the dashboard's metrics against the metric owner and the template.
fn problems(template: &Value, body: &Json) -> Vec<String> {
    let known: Vec<Metric> = ALARMED.iter().chain(CHARTED).map(|(_, m)| *m).collect();
    let functions: BTreeSet<String> = template["Resources"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(n, _)| format!("<<{}>>", n.as_str().unwrap()))
        .collect();
    let mut problems = Vec::new();
    for m in shown_metrics(body) {
        match m.namespace.as_str() {
            NAMESPACE => {
                let Some(function) = m.dimensions.get(FUNCTION_DIMENSION) else {
                    problems.push(format!("{}: no Function dimension", m.name));
                    continue;
                };
                let Some(metric) = known
                    .iter()
                    .find(|k| k.function == function && k.name == m.name)
                else {
                    problems.push(format!(
                        "{} ({function}) is not in metrics::ALARMED or metrics::CHARTED",
                        m.name
                    ));
                    continue;
                };
                let names: BTreeSet<&str> = m.dimensions.keys().map(String::as_str).collect();
                let mut all: BTreeSet<&str> = metric.dimensions.iter().copied().collect();
                all.insert(FUNCTION_DIMENSION);
                if names != BTreeSet::from([FUNCTION_DIMENSION]) && names != all {
                    problems.push(format!(
                        "{} ({function}) is shown with dimensions {names:?}; it is published with [Function] and {all:?}",
                        m.name
                    ));
                }
            }
            "AWS/Lambda" => {
                let names: Vec<&String> = m.dimensions.keys().collect();
                let function = m.dimensions.get("FunctionName");
                if names != ["FunctionName"] || !function.is_some_and(|f| functions.contains(f)) {
                    problems.push(format!(
                        "AWS/Lambda {} with {:?}: not one of the template's functions by reference",
                        m.name, m.dimensions
                    ));
                }
            }
            other => problems.push(format!("{}: namespace {other} is not checked here", m.name)),
        }
    }
    problems
}

#[test]
fn every_metric_on_the_dashboard_is_one_a_function_emits() {
    let template = template();
    for conditions in [true, false] {
        let body = rendered_body(&template, conditions);
        assert_eq!(
            problems(&template, &body),
            Vec::<String>::new(),
            "conditions {conditions}"
        );
    }
}

#[test]
fn a_metric_renamed_on_one_side_only_is_found() {
    let template = template();
    let body = rendered_body(&template, true).to_string();
    for (from, to) in [
        ("\"HooksForwarded\"", "\"HooksForwardedX\""),
        (
            "MetricName=\\\"PickupLatency\\\"",
            "MetricName=\\\"PickupLatencyX\\\"",
        ),
        ("\"Function\", \"mapper\"", "\"Function\", \"router\""),
        ("\"<<RouterFunction>>\"", "\"router\""),
    ] {
        let from = from.replace(", ", ",");
        let to = to.replace(", ", ",");
        assert!(body.contains(&from), "{from} not in the rendered body");
        let renamed: Json = serde_json::from_str(&body.replace(&from, &to)).unwrap();
        assert!(
            !problems(&template, &renamed).is_empty(),
            "{from} -> {to} went unnoticed"
        );
    }
    let mut dimensioned: Json = serde_json::from_str(&body).unwrap();
    let search = dimensioned["widgets"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .flat_map(|w| {
            w["properties"]["metrics"]
                .as_array_mut()
                .into_iter()
                .flatten()
        })
        .find(|m| {
            m[0]["expression"]
                .as_str()
                .is_some_and(|e| e.contains("SEARCH"))
        })
        .unwrap();
    let expression = search[0]["expression"]
        .as_str()
        .unwrap()
        .replace(",Route}", "}");
    search[0]["expression"] = Json::from(expression);
    assert!(
        !problems(&template, &dimensioned).is_empty(),
        "a dimension dropped on one side went unnoticed"
    );
}

#[test]
fn every_function_has_its_errors_and_duration_on_the_dashboard_with_its_condition() {
    let template = template();
    let functions: BTreeMap<String, Option<&str>> = template["Resources"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"].as_str() == Some("AWS::Serverless::Function"))
        .map(|(n, r)| {
            (
                format!("<<{}>>", n.as_str().unwrap()),
                r["Condition"].as_str(),
            )
        })
        .collect();
    for conditions in [true, false] {
        let mut watched: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for m in shown_metrics(&rendered_body(&template, conditions)) {
            if m.namespace == "AWS/Lambda" {
                watched
                    .entry(m.dimensions["FunctionName"].clone())
                    .or_default()
                    .insert(m.name);
            }
        }
        // With every condition false, a conditional function is not deployed: not shown.
        let expected: BTreeMap<String, BTreeSet<String>> = functions
            .iter()
            .filter(|(_, condition)| conditions || condition.is_none())
            .map(|(f, _)| {
                (
                    f.clone(),
                    BTreeSet::from(["Duration".into(), "Errors".into()]),
                )
            })
            .collect();
        assert_eq!(watched, expected, "conditions {conditions}");
    }
}

#[test]
fn every_charted_metric_is_on_the_dashboard_and_emitted_by_a_function() {
    let template = template();
    let shown: BTreeSet<(String, String)> = shown_metrics(&rendered_body(&template, true))
        .into_iter()
        .filter(|m| m.namespace == NAMESPACE)
        .map(|m| (m.dimensions[FUNCTION_DIMENSION].clone(), m.name))
        .collect();
    let code = sources(&root().join("crates"));
    for (constant, metric) in CHARTED {
        assert!(
            shown.contains(&(metric.function.to_owned(), metric.name.to_owned())),
            "{} ({}) is in metrics::CHARTED but not on the dashboard",
            metric.name,
            metric.function
        );
        assert!(
            code.contains(&format!("charted::{constant}")),
            "{} ({}) is charted, but no function emits it through metrics::charted::{constant}",
            metric.name,
            metric.function
        );
    }
}

/// The functions' Rust sources, without tests, benches and the metric owner itself.
fn sources(dir: &Path) -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !matches!(
                    path.file_name().and_then(|n| n.to_str()),
                    Some("tests" | "benches")
                ) {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "rs")
                && !path.ends_with("core/src/metrics.rs")
            {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(dir, &mut out);
    out
}
