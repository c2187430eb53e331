//! The mapping table in DynamoDB: finding it (by name or through a stack), reading every item,
//! writing and deleting items.

use std::collections::BTreeMap;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::Client as Dynamo;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::{AttributeValue, KeyType, ReturnValue};
use ephemeral_core::mapping::{KNOWN_ATTRIBUTES, Rule, RuleError, rule_from_item};
use serde_json::{Map, Value};

/// The stack output that names the mapping table.
pub const STACK_OUTPUT: &str = "MappingTableName";
/// Logical ids of the table in a stack: ours, then the seed's.
pub const LOGICAL_IDS: [&str; 2] = ["MappingTable", "GitLabJobTagsMapping"];

/// How the user named the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableRef {
    Name(String),
    Stack(String),
}

/// A mapping table, found and checked.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    /// How it was found, for messages: `stack S, output MappingTableName`.
    pub found_through: Option<String>,
    client: Dynamo,
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.found_through {
            Some(how) => write!(f, "table `{}` ({how})", self.name),
            None => write!(f, "table `{}`", self.name),
        }
    }
}

pub fn region(sdk: &SdkConfig) -> String {
    sdk.region()
        .map_or_else(|| "(none)".to_owned(), |r| r.to_string())
}

/// Finds the table and checks it has the mapping table's key (pk HASH, sk RANGE, strings).
pub async fn open(sdk: &SdkConfig, table: &TableRef) -> Result<Table, String> {
    if sdk.region().is_none() {
        return Err(
            "no AWS region configured: set AWS_REGION (or AWS_PROFILE with a region)".into(),
        );
    }
    let (name, found_through) = match table {
        TableRef::Name(name) => (name.clone(), None),
        TableRef::Stack(stack) => {
            let (name, how) = table_of_stack(sdk, stack).await?;
            (name, Some(how))
        }
    };
    let client = Dynamo::new(sdk);
    let described = client
        .describe_table()
        .table_name(&name)
        .send()
        .await
        .map_err(|e| {
            if e.code() == Some("ResourceNotFoundException") {
                let via = found_through
                    .as_deref()
                    .map(|h| format!(" (named by {h})"))
                    .unwrap_or_default();
                format!("table `{name}`{via} not found in region {}", region(sdk))
            } else {
                format!("DescribeTable `{name}` failed: {}", DisplayErrorContext(&e))
            }
        })?;
    let key: Vec<(String, KeyType)> = described
        .table()
        .map(|t| t.key_schema())
        .unwrap_or_default()
        .iter()
        .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
        .collect();
    let expected = [
        ("pk".to_owned(), KeyType::Hash),
        ("sk".to_owned(), KeyType::Range),
    ];
    if key != expected {
        let shown: Vec<String> = key
            .iter()
            .map(|(n, t)| format!("{n} {}", t.as_str()))
            .collect();
        return Err(format!(
            "table `{name}` has the key ({}), not (pk HASH, sk RANGE): it is not a mapping table",
            shown.join(", ")
        ));
    }
    Ok(Table {
        name,
        found_through,
        client,
    })
}

/// Why a stack's outputs could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackError {
    /// No such stack in the region (the message names both).
    NotFound(String),
    Failed(String),
}

impl std::fmt::Display for StackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

/// A stack's outputs, key to value (DescribeStacks). Both CLIs find their resources here.
pub async fn stack_outputs(
    sdk: &SdkConfig,
    stack: &str,
) -> Result<BTreeMap<String, String>, StackError> {
    let not_found = || {
        StackError::NotFound(format!(
            "stack `{stack}` not found in region {}",
            region(sdk)
        ))
    };
    let described = aws_sdk_cloudformation::Client::new(sdk)
        .describe_stacks()
        .stack_name(stack)
        .send()
        .await
        .map_err(|e| {
            let text = DisplayErrorContext(&e).to_string();
            if text.contains("does not exist") {
                not_found()
            } else {
                StackError::Failed(format!("DescribeStacks `{stack}` failed: {text}"))
            }
        })?;
    let found = described.stacks().first().ok_or_else(not_found)?;
    Ok(found
        .outputs()
        .iter()
        .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
        .collect())
}

/// The table named by a stack: its `MappingTableName` output, else a DynamoDB table resource
/// with logical id `MappingTable` or (the seed's) `GitLabJobTagsMapping`.
pub async fn table_of_stack(sdk: &SdkConfig, stack: &str) -> Result<(String, String), String> {
    let found = stack_outputs(sdk, stack).await.map_err(|e| e.to_string())?;
    if let Some(name) = found.get(STACK_OUTPUT).filter(|v| !v.is_empty()) {
        return Ok((
            name.clone(),
            format!("stack `{stack}`, output {STACK_OUTPUT}"),
        ));
    }
    let outputs: Vec<&str> = found.keys().map(String::as_str).collect();
    let cfn = aws_sdk_cloudformation::Client::new(sdk);

    let mut tables = Vec::new();
    let mut pages = cfn
        .list_stack_resources()
        .stack_name(stack)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            format!(
                "stack `{stack}` has no output {STACK_OUTPUT}, and ListStackResources failed: {}",
                DisplayErrorContext(&e)
            )
        })?;
        for r in page.stack_resource_summaries() {
            if r.resource_type() == Some("AWS::DynamoDB::Table") {
                tables.push((
                    r.logical_resource_id().unwrap_or_default().to_owned(),
                    r.physical_resource_id().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    for logical in LOGICAL_IDS {
        if let Some((_, physical)) = tables.iter().find(|(l, p)| l == logical && !p.is_empty()) {
            return Ok((
                physical.clone(),
                format!("stack `{stack}`, resource {logical}"),
            ));
        }
    }
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    Err(format!(
        "stack `{stack}` has no output `{STACK_OUTPUT}` and no AWS::DynamoDB::Table resource with logical id `{}` or `{}` (its outputs: {}; its DynamoDB tables: {}): pass --table NAME",
        LOGICAL_IDS[0],
        LOGICAL_IDS[1],
        list(outputs.iter().map(|o| o.to_string()).collect()),
        list(tables.iter().map(|(l, p)| format!("{l} ({p})")).collect()),
    ))
}

/// One item of the table, as read, with its parsed rule or why it is not one.
#[derive(Debug, Clone)]
pub struct TableItem {
    /// The stored key (empty if missing, which a pk/sk table cannot hold).
    pub pk: String,
    pub sk: String,
    pub attributes: Map<String, Value>,
    pub rule: Result<Rule, RuleError>,
}

impl TableItem {
    pub fn new(attributes: Map<String, Value>) -> Self {
        let key = |k: &str| {
            attributes
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self {
            pk: key("pk"),
            sk: key("sk"),
            rule: rule_from_item(&attributes),
            attributes,
        }
    }

    pub fn key_text(&self) -> String {
        key_text(&self.pk, &self.sk)
    }

    /// Things that are not errors but that a person should know.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .attributes
            .keys()
            .filter(|a| !KNOWN_ATTRIBUTES.contains(&a.as_str()))
            .map(|a| format!("attribute `{a}` is not a mapping attribute: the mapper ignores it, export leaves it out"))
            .collect();
        if let Ok(rule) = &self.rule
            && (rule.pk(), rule.sk()) != (self.pk.clone(), self.sk.clone())
        {
            out.push(format!(
                "stored under a key apply would write as {}: a registry file cannot name this item",
                key_text(&rule.pk(), &rule.sk())
            ));
        }
        out
    }
}

pub fn key_text(pk: &str, sk: &str) -> String {
    format!("pk={pk} sk={sk}")
}

impl Table {
    /// Every item (consistent reads, all pages), ordered by pk then sk.
    pub async fn scan(&self) -> Result<Vec<TableItem>, String> {
        let mut items = Vec::new();
        let mut pages = self
            .client
            .scan()
            .table_name(&self.name)
            .consistent_read(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| format!("Scan {self} failed: {}", DisplayErrorContext(&e)))?;
            items.extend(
                page.items()
                    .iter()
                    .map(|i| TableItem::new(ephemeral_aws::item_to_json(i))),
            );
        }
        items.sort_by(|a, b| (&a.pk, &a.sk).cmp(&(&b.pk, &b.sk)));
        Ok(items)
    }

    /// Items of one partition (`job#<name>`), for "did you mean" hints.
    pub async fn partition(&self, pk: &str) -> Result<Vec<TableItem>, String> {
        let mut items = Vec::new();
        let mut pages = self
            .client
            .query()
            .table_name(&self.name)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
            .consistent_read(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| format!("Query {self} failed: {}", DisplayErrorContext(&e)))?;
            items.extend(
                page.items()
                    .iter()
                    .map(|i| TableItem::new(ephemeral_aws::item_to_json(i))),
            );
        }
        Ok(items)
    }

    /// Writes (replaces) one item.
    pub async fn put(&self, item: &Map<String, Value>) -> Result<(), String> {
        self.client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(ephemeral_aws::json_to_item(item)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("PutItem into {self} failed: {}", DisplayErrorContext(&e)))
    }

    /// Deletes one item; answers the item it deleted, `None` if there was none.
    pub async fn delete(&self, pk: &str, sk: &str) -> Result<Option<Map<String, Value>>, String> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.name)
            .key("pk", AttributeValue::S(pk.to_owned()))
            .key("sk", AttributeValue::S(sk.to_owned()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| format!("DeleteItem from {self} failed: {}", DisplayErrorContext(&e)))?;
        Ok(out
            .attributes()
            .filter(|a| !a.is_empty())
            .map(ephemeral_aws::item_to_json))
    }
}
