//! What it takes to make the table hold exactly the registry file's items.
//!
//! Items are compared attribute by attribute as JSON (the form `Rule::to_item` produces), by
//! the key actually stored in the table. An item written by another tool with the same
//! meaning but another shape (an extra attribute, a string set instead of a list) counts as
//! changed: `apply` replaces it, so that the table ends up exactly as the file says.

use std::collections::BTreeMap;

use ephemeral_core::mapping::{Rule, RuleError};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::table::TableItem;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttributeChange {
    pub attribute: String,
    /// In the table now; `None` when absent.
    pub table: Option<Value>,
    /// In the file; `None` when it will be removed.
    pub file: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub pk: String,
    pub sk: String,
    pub changes: Vec<AttributeChange>,
    /// What the file says the item is.
    pub item: Map<String, Value>,
    /// Why the table's current item is not a valid rule, if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_in_table: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan<'a> {
    /// Items of the file the table does not have, in key order.
    pub add: Vec<Map<String, Value>>,
    pub change: Vec<Change>,
    pub unchanged: usize,
    /// Items of the table the file does not have (valid or not), in key order.
    pub only_in_table: Vec<&'a TableItem>,
}

impl Plan<'_> {
    /// True when the table holds exactly the file's items.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.change.is_empty() && self.only_in_table.is_empty()
    }
}

fn key_of(item: &Map<String, Value>) -> (String, String) {
    let text = |k| item.get(k).and_then(Value::as_str).unwrap_or_default();
    (text("pk").to_owned(), text("sk").to_owned())
}

pub fn rule_error_text(e: &RuleError) -> String {
    format!("{}: {}", e.field, e.problem)
}

/// Compares the file's rules with the table's items.
pub fn plan<'a>(rules: &[Rule], table: &'a [TableItem]) -> Plan<'a> {
    let wanted: BTreeMap<(String, String), Map<String, Value>> = rules
        .iter()
        .map(|r| {
            let item = r.to_item();
            (key_of(&item), item)
        })
        .collect();
    let stored: BTreeMap<(String, String), &TableItem> = table
        .iter()
        .map(|i| ((i.pk.clone(), i.sk.clone()), i))
        .collect();
    let mut plan = Plan::default();
    for (key, item) in &wanted {
        let Some(current) = stored.get(key) else {
            plan.add.push(item.clone());
            continue;
        };
        if &current.attributes == item {
            plan.unchanged += 1;
            continue;
        }
        let mut names: Vec<&String> = current.attributes.keys().chain(item.keys()).collect();
        names.sort();
        names.dedup();
        let changes = names
            .into_iter()
            .filter(|n| current.attributes.get(*n) != item.get(*n))
            .map(|n| AttributeChange {
                attribute: n.clone(),
                table: current.attributes.get(n).cloned(),
                file: item.get(n).cloned(),
            })
            .collect();
        plan.change.push(Change {
            pk: key.0.clone(),
            sk: key.1.clone(),
            changes,
            item: item.clone(),
            invalid_in_table: current.rule.as_ref().err().map(rule_error_text),
        });
    }
    plan.only_in_table = stored
        .into_iter()
        .filter(|(key, _)| !wanted.contains_key(key))
        .map(|(_, item)| item)
        .collect();
    plan
}
