//! The state machines write the jobs table too: their DynamoDB tasks must use the names and
//! phase ranks `ephemeral_core::jobs_table` owns. A one-sided rename fails here, not in a
//! deployment.

use std::collections::BTreeSet;

use ephemeral_core::jobs::JobPhase;
use ephemeral_core::jobs_table::{ALL, KEY, attr};
use ephemeral_core::mapping::ExecutorKind;
use serde_json::Value;

fn definition(name: &str) -> Value {
    let path = format!("{}/../../statemachine/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// (state name, Parameters) of every DynamoDB task of a definition.
fn dynamodb_tasks(definition: &Value) -> Vec<(String, Value)> {
    definition["States"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, state)| {
            state["Resource"]
                .as_str()
                .is_some_and(|r| r.starts_with("arn:aws:states:::dynamodb:"))
        })
        .map(|(name, state)| (name.clone(), state["Parameters"].clone()))
        .collect()
}

fn names(parameters: &Value) -> BTreeSet<String> {
    parameters["ExpressionAttributeNames"]
        .as_object()
        .map(|m| m.values().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn every_dynamodb_task_names_owned_attributes_of_the_jobs_table() {
    let mut tasks = 0;
    for file in ["provision.asl.json", "teardown.asl.json"] {
        for (state, parameters) in dynamodb_tasks(&definition(file)) {
            tasks += 1;
            assert_eq!(
                parameters["TableName"], "${JobsTableName}",
                "{file} {state}"
            );
            let key: Vec<&String> = parameters["Key"].as_object().unwrap().keys().collect();
            assert_eq!(key, [KEY], "{file} {state}");
            for name in names(&parameters) {
                assert!(
                    ALL.contains(&name.as_str()),
                    "{file} {state}: `{name}` is not a jobs-table attribute"
                );
            }
        }
    }
    assert_eq!(
        tasks, 6,
        "the definitions' DynamoDB tasks changed: check this test still sees them all"
    );
}

/// A phase written as literals (teardown's MarkCleaned) uses a rank and a name that agree,
/// and that the core knows.
#[test]
fn literal_phases_match_the_core_ranks() {
    let mut checked = 0;
    for file in ["provision.asl.json", "teardown.asl.json"] {
        for (state, parameters) in dynamodb_tasks(&definition(file)) {
            let written = names(&parameters);
            if !(written.contains(attr::PHASE) && written.contains(attr::PHASE_RANK)) {
                continue;
            }
            let values = parameters["ExpressionAttributeValues"].as_object().unwrap();
            let rank = values.values().find_map(|v| v["N"].as_str()).unwrap();
            let phase = values.values().find_map(|v| v["S"].as_str()).unwrap();
            let expected = JobPhase::from_rank(rank.parse().unwrap())
                .unwrap_or_else(|| panic!("{file} {state}: rank {rank} is no phase"));
            assert_eq!(phase, expected.as_str(), "{file} {state}");
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "MarkCleaned is the one literal phase write");
}

#[test]
fn mark_cleaned_moves_to_the_last_phase() {
    let teardown = definition("teardown.asl.json");
    let cleaned = &teardown["States"]["MarkCleaned"]["Parameters"]["ExpressionAttributeValues"][":cleaned"]
        ["N"];
    assert_eq!(
        cleaned.as_str(),
        Some(JobPhase::Cleaned.rank().to_string().as_str())
    );
    assert_eq!(JobPhase::ALL.last(), Some(&JobPhase::Cleaned));
}

/// The SKIP branch: the mapper's reason lands on the item under the owned name, and the
/// branch provisions nothing (RecordSkip goes straight to a Succeed state).
#[test]
fn record_skip_writes_the_owned_attribute_and_ends_the_workflow() {
    let provision = definition("provision.asl.json");
    let states = &provision["States"];
    let record = &states["RecordSkip"];
    assert_eq!(
        names(&record["Parameters"]),
        BTreeSet::from([attr::PROVISION_SKIPPED.to_owned()])
    );
    assert_eq!(
        record["Parameters"]["ExpressionAttributeValues"][":skipped"]["S.$"],
        "$.mapped.decision.reason"
    );
    assert_eq!(states[record["Next"].as_str().unwrap()]["Type"], "Succeed");
    let to_skip: Vec<&Value> = states["ChooseExecutor"]["Choices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["Next"] == "RecordSkip")
        .collect();
    assert_eq!(to_skip.len(), 1);
    assert_eq!(
        to_skip[0]["And"][0]["StringEquals"],
        ExecutorKind::Skip.to_string().as_str()
    );
}
