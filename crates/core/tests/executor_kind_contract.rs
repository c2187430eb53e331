//! The workflows choose on the mapper's `type` (provision: `$.mapped.decision.type`; teardown:
//! the `route_type` RecordRoute wrote from it). Every text they compare must be an
//! [`ExecutorKind`]'s serde name, and provision must tell every kind apart: a one-sided
//! rename fails here, not in a deployment.

use std::collections::BTreeSet;

use ephemeral_core::mapping::ExecutorKind;
use ephemeral_core::text::names;
use serde_json::Value;

fn definition(name: &str) -> Value {
    let path = format!("{}/../../statemachine/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every `StringEquals` of a Choice rule on `variable`, anywhere in the definition.
fn compared(value: &Value, variable: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("Variable").and_then(Value::as_str) == Some(variable)
                && let Some(text) = map.get("StringEquals")
            {
                out.push(
                    text.as_str()
                        .expect("StringEquals takes a string")
                        .to_owned(),
                );
            }
            map.values().for_each(|v| compared(v, variable, out));
        }
        Value::Array(items) => items.iter().for_each(|v| compared(v, variable, out)),
        _ => {}
    }
}

fn kinds(file: &str, variable: &str) -> BTreeSet<ExecutorKind> {
    let mut texts = Vec::new();
    compared(&definition(file), variable, &mut texts);
    assert!(!texts.is_empty(), "{file} compares {variable} nowhere");
    texts
        .iter()
        .map(|text| {
            text.parse().unwrap_or_else(|e| {
                panic!("{file} compares {variable} with {e} (the mapper's type names)")
            })
        })
        .collect()
}

#[test]
fn provision_chooses_on_every_kind_by_its_serde_name() {
    let chosen = kinds("provision.asl.json", "$.mapped.decision.type");
    let all: BTreeSet<ExecutorKind> = names::<ExecutorKind>()
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(chosen, all);
}

#[test]
fn teardown_reads_the_recorded_route_by_its_serde_name() {
    assert_eq!(
        kinds("teardown.asl.json", "$.record.Item.route_type.S"),
        BTreeSet::from([ExecutorKind::Ec2])
    );
    // What it reads is what provision's RecordRoute writes: the mapper's `type`.
    let provision = definition("provision.asl.json");
    assert_eq!(
        provision["States"]["RecordRoute"]["Parameters"]["ExpressionAttributeValues"][":route_type"]
            ["S.$"],
        "$.mapped.decision.type"
    );
}
