//! The mapping table: which executor runs a job.
//!
//! Items written by existing users' scripts keep working as they are (the seed format):
//! `pk = job#<job name>`, `sk = tags#<t1>#<t2>...`, `type` `LAMBDA`|`EC2`, `arn` for `LAMBDA`.
//! Additions leave those items valid:
//! - `pk = job#*` matches any job name (a tag- or project-based rule);
//! - `sk = project#<project id or path>#tags#...` scopes an item to one project; it wins over
//!   global items;
//! - EC2 settings per route: `instance_type`, `ami` (`ami-...` or `ssm:<parameter>`), `market`
//!   (`spot`|`on-demand`), `subnets` (list), `executor` (`shell`|`docker`), `privileged`
//!   (boolean: Docker-in-Docker), `image` (the docker executor's default image), `warm_pool`
//!   (stopped instances kept ready for the route: [`crate::pool`]).
//!
//! Decision order (first match wins), see [`decide`]:
//! 1. exact job name, project-scoped; 2. exact job name, global;
//! 3. any name (`job#*`), project-scoped; 4. any name, global; 5. the stack's default route.
//!
//! Before any of this, GitLab's answer for the job decides whether it gets a runner at all
//! ([`confirm`], [`map_job`]). An item's tags must all be among the job's tags. When the job's
//! tags are unknown (no GitLab API token: only LAMBDA routes may then run), tags cannot be
//! checked. Exact-name items then match whatever
//! their tags are, in `sk` order: the seed's own behaviour, which took the first item of the
//! name's partition. `job#*` items with tags then do not match. Within a level, the item with
//! more tags wins (more specific), then the lower `sk`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::task_error::TaskError;
use crate::text::{TextError, one_of, serde_text};

/// Partition key of an item that matches any job name.
pub const ANY_JOB: &str = "*";

/// Where a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "UPPERCASE")]
pub enum Executor {
    /// The in-Lambda shell runner at `arn`.
    Lambda { arn: String },
    /// A per-job EC2 instance; unset settings take the stack's defaults.
    Ec2(Ec2Settings),
    /// Nowhere: GitLab says the job is not waiting for a runner. Only the mapper answers it
    /// (`{"type": "SKIP", ...}`); no mapping item can name it.
    Skip,
}

impl Executor {
    pub fn kind(&self) -> ExecutorKind {
        match self {
            Self::Lambda { .. } => ExecutorKind::Lambda,
            Self::Ec2(_) => ExecutorKind::Ec2,
            Self::Skip => ExecutorKind::Skip,
        }
    }
}

/// An [`Executor`]'s `type` without its settings: the text items, registry entries, the
/// mapper's answer (`$.mapped.decision.type`, which the provision workflow's Choice states
/// compare), the jobs table's `route_type` and the `Executor` metric dimension carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ExecutorKind {
    Lambda,
    Ec2,
    Skip,
}
serde_text!(ExecutorKind, Market, RunnerExecutor);

impl ExecutorKind {
    /// The kinds a route may name (a mapping item, a registry entry, the stack's default);
    /// `SKIP` is the mapper's answer alone.
    pub const ROUTES: [Self; 2] = [Self::Lambda, Self::Ec2];

    /// The route kinds as a sentence's end: `LAMBDA or EC2`.
    pub fn routes_text() -> String {
        one_of(&Self::ROUTES.map(|k| k.to_string()))
    }

    /// A route's kind from its text; anything else, `SKIP` included, is answered with
    /// [`Self::ROUTES`].
    pub fn parse_route(text: &str) -> Result<Self, TextError> {
        match text.parse() {
            Ok(kind) if Self::ROUTES.contains(&kind) => Ok(kind),
            _ => Err(TextError::not_one_of(
                text,
                Self::ROUTES.map(|k| k.to_string()),
            )),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ec2Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami: Option<AmiRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub market: Option<Market>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<RunnerExecutor>,
    /// Docker-in-Docker (`services: [docker:dind]`): privileged containers for the docker
    /// executor, the host's docker for the shell executor's job user. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
    /// The docker executor's image for jobs without `image:` (else the stack's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How many stopped instances to keep ready for this route ([`crate::pool`]); none
    /// unless set. At most [`MAX_WARM_POOL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<u32>,
}

/// The largest warm pool a route may ask for: each pooled instance is an EBS volume paid for
/// while it waits, and every provision on the route may launch that many to refill it.
pub const MAX_WARM_POOL: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmiRef {
    /// `ami-0123...`
    Id(String),
    /// An SSM parameter holding the AMI id (e.g. the public Amazon Linux ones).
    SsmParameter(String),
}

impl AmiRef {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(name) = text
            .strip_prefix("ssm:")
            .or_else(|| text.strip_prefix("resolve:ssm:"))
        {
            if name.is_empty() {
                return Err("`ssm:` needs a parameter name after it".into());
            }
            return Ok(Self::SsmParameter(name.to_owned()));
        }
        let hex = text.strip_prefix("ami-").unwrap_or_default();
        if hex.len() >= 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Self::Id(text.to_owned()));
        }
        Err(format!(
            "`{text}` is neither an AMI id (ami-0123abcd...) nor ssm:<parameter name>"
        ))
    }

    pub fn to_text(&self) -> String {
        match self {
            Self::Id(id) => id.clone(),
            Self::SsmParameter(name) => format!("ssm:{name}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Market {
    Spot,
    OnDemand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunnerExecutor {
    Shell,
    Docker,
}

/// Which project an item is scoped to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectScope {
    Id(u64),
    Path(String),
}

impl ProjectScope {
    fn parse(text: &str) -> Self {
        match text.parse() {
            Ok(id) => Self::Id(id),
            Err(_) => Self::Path(text.to_owned()),
        }
    }
    fn to_text(&self) -> String {
        match self {
            Self::Id(id) => id.to_string(),
            Self::Path(p) => p.clone(),
        }
    }
    fn matches(&self, job: &JobFacts) -> bool {
        match self {
            Self::Id(id) => *id == job.project_id,
            Self::Path(p) => job.project_path.as_deref() == Some(p.as_str()),
        }
    }
}

/// One mapping rule, parsed and validated from a table item or a registry entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Exact job name, or `*` for any.
    pub job_name: String,
    pub project: Option<ProjectScope>,
    /// In the order written (the seed keeps order in the sort key).
    pub tags: Vec<String>,
    pub executor: Executor,
    pub description: Option<String>,
}

impl Rule {
    pub fn pk(&self) -> String {
        format!("job#{}", self.job_name)
    }

    pub fn sk(&self) -> String {
        let tags = if self.tags.is_empty() {
            "tags#".to_owned()
        } else {
            format!("tags#{}", self.tags.join("#"))
        };
        match &self.project {
            None => tags,
            Some(scope) => format!("project#{}#{tags}", scope.to_text()),
        }
    }

    /// The table item, attribute name to JSON value (S as string, L as array).
    pub fn to_item(&self) -> Map<String, Value> {
        let mut item = Map::new();
        item.insert("pk".into(), self.pk().into());
        item.insert("sk".into(), self.sk().into());
        item.insert("type".into(), self.executor.kind().to_string().into());
        match &self.executor {
            Executor::Lambda { arn } => {
                item.insert("arn".into(), arn.clone().into());
            }
            Executor::Ec2(s) => {
                if let Some(t) = &s.instance_type {
                    item.insert("instance_type".into(), t.clone().into());
                }
                if let Some(a) = &s.ami {
                    item.insert("ami".into(), a.to_text().into());
                }
                if let Some(m) = s.market {
                    item.insert("market".into(), m.to_string().into());
                }
                if !s.subnets.is_empty() {
                    item.insert("subnets".into(), s.subnets.clone().into());
                }
                if let Some(e) = s.executor {
                    item.insert("executor".into(), e.to_string().into());
                }
                if let Some(p) = s.privileged {
                    item.insert("privileged".into(), p.into());
                }
                if let Some(i) = &s.image {
                    item.insert("image".into(), i.clone().into());
                }
                if let Some(n) = s.warm_pool {
                    item.insert("warm_pool".into(), n.into());
                }
            }
            // Not a rule's executor: `rule_from_item` refuses the item this writes.
            Executor::Skip => {}
        }
        if let Some(d) = &self.description {
            item.insert("description".into(), d.clone().into());
        }
        item
    }
}

/// Why an item or registry entry is not a valid rule. Names the field and says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct RuleError {
    pub field: &'static str,
    pub problem: String,
}

fn err(field: &'static str, problem: impl Into<String>) -> RuleError {
    RuleError {
        field,
        problem: problem.into(),
    }
}

fn text<'a>(
    item: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, RuleError> {
    match item.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(err(field, format!("must be a string, found {other}"))),
    }
}

fn is_lambda_arn(arn: &str) -> bool {
    let parts: Vec<&str> = arn.split(':').collect();
    parts.len() >= 7
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "lambda"
        && parts[5] == "function"
        && !parts[6].is_empty()
}

/// Attributes an item may have; others are reported by `validate` (likely typos).
pub const KNOWN_ATTRIBUTES: [&str; 13] = [
    "pk",
    "sk",
    "type",
    "arn",
    "instance_type",
    "ami",
    "market",
    "subnets",
    "executor",
    "privileged",
    "image",
    "warm_pool",
    "description",
];

/// A route's settings as an item or a registry entry writes them, before they are checked.
#[derive(Debug, Default)]
struct RouteFields<'a> {
    arn: Option<&'a str>,
    instance_type: Option<&'a str>,
    ami: Option<&'a str>,
    market: Option<&'a str>,
    subnets: Vec<String>,
    executor: Option<&'a str>,
    privileged: Option<bool>,
    image: Option<&'a str>,
    warm_pool: Option<u32>,
}

/// A docker image reference as user-data can carry it: `name[:tag][@digest]`, registry and
/// port included; nothing a shell would read.
pub fn check_image(image: &str) -> Result<(), RuleError> {
    let fine = !image.is_empty()
        && image.len() <= 255
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c));
    if fine {
        Ok(())
    } else {
        Err(err(
            "image",
            format!(
                "`{image}` is not a docker image like alpine:3 or registry.example.com/group/image:tag"
            ),
        ))
    }
}

/// A route's executor from its `type` and the settings written beside it: each kind checks
/// its own settings ([`lambda_route`], [`ec2_route`]).
fn executor_from(kind: &str, fields: RouteFields) -> Result<Executor, RuleError> {
    let kind = ExecutorKind::parse_route(kind).map_err(|e| err("type", e.to_string()))?;
    match kind {
        ExecutorKind::Lambda => lambda_route(fields),
        ExecutorKind::Ec2 => ec2_route(fields).map(Executor::Ec2),
        ExecutorKind::Skip => unreachable!("parse_route answers route kinds only"),
    }
}

/// A LAMBDA route: its function's ARN, and none of the EC2 settings.
fn lambda_route(fields: RouteFields) -> Result<Executor, RuleError> {
    let RouteFields {
        arn,
        instance_type,
        ami,
        market,
        subnets,
        executor,
        privileged,
        image,
        warm_pool,
    } = fields;
    let arn = arn.ok_or_else(|| {
        err(
            "arn",
            "required when type is LAMBDA: the shell-runner function's ARN",
        )
    })?;
    if !is_lambda_arn(arn) {
        return Err(err(
            "arn",
            format!(
                "`{arn}` is not a Lambda function ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME)"
            ),
        ));
    }
    // Settings a LAMBDA route cannot honour are errors, not silently dropped.
    let privileged = privileged.map(|_| "set");
    let warm_pool = warm_pool.map(|_| "set");
    for (field, value) in [
        ("instance_type", instance_type),
        ("ami", ami),
        ("market", market),
        ("executor", executor),
        ("privileged", privileged),
        ("image", image),
        ("warm_pool", warm_pool),
    ] {
        if value.is_some() {
            return Err(err(field, "only applies to type EC2"));
        }
    }
    if !subnets.is_empty() {
        return Err(err("subnets", "only applies to type EC2"));
    }
    Ok(Executor::Lambda {
        arn: arn.to_owned(),
    })
}

/// An EC2 route's settings, each checked (an `arn` beside them is not read).
fn ec2_route(fields: RouteFields) -> Result<Ec2Settings, RuleError> {
    let RouteFields {
        arn: _,
        instance_type,
        ami,
        market,
        subnets,
        executor,
        privileged,
        image,
        warm_pool,
    } = fields;
    if let Some(n) = warm_pool.filter(|n| *n > MAX_WARM_POOL) {
        return Err(err(
            "warm_pool",
            format!("{n} is more than {MAX_WARM_POOL} stopped instances for one route"),
        ));
    }
    if let Some(t) = instance_type
        && (t.is_empty() || !t.contains('.'))
    {
        return Err(err(
            "instance_type",
            format!("`{t}` is not an instance type like t3.large"),
        ));
    }
    let market: Option<Market> = market
        .map(str::parse)
        .transpose()
        .map_err(|e: TextError| err("market", e.to_string()))?;
    let executor: Option<RunnerExecutor> = executor
        .map(str::parse)
        .transpose()
        .map_err(|e: TextError| err("executor", e.to_string()))?;
    if let Some(image) = image {
        check_image(image)?;
        if executor == Some(RunnerExecutor::Shell) {
            return Err(err(
                "image",
                "only applies to executor docker (shell jobs run on the host)",
            ));
        }
    }
    if let Some(bad) = subnets.iter().find(|s| !s.starts_with("subnet-")) {
        return Err(err(
            "subnets",
            format!("`{bad}` is not a subnet id (subnet-...)"),
        ));
    }
    Ok(Ec2Settings {
        instance_type: instance_type.map(str::to_owned),
        ami: ami
            .map(AmiRef::parse)
            .transpose()
            .map_err(|e| err("ami", e))?,
        market,
        subnets,
        executor,
        privileged,
        image: image.map(str::to_owned),
        warm_pool,
    })
}

fn count(item: &Map<String, Value>, field: &'static str) -> Result<Option<u32>, RuleError> {
    match item.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| err(field, format!("must be a whole number, found {n}"))),
        Some(other) => Err(err(field, format!("must be a number, found {other}"))),
    }
}

fn flag(item: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, RuleError> {
    match item.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(err(field, format!("must be true or false, found {other}"))),
    }
}

fn string_list(value: Option<&Value>, field: &'static str) -> Result<Vec<String>, RuleError> {
    match value {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(field, format!("must be a list of strings, found {v}")))
            })
            .collect(),
        Some(other) => Err(err(
            field,
            format!("must be a list of strings, found {other}"),
        )),
    }
}

fn check_tags(tags: &[String]) -> Result<(), RuleError> {
    if let Some(bad) = tags.iter().find(|t| t.is_empty() || t.contains('#')) {
        return Err(err(
            "tags",
            format!("`{bad}`: a tag may not be empty or contain `#`"),
        ));
    }
    Ok(())
}

/// Parses a table item (attribute values as JSON: S as string, L/SS as array).
pub fn rule_from_item(item: &Map<String, Value>) -> Result<Rule, RuleError> {
    let pk = text(item, "pk")?.ok_or_else(|| err("pk", "missing"))?;
    let job_name = pk
        .strip_prefix("job#")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("pk", format!("`{pk}` must be job#<job name> or job#*")))?;
    let sk = text(item, "sk")?.ok_or_else(|| err("sk", "missing"))?;
    let (project, tags_part) = match sk.strip_prefix("project#") {
        Some(rest) => {
            let (scope, tags) = rest.split_once("#tags").ok_or_else(|| {
                err(
                    "sk",
                    format!("`{sk}` must be project#<id or path>#tags#<tag>#..."),
                )
            })?;
            if scope.is_empty() {
                return Err(err("sk", format!("`{sk}` names no project")));
            }
            (Some(ProjectScope::parse(scope)), format!("tags{tags}"))
        }
        None => (None, sk.to_owned()),
    };
    let tags: Vec<String> = match tags_part.as_str() {
        "tags" | "tags#" => vec![],
        t => t
            .strip_prefix("tags#")
            .ok_or_else(|| {
                err(
                    "sk",
                    format!("`{sk}` must be tags#<tag>#... (or project#...#tags#...)"),
                )
            })?
            .split('#')
            .map(str::to_owned)
            .collect(),
    };
    check_tags(&tags).map_err(|e| err("sk", e.problem))?;
    let kind = text(item, "type")?
        .ok_or_else(|| err("type", format!("missing: {}", ExecutorKind::routes_text())))?;
    let executor = executor_from(
        kind,
        RouteFields {
            arn: text(item, "arn")?,
            instance_type: text(item, "instance_type")?,
            ami: text(item, "ami")?,
            market: text(item, "market")?,
            subnets: string_list(item.get("subnets"), "subnets")?,
            executor: text(item, "executor")?,
            privileged: flag(item, "privileged")?,
            image: text(item, "image")?,
            warm_pool: count(item, "warm_pool")?,
        },
    )?;
    Ok(Rule {
        job_name: job_name.to_owned(),
        project,
        tags,
        executor,
        description: text(item, "description")?.map(str::to_owned),
    })
}

/// One entry of a registry file. The seed's `job_runner_registry.json` entries
/// (`name`, `type`, `tags`, `lambdaArn`) are accepted as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(
        default,
        rename = "lambdaArn",
        alias = "arn",
        skip_serializing_if = "Option::is_none"
    )]
    pub lambda_arn: Option<String>,
    /// Project id (number) or path (`group/project`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<Value>,
    #[serde(
        default,
        rename = "instanceType",
        skip_serializing_if = "Option::is_none"
    )]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub market: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(
        default,
        rename = "warmPool",
        alias = "warm_pool",
        skip_serializing_if = "Option::is_none"
    )]
    pub warm_pool: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A registry file: `{"jobs": [...]}`, the seed's shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub jobs: Vec<RegistryEntry>,
}

impl RegistryEntry {
    pub fn to_rule(&self) -> Result<Rule, RuleError> {
        if self.name.is_empty() {
            return Err(err("name", "empty: the GitLab job name, or * for any job"));
        }
        check_tags(&self.tags)?;
        let project = match &self.project {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                Some(ProjectScope::Id(n.as_u64().ok_or_else(|| {
                    err("project", format!("`{n}` is not a project id"))
                })?))
            }
            Some(Value::String(s)) if !s.is_empty() && !s.contains('#') => {
                Some(ProjectScope::parse(s))
            }
            Some(other) => {
                return Err(err(
                    "project",
                    format!("`{other}`: a project id or path like group/project"),
                ));
            }
        };
        Ok(Rule {
            job_name: self.name.clone(),
            project,
            tags: self.tags.clone(),
            executor: executor_from(
                &self.kind,
                RouteFields {
                    arn: self.lambda_arn.as_deref(),
                    instance_type: self.instance_type.as_deref(),
                    ami: self.ami.as_deref(),
                    market: self.market.as_deref(),
                    subnets: self.subnets.clone(),
                    executor: self.executor.as_deref(),
                    privileged: self.privileged,
                    image: self.image.as_deref(),
                    warm_pool: self.warm_pool,
                },
            )?,
            description: self.description.clone(),
        })
    }

    pub fn from_rule(rule: &Rule) -> Self {
        let (lambda_arn, ec2) = match &rule.executor {
            Executor::Lambda { arn } => (Some(arn.clone()), Ec2Settings::default()),
            Executor::Ec2(s) => (None, s.clone()),
            Executor::Skip => (None, Ec2Settings::default()),
        };
        Self {
            name: rule.job_name.clone(),
            kind: rule.executor.kind().to_string(),
            tags: rule.tags.clone(),
            lambda_arn,
            project: rule.project.as_ref().map(|p| match p {
                ProjectScope::Id(id) => Value::from(*id),
                ProjectScope::Path(path) => Value::from(path.clone()),
            }),
            instance_type: ec2.instance_type,
            ami: ec2.ami.map(|a| a.to_text()),
            market: ec2.market.map(|m| m.to_string()),
            subnets: ec2.subnets,
            executor: ec2.executor.map(|e| e.to_string()),
            privileged: ec2.privileged,
            image: ec2.image,
            warm_pool: ec2.warm_pool,
            description: rule.description.clone(),
        }
    }
}

/// A registry problem, located: which entry (index and name) and which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jobs[{index}] (name `{name}`): {error}")]
pub struct RegistryError {
    pub index: usize,
    pub name: String,
    pub error: RuleError,
}

impl Registry {
    /// Every entry as a rule, or every problem (not just the first), each naming its entry.
    /// Two entries with the same key would overwrite each other in the table: an error too.
    pub fn rules(&self) -> Result<Vec<Rule>, Vec<RegistryError>> {
        let mut rules = Vec::new();
        let mut errors = Vec::new();
        let mut keys = std::collections::HashMap::new();
        for (index, entry) in self.jobs.iter().enumerate() {
            let located = |error| RegistryError {
                index,
                name: entry.name.clone(),
                error,
            };
            match entry.to_rule() {
                Ok(rule) => {
                    if let Some(first) = keys.insert((rule.pk(), rule.sk()), index) {
                        errors.push(located(err(
                            "tags",
                            format!("same job name, project and tags as jobs[{first}]: one would overwrite the other"),
                        )));
                    }
                    rules.push(rule);
                }
                Err(e) => errors.push(located(e)),
            }
        }
        if errors.is_empty() {
            Ok(rules)
        } else {
            Err(errors)
        }
    }
}

/// What the mapper knows about the job it routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFacts {
    pub project_id: u64,
    #[serde(default)]
    pub project_path: Option<String>,
    pub job_name: String,
    /// `tag_list` from the GitLab API; `None` when not known.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// The mapper's answer: the state machine chooses on `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDecision {
    #[serde(flatten)]
    pub executor: Executor,
    /// `pk/sk` of the item that matched, or `default`.
    pub matched: String,
    pub reason: String,
}

/// The rules' level in the decision order (lower wins).
fn level(rule: &Rule) -> u8 {
    match (rule.job_name == ANY_JOB, rule.project.is_some()) {
        (false, true) => 1,
        (false, false) => 2,
        (true, true) => 3,
        (true, false) => 4,
    }
}

/// Picks the route for a job from the candidate rules (those under `job#<name>` and `job#*`).
pub fn decide(job: &JobFacts, candidates: &[Rule], default: &Executor) -> RouteDecision {
    let job_tags: Option<BTreeSet<&str>> = job
        .tags
        .as_ref()
        .map(|t| t.iter().map(String::as_str).collect());
    let best = candidates
        .iter()
        .filter(|r| r.job_name == ANY_JOB || r.job_name == job.job_name)
        .filter(|r| r.project.as_ref().is_none_or(|p| p.matches(job)))
        .filter(|r| match &job_tags {
            Some(have) => r.tags.iter().all(|t| have.contains(t.as_str())),
            // Unknown tags: exact-name items still match (the seed's behaviour); tag-only
            // rules cannot be checked and do not.
            None => r.job_name != ANY_JOB || r.tags.is_empty(),
        })
        .min_by(|a, b| {
            let key = |r: &Rule| {
                // Unknown tags: keep the seed's order (lowest sk first).
                let specificity = if job_tags.is_some() {
                    usize::MAX - r.tags.len()
                } else {
                    0
                };
                (level(r), specificity, r.sk())
            };
            key(a).cmp(&key(b))
        });
    match best {
        Some(rule) => RouteDecision {
            executor: rule.executor.clone(),
            matched: format!("{}/{}", rule.pk(), rule.sk()),
            reason: match level(rule) {
                1 => "job name and project",
                2 => "job name",
                3 => "project (any job name)",
                _ => "tags (any job name)",
            }
            .to_owned()
                + if job_tags.is_none() && !rule.tags.is_empty() {
                    "; job tags unknown, item tags not checked"
                } else {
                    ""
                },
        },
        None => RouteDecision {
            executor: default.clone(),
            matched: "default".into(),
            reason: "no mapping item matched: the stack's default route".into(),
        },
    }
}

/// A mapping item that could not be used, with where it is (for the log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidItem {
    pub pk: String,
    pub sk: String,
    pub error: RuleError,
}

/// The mapping table, read side.
pub trait MappingRules {
    /// Every item under `job#<job_name>` and `job#*`, parsed; invalid ones reported apart.
    fn candidates(
        &self,
        job_name: &str,
    ) -> impl std::future::Future<
        Output = Result<(Vec<Rule>, Vec<InvalidItem>), crate::webhook::PortError>,
    > + Send;
}

/// What GitLab says of a job now (`GET /projects/:id/jobs/:job_id`): the truth a hook's
/// word is checked against before anything is spent on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitLabJobView {
    pub status: crate::hook::JobStatus,
    /// `tag_list`.
    pub tags: Vec<String>,
}

/// What reading the job from GitLab gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookedUp {
    /// No `read_api` token is configured: the job cannot be confirmed nor its tags known.
    NotConfigured,
    Found(GitLabJobView),
    /// GitLab answered 404: the job is gone, or the token cannot see its project.
    Gone,
}

/// Why the job could not be read from GitLab (after the client's own retries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// 5xx, 429, a timeout or an answer that is not a job: a later attempt may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// 401 or 403: the token is wrong, expired or lacks `read_api`.
    #[error("{0}")]
    Refused(String),
    /// The token itself could not be read (SSM).
    #[error("{0}")]
    Token(crate::webhook::PortError),
}

/// GitLab's jobs API, as the mapper reads it.
pub trait JobLookup {
    /// `Ok(LookedUp::NotConfigured)` when no API token is configured.
    fn job(
        &self,
        project_id: u64,
        job_id: u64,
    ) -> impl std::future::Future<Output = Result<LookedUp, LookupError>> + Send;
}

/// What the mapper makes of GitLab's answer before it looks at the mapping table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// GitLab has the job waiting for a runner (`pending`, or `created` for stacks that
    /// provision on `created`), with these tags.
    Waiting { tags: Vec<String> },
    /// No token: neither the status nor the tags are known.
    Unconfirmed,
    /// Nothing to provision, and why (names GitLab's answer).
    Skip {
        reason: String,
        tags: Option<Vec<String>>,
    },
}

/// Decides from GitLab's answer whether the job may get a runner.
pub fn confirm(looked_up: &LookedUp) -> Confirmation {
    use crate::hook::JobStatus;
    match looked_up {
        LookedUp::NotConfigured => Confirmation::Unconfirmed,
        LookedUp::Found(job) => match job.status {
            JobStatus::Pending | JobStatus::Created => Confirmation::Waiting {
                tags: job.tags.clone(),
            },
            ref status => Confirmation::Skip {
                reason: format!(
                    "GitLab reports the job {}, not pending: no runner provisioned (the hook was late, repeated or forged)",
                    status.as_str()
                ),
                tags: Some(job.tags.clone()),
            },
        },
        LookedUp::Gone => Confirmation::Skip {
            reason: "GitLab answered 404 for the job (deleted, or the read_api token cannot see its project): no runner provisioned".into(),
            tags: None,
        },
    }
}

/// `matched` of a decision made on GitLab's answer rather than a mapping item.
pub const MATCHED_BY_GITLAB: &str = "gitlab";

/// The stack parameter that names the mapper's `read_api` token.
pub const API_TOKEN_PARAMETER: &str = "GitLabApiTokenParameterName";

/// Why the mapper fails the workflow's MapJob step. Each has a stable `errorType`
/// ([`MapError::error_type`]); those [`TaskError::is_retried`] are retried by the workflow,
/// the others fail at once; either way the workflow's Catch records it on the job's item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error(
        "job {job_id} is routed to EC2 ({matched}) but the mapper has no GitLab API token: set the stack parameter {API_TOKEN_PARAMETER} (an SSM SecureString holding a token with the read_api scope) so the mapper can confirm the job is pending and give its runner the job's tags"
    )]
    TokenMissing { job_id: u64, matched: String },
    #[error(
        "could not read job {job_id} from GitLab: {message}; the workflow retries, then the reconciler starts a new attempt"
    )]
    GitLabUnavailable { job_id: u64, message: String },
    #[error(
        "GitLab refused the token in {API_TOKEN_PARAMETER} reading job {job_id}: {message}; the token lacks the read_api scope, has expired or was revoked: store a valid one in the parameter"
    )]
    TokenRejected { job_id: u64, message: String },
    /// The mapping table or the token parameter could not be read.
    #[error("{0}")]
    Dependency(crate::webhook::PortError),
}

impl MapError {
    /// The `errorType` Step Functions sees; one of [`TaskError::MAPPER`].
    pub fn error_type(&self) -> TaskError {
        match self {
            Self::TokenMissing { .. } => TaskError::GitLabApiTokenMissing,
            Self::GitLabUnavailable { .. } => TaskError::GitLabUnavailable,
            Self::TokenRejected { .. } => TaskError::GitLabTokenRejected,
            Self::Dependency(_) => TaskError::DependencyFailed,
        }
    }

    fn of_lookup(job_id: u64, error: LookupError) -> Self {
        match error {
            LookupError::Unavailable(message) => Self::GitLabUnavailable { job_id, message },
            LookupError::Refused(message) => Self::TokenRejected { job_id, message },
            LookupError::Token(e) => Self::Dependency(e),
        }
    }
}

/// The mapper's output: the decision, plus what it was based on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapperOutput {
    #[serde(flatten)]
    pub decision: RouteDecision,
    /// The job's tags as GitLab reported them; `null` when unknown (no token, or a 404).
    pub tags: Option<Vec<String>>,
    /// Items skipped because they are invalid (`pk/sk: field: problem`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_items: Vec<String>,
}

/// One job routed: the mapper's answer, and whether GitLab confirmed the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub output: MapperOutput,
    /// False when no token is configured (a LAMBDA route runs on the hook's word).
    pub confirmed: bool,
}

/// Routes one job. First GitLab's word ([`confirm`]): a job that is not waiting for a runner
/// is a [`Executor::Skip`]; GitLab failing fails the step. Then candidates from the table and
/// [`decide`]. Without a token the job's tags are unknown, so an EC2 route (whose runner
/// would carry no tags) fails with [`MapError::TokenMissing`]; a LAMBDA route still runs
/// (the shell runner is registered with its own tags and GitLab matches them). Invalid items
/// are skipped, never fatal: a broken item must not drop jobs.
pub async fn map_job<R: MappingRules, J: JobLookup>(
    job: &crate::hook::JobEvent,
    rules: &R,
    gitlab: &J,
    default: &Executor,
) -> Result<Mapped, MapError> {
    let looked_up = gitlab
        .job(job.project_id, job.job_id)
        .await
        .map_err(|e| MapError::of_lookup(job.job_id, e))?;
    let tags = match confirm(&looked_up) {
        Confirmation::Skip { reason, tags } => {
            return Ok(Mapped {
                output: MapperOutput {
                    decision: RouteDecision {
                        executor: Executor::Skip,
                        matched: MATCHED_BY_GITLAB.into(),
                        reason,
                    },
                    tags,
                    invalid_items: vec![],
                },
                confirmed: true,
            });
        }
        Confirmation::Waiting { tags } => Some(tags),
        Confirmation::Unconfirmed => None,
    };
    let (candidates, invalid) = rules
        .candidates(&job.job_name)
        .await
        .map_err(MapError::Dependency)?;
    let facts = JobFacts {
        project_id: job.project_id,
        project_path: job.project_path.clone(),
        job_name: job.job_name.clone(),
        tags: tags.clone(),
    };
    let decision = decide(&facts, &candidates, default);
    if tags.is_none() && matches!(decision.executor, Executor::Ec2(_)) {
        return Err(MapError::TokenMissing {
            job_id: job.job_id,
            matched: decision.matched,
        });
    }
    Ok(Mapped {
        output: MapperOutput {
            decision,
            tags: tags.clone(),
            invalid_items: invalid
                .iter()
                .map(|i| format!("{}/{}: {}", i.pk, i.sk, i.error))
                .collect(),
        },
        confirmed: tags.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::JobStatus;
    use crate::testing::job_event;
    use crate::webhook::PortError;

    const ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:runner";

    struct Rules(Vec<Rule>);
    impl MappingRules for Rules {
        async fn candidates(&self, _: &str) -> Result<(Vec<Rule>, Vec<InvalidItem>), PortError> {
            Ok((self.0.clone(), vec![]))
        }
    }
    struct GitLab(Result<LookedUp, LookupError>);
    impl JobLookup for GitLab {
        async fn job(&self, _: u64, _: u64) -> Result<LookedUp, LookupError> {
            self.0.clone()
        }
    }
    fn found(status: JobStatus, tags: &[&str]) -> GitLab {
        GitLab(Ok(LookedUp::Found(GitLabJobView {
            status,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        })))
    }
    fn lambda_rule(name: &str) -> Rule {
        rule_from_item(
            serde_json::json!({"pk": format!("job#{name}"), "sk": "tags#", "type": "LAMBDA", "arn": ARN})
                .as_object()
                .unwrap(),
        )
        .unwrap()
    }
    async fn map(gitlab: GitLab, name: &str) -> Result<Mapped, MapError> {
        let job = job_event(7, 42, name, JobStatus::Pending);
        map_job(
            &job,
            &Rules(vec![lambda_rule("unit-test")]),
            &gitlab,
            &Executor::Ec2(Default::default()),
        )
        .await
    }

    #[tokio::test]
    async fn a_job_gitlab_does_not_have_pending_is_skipped_whatever_the_hook_said() {
        for status in [
            JobStatus::Running,
            JobStatus::Success,
            JobStatus::Canceled,
            JobStatus::Failed,
            JobStatus::Manual,
        ] {
            let mapped = map(found(status.clone(), &["docker"]), "docker-build")
                .await
                .unwrap();
            let json = serde_json::to_value(&mapped.output).unwrap();
            assert_eq!(json["type"], "SKIP", "{json}");
            assert_eq!(json["matched"], "gitlab");
            assert!(
                json["reason"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("GitLab reports the job {}", status.as_str())),
                "{json}"
            );
            assert_eq!(json["tags"], serde_json::json!(["docker"]));
            // The workflow's Choice reads it back the same way.
            let back: MapperOutput = serde_json::from_value(json).unwrap();
            assert_eq!(back.decision.executor, Executor::Skip);
        }
        let gone = map(GitLab(Ok(LookedUp::Gone)), "docker-build")
            .await
            .unwrap();
        assert_eq!(gone.output.decision.executor, Executor::Skip);
        assert!(gone.output.decision.reason.contains("404"));
    }

    #[tokio::test]
    async fn pending_and_created_jobs_route_with_gitlabs_tags() {
        for status in [JobStatus::Pending, JobStatus::Created] {
            let mapped = map(found(status, &["docker"]), "docker-build")
                .await
                .unwrap();
            assert!(mapped.confirmed);
            assert_eq!(mapped.output.decision.executor.kind(), ExecutorKind::Ec2);
            assert_eq!(mapped.output.tags, Some(vec!["docker".to_owned()]));
        }
    }

    #[tokio::test]
    async fn without_a_token_ec2_fails_naming_the_parameter_and_lambda_runs_unconfirmed() {
        let e = map(GitLab(Ok(LookedUp::NotConfigured)), "docker-build")
            .await
            .unwrap_err();
        assert_eq!(e.error_type(), TaskError::GitLabApiTokenMissing);
        assert!(!e.error_type().is_retried());
        assert!(e.to_string().contains("GitLabApiTokenParameterName"), "{e}");
        let lambda = map(GitLab(Ok(LookedUp::NotConfigured)), "unit-test")
            .await
            .unwrap();
        assert!(!lambda.confirmed);
        assert_eq!(lambda.output.decision.executor.kind(), ExecutorKind::Lambda);
        assert_eq!(lambda.output.tags, None);
    }

    #[tokio::test]
    async fn gitlab_errors_fail_the_step_retried_or_not() {
        let down = map(
            GitLab(Err(LookupError::Unavailable("GitLab answered 500".into()))),
            "unit-test",
        )
        .await
        .unwrap_err();
        assert_eq!(down.error_type(), TaskError::GitLabUnavailable);
        assert!(down.error_type().is_retried());
        let refused = map(
            GitLab(Err(LookupError::Refused("GitLab answered 403".into()))),
            "unit-test",
        )
        .await
        .unwrap_err();
        assert_eq!(refused.error_type(), TaskError::GitLabTokenRejected);
        assert!(!refused.error_type().is_retried());
        assert!(refused.to_string().contains("read_api"), "{refused}");
        let token = map(
            GitLab(Err(LookupError::Token(PortError("ssm down".into())))),
            "unit-test",
        )
        .await
        .unwrap_err();
        assert_eq!(token.error_type(), TaskError::DependencyFailed);
    }

    fn item(json: serde_json::Value) -> Result<Rule, RuleError> {
        rule_from_item(json.as_object().unwrap())
    }

    #[test]
    fn a_route_may_ask_for_docker_in_docker_and_its_own_image() {
        let rule = item(serde_json::json!({"pk": "job#*", "sk": "tags#docker-build", "type": "EC2",
            "executor": "docker", "privileged": true, "image": "registry.example.com:5000/ci/docker:27"}))
        .unwrap();
        let Executor::Ec2(route) = &rule.executor else {
            panic!("{rule:?}")
        };
        assert_eq!(route.privileged, Some(true));
        assert_eq!(
            route.image.as_deref(),
            Some("registry.example.com:5000/ci/docker:27")
        );
        // The item, the registry entry and back again keep both.
        assert_eq!(rule_from_item(&rule.to_item()).unwrap(), rule);
        assert_eq!(RegistryEntry::from_rule(&rule).to_rule().unwrap(), rule);
        // A shell route may be privileged (the host's docker), not name an image.
        assert!(
            item(
                serde_json::json!({"pk": "job#b", "sk": "tags#", "type": "EC2",
            "executor": "shell", "privileged": true})
            )
            .is_ok()
        );
    }

    #[test]
    fn a_route_may_keep_a_warm_pool_of_at_most_ten_and_only_on_ec2() {
        let rule = item(
            serde_json::json!({"pk": "job#*", "sk": "tags#docker-build", "type": "EC2",
            "warm_pool": 3}),
        )
        .unwrap();
        let Executor::Ec2(route) = &rule.executor else {
            panic!("{rule:?}")
        };
        assert_eq!(route.warm_pool, Some(3));
        assert_eq!(rule_from_item(&rule.to_item()).unwrap(), rule);
        let entry = RegistryEntry::from_rule(&rule);
        assert_eq!(entry.warm_pool, Some(3));
        assert_eq!(entry.to_rule().unwrap(), rule);
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["warmPool"], 3, "the registry's spelling");
        let refused = |json: serde_json::Value| item(json).unwrap_err().to_string();
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "warm_pool": 11})
            ),
            "warm_pool: 11 is more than 10 stopped instances for one route"
        );
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "warm_pool": "2"})
            ),
            "warm_pool: must be a number, found \"2\""
        );
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "warm_pool": -1})
            ),
            "warm_pool: must be a whole number, found -1"
        );
        let lambda = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "LAMBDA", "arn": lambda, "warm_pool": 1})
            ),
            "warm_pool: only applies to type EC2"
        );
    }

    #[test]
    fn docker_fields_where_they_cannot_apply_are_refused_by_name() {
        let refused = |json: serde_json::Value| item(json).unwrap_err().to_string();
        let lambda = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "LAMBDA", "arn": lambda, "privileged": true})
            ),
            "privileged: only applies to type EC2"
        );
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "LAMBDA", "arn": lambda, "image": "alpine:3"})
            ),
            "image: only applies to type EC2"
        );
        assert!(
            refused(serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "executor": "shell", "image": "alpine:3"}))
                .starts_with("image: only applies to executor docker")
        );
        assert!(
            refused(serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "image": "alpine:3; curl x|sh"}))
                .starts_with("image: `alpine:3; curl x|sh` is not a docker image")
        );
        assert_eq!(
            refused(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "privileged": "yes"})
            ),
            "privileged: must be true or false, found \"yes\""
        );
    }

    /// The texts an item may write are the enums' serde names, no more: what the mapper
    /// answers, the registry writes and the workflows compare are one list.
    #[test]
    fn accepted_texts_are_exactly_the_serde_names() {
        use crate::text::names;
        assert_eq!(names::<Market>(), ["spot", "on-demand"]);
        assert_eq!(names::<RunnerExecutor>(), ["shell", "docker"]);
        assert_eq!(names::<ExecutorKind>(), ["LAMBDA", "EC2", "SKIP"]);
        let refused = |json: serde_json::Value| item(json).unwrap_err().to_string();
        for market in [Market::Spot, Market::OnDemand] {
            let text = market.to_string();
            assert_eq!(serde_json::to_value(market).unwrap(), text.as_str());
            let rule = item(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "market": text}),
            )
            .unwrap();
            let Executor::Ec2(route) = &rule.executor else {
                panic!("{rule:?}")
            };
            assert_eq!(route.market, Some(market));
            assert_eq!(rule.to_item()["market"], text.as_str());
            assert_eq!(RegistryEntry::from_rule(&rule).market, Some(text));
        }
        for executor in [RunnerExecutor::Shell, RunnerExecutor::Docker] {
            let text = executor.to_string();
            assert_eq!(serde_json::to_value(executor).unwrap(), text.as_str());
            let rule = item(
                serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2", "executor": text}),
            )
            .unwrap();
            assert_eq!(rule.to_item()["executor"], text.as_str());
            assert_eq!(RegistryEntry::from_rule(&rule).executor, Some(text));
        }
        // Anything else (another spelling, the Rust name) is refused, naming the values.
        for (field, value, problem) in [
            ("market", "Spot", "`Spot`: use spot or on-demand"),
            ("market", "on_demand", "`on_demand`: use spot or on-demand"),
            ("executor", "Docker", "`Docker`: use shell or docker"),
            ("executor", "podman", "`podman`: use shell or docker"),
        ] {
            let mut json = serde_json::json!({"pk": "job#a", "sk": "tags#", "type": "EC2"});
            json[field] = value.into();
            assert_eq!(refused(json), format!("{field}: {problem}"));
        }
        for kind in ["SKIP", "lambda", "Ec2", "FARGATE"] {
            assert_eq!(
                refused(
                    serde_json::json!({"pk": "job#a", "sk": "tags#", "type": kind, "arn": ARN})
                ),
                format!("type: `{kind}`: use LAMBDA or EC2")
            );
        }
        assert_eq!(
            refused(serde_json::json!({"pk": "job#a", "sk": "tags#"})),
            "type: missing: LAMBDA or EC2"
        );
    }

    /// An executor's kind is the `type` tag it serializes with (the mapper's answer).
    #[test]
    fn an_executors_kind_is_its_type_tag() {
        for executor in [
            Executor::Lambda { arn: ARN.into() },
            Executor::Ec2(Ec2Settings::default()),
            Executor::Skip,
        ] {
            let json = serde_json::to_value(&executor).unwrap();
            assert_eq!(json["type"], executor.kind().to_string().as_str(), "{json}");
            assert_eq!(
                json["type"].as_str().unwrap().parse::<ExecutorKind>(),
                Ok(executor.kind())
            );
        }
        assert_eq!(ExecutorKind::routes_text(), "LAMBDA or EC2");
        assert_eq!(ExecutorKind::parse_route("EC2"), Ok(ExecutorKind::Ec2));
    }

    #[test]
    fn skip_is_no_item_type() {
        let item = serde_json::json!({"pk": "job#x", "sk": "tags#", "type": "SKIP"});
        assert!(rule_from_item(item.as_object().unwrap()).is_err());
    }
}
