//! The template's alarms against the metrics the functions emit (issue 14): every alarm on our
//! namespace names a metric in `metrics::ALARMED` with its `Function` dimension, every
//! alarmed metric has an alarm, and every alarmed metric is emitted through its constant by
//! some function's code (no alarm on a metric nobody writes).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ephemeral_core::metrics::{ALARMED, NAMESPACE};
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// (Function dimension, metric name) of every alarm on our namespace in `template.yaml`: the
/// alarm's own metric, or each metric of a metric-math alarm (`Metrics[].MetricStat.Metric`).
fn alarms_on_our_metrics() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    let template: Value = serde_norway::from_str(&text).unwrap();
    let mut found = BTreeSet::new();
    for (name, resource) in template["Resources"].as_mapping().unwrap() {
        if resource["Type"].as_str() != Some("AWS::CloudWatch::Alarm") {
            continue;
        }
        let p = &resource["Properties"];
        let mut metrics = vec![p];
        if let Some(queries) = p["Metrics"].as_sequence() {
            metrics.extend(
                queries
                    .iter()
                    .map(|q| &q["MetricStat"]["Metric"])
                    .filter(|m| !m.is_null()),
            );
        }
        for metric in metrics {
            if metric["Namespace"].as_str() != Some(NAMESPACE) {
                continue;
            }
            let function = metric["Dimensions"]
                .as_sequence()
                .and_then(|d| d.iter().find(|d| d["Name"].as_str() == Some("Function")))
                .and_then(|d| d["Value"].as_str())
                .unwrap_or_else(|| {
                    panic!("{name:?}: an alarm on our metrics needs the Function dimension")
                });
            found.insert((
                function.to_owned(),
                metric["MetricName"].as_str().unwrap().to_owned(),
            ));
        }
    }
    found
}

#[test]
fn every_alarm_watches_an_alarmed_metric_and_every_alarmed_metric_has_one() {
    let alarms = alarms_on_our_metrics();
    let alarmed: BTreeSet<(String, String)> = ALARMED
        .iter()
        .map(|(_, m)| (m.function.to_owned(), m.name.to_owned()))
        .collect();
    assert!(!alarms.is_empty());
    assert_eq!(
        alarms, alarmed,
        "template.yaml's alarms vs metrics::ALARMED"
    );
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if !matches!(
                path.file_name().and_then(|n| n.to_str()),
                Some("tests" | "benches")
            ) {
                rust_sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_alarmed_metric_is_emitted_by_a_function() {
    let mut files = Vec::new();
    rust_sources(&root().join("crates"), &mut files);
    let code: String = files
        .iter()
        .filter(|p| !p.ends_with("core/src/metrics.rs"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for (constant, metric) in ALARMED {
        assert!(
            code.contains(&format!("alarmed::{constant}")),
            "{} ({}) has an alarm, but no function emits it through metrics::alarmed::{constant}",
            metric.name,
            metric.function
        );
    }
}
