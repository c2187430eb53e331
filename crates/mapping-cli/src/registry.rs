//! Registry files (`{"jobs": [...]}`, JSON or YAML): reading them and finding every problem,
//! each located by entry (index and name) and field.
//!
//! The entries' shape is `ephemeral_core::mapping::RegistryEntry`'s: this module only asks
//! serde about one field at a time, so that one mistake does not hide the others and every
//! message names its field.

use std::collections::HashMap;
use std::fmt;

use ephemeral_core::mapping::{ExecutorKind, Registry, RegistryEntry, RegistryError, Rule};
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// `.json`, `.yaml` or `.yml` (any case).
    pub fn from_path(path: &str) -> Option<Self> {
        let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "json" => Some(Self::Json),
            "yaml" | "yml" => Some(Self::Yaml),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Yaml => "YAML",
        }
    }
}

/// Something wrong (or suspicious) in a registry file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Position in `jobs`; `None` for the file as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The entry's `name`, when it has a readable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same shape as core's `RegistryError`: jobs[2] (name `x`): field: problem
        match (self.index, &self.name) {
            (Some(i), Some(name)) => write!(f, "jobs[{i}] (name `{name}`): ")?,
            (Some(i), None) => write!(f, "jobs[{i}] (no name): ")?,
            (None, _) => {}
        }
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl From<RegistryError> for Problem {
    fn from(e: RegistryError) -> Self {
        Self {
            index: Some(e.index),
            name: Some(e.name),
            field: e.error.field.to_owned(),
            problem: e.error.problem,
        }
    }
}

fn whole_file(field: &str, problem: impl Into<String>) -> Problem {
    Problem {
        index: None,
        name: None,
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// The outcome of checking a registry file.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// How many entries `jobs` has (0 when the file could not be read that far).
    pub entries: usize,
    /// The rules, in file order; complete only when `problems` is empty.
    pub rules: Vec<Rule>,
    pub problems: Vec<Problem>,
    /// Not errors, but likely not what was meant.
    pub warnings: Vec<Problem>,
}

impl Checked {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Parses `text` and validates every entry, collecting every problem.
pub fn check(text: &str, format: Format) -> Checked {
    let mut out = Checked::default();
    let entries = match parse_value(text, format).and_then(|v| entry_list(v, &mut out)) {
        Ok(entries) => entries,
        Err(problem) => {
            out.problems.push(problem);
            return out;
        }
    };
    out.entries = entries.len();

    let mut parsed = Vec::new();
    for (index, value) in entries.iter().enumerate() {
        match read_entry(index, value) {
            Ok(entry) => parsed.push((index, entry)),
            Err(problems) => out.problems.extend(problems),
        }
    }
    for (index, entry) in &parsed {
        lint_entry(*index, entry, &mut out);
    }

    if parsed.len() == entries.len() {
        // Every entry has the right shape: core validates them together (duplicates too).
        let registry = Registry {
            jobs: parsed.into_iter().map(|(_, e)| e).collect(),
        };
        match registry.rules() {
            Ok(rules) => out.rules = rules,
            Err(errors) => out.problems.extend(errors.into_iter().map(Problem::from)),
        }
    } else {
        check_one_by_one(parsed, &mut out);
    }
    out.problems
        .sort_by_key(|p| (p.index.map_or(0, |i| i + 1), p.field.clone()));
    if !out.problems.is_empty() {
        out.rules.clear();
    }
    out.warnings.extend(same_tags_other_order(&out.rules));
    out
}

/// The `jobs` list of a registry file's top-level object; unknown top-level fields are noted
/// in `out` (the entries are still checked), a missing or mistyped list is the problem.
fn entry_list(value: Value, out: &mut Checked) -> Result<Vec<Value>, Problem> {
    let Value::Object(mut top) = value else {
        return Err(whole_file(
            "top level",
            format!(
                "must be an object with a `jobs` list, found {}",
                describe(&value)
            ),
        ));
    };
    for key in top.keys().filter(|k| *k != "jobs") {
        out.problems.push(whole_file(
            "top level",
            format!("unknown field `{key}`: a registry file has only `jobs`, the list of entries"),
        ));
    }
    match top.remove("jobs") {
        Some(Value::Array(entries)) => Ok(entries),
        Some(other) => Err(whole_file(
            "jobs",
            format!("must be a list of entries, found {}", describe(&other)),
        )),
        None => Err(whole_file(
            "jobs",
            "missing: a registry file is {\"jobs\": [ {\"name\": ..., \"type\": ...}, ... ]}",
        )),
    }
}

/// Some entries are unreadable: validate the others one by one, so their problems are
/// reported now rather than after the first round of fixes.
fn check_one_by_one(parsed: Vec<(usize, RegistryEntry)>, out: &mut Checked) {
    let mut keys = HashMap::new();
    for (index, entry) in parsed {
        match entry.to_rule() {
            Ok(rule) => {
                if let Some(first) = keys.insert((rule.pk(), rule.sk()), index) {
                    out.problems.push(Problem {
                        index: Some(index),
                        name: Some(entry.name.clone()),
                        field: "tags".into(),
                        problem: format!(
                            "same job name, project and tags as jobs[{first}]: one would overwrite the other"
                        ),
                    });
                }
            }
            Err(error) => out.problems.push(
                RegistryError {
                    index,
                    name: entry.name.clone(),
                    error,
                }
                .into(),
            ),
        }
    }
}

fn parse_value(text: &str, format: Format) -> Result<Value, Problem> {
    if text.trim().is_empty() {
        return Err(whole_file(
            "file",
            "empty: a registry file is {\"jobs\": [...]}",
        ));
    }
    let parsed = match format {
        Format::Json => serde_json::from_str::<Value>(text).map_err(|e| e.to_string()),
        Format::Yaml => serde_norway::from_str::<Value>(text).map_err(|e| e.to_string()),
    };
    parsed.map_err(|e| whole_file("file", format!("not valid {}: {e}", format.name())))
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// The text between the first backticks after `marker`.
fn quoted_after(message: &str, marker: &str) -> Option<String> {
    let rest = &message[message.find(marker)? + marker.len()..];
    Some(rest[..rest.find('`')?].to_owned())
}

fn normalised(field: &str) -> String {
    field
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// serde's "invalid type: integer `5`, expected a string" as "must be a string, found integer `5`".
fn type_problem(message: &str) -> String {
    match message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    {
        Some((found, expected)) => {
            let expected = expected.replace("a sequence", "a list");
            format!("must be {expected}, found {found}")
        }
        None => message.to_owned(),
    }
}

/// One entry, checked a field at a time against core's `RegistryEntry`.
fn read_entry(index: usize, value: &Value) -> Result<RegistryEntry, Vec<Problem>> {
    let Value::Object(obj) = value else {
        return Err(vec![Problem {
            index: Some(index),
            name: None,
            field: "(entry)".into(),
            problem: format!(
                "must be an object like {{\"name\": \"build\", \"type\": \"EC2\"}}, found {}",
                describe(value)
            ),
        }]);
    };
    let name = obj.get("name").and_then(Value::as_str).map(str::to_owned);
    let at = |field: &str, problem: String| Problem {
        index: Some(index),
        name: name.clone(),
        field: field.to_owned(),
        problem,
    };
    let mut problems: Vec<Problem> = obj
        .iter()
        .filter_map(|(key, field_value)| field_problem(key, field_value))
        .map(|(field, problem)| at(&field, problem))
        .collect();
    for (required, what) in [
        (
            "name",
            "the GitLab job name, or \"*\" for any job".to_owned(),
        ),
        ("type", ExecutorKind::routes_text()),
    ] {
        if !obj.contains_key(required) {
            problems.push(at(required, format!("missing: {what}")));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Each field is fine alone; what is left is about fields together (`arn` and `lambdaArn`).
    serde_json::from_value::<RegistryEntry>(value.clone()).map_err(|e| {
        let message = e.to_string();
        let field = quoted_after(&message, "field `").unwrap_or_else(|| "(entry)".into());
        let problem = if message.starts_with("duplicate field") {
            "given twice (`arn` is another name for `lambdaArn`): keep one".to_owned()
        } else {
            message
        };
        vec![at(&field, problem)]
    })
}

/// The problem of one field of an entry, if it has one: the field alone, with the two
/// required ones filled in, shows exactly this field's problem whatever the rest of the entry
/// holds. `(field, problem)`.
fn field_problem(key: &str, field_value: &Value) -> Option<(String, String)> {
    let mut alone = Map::new();
    alone.insert("name".into(), "n".into());
    alone.insert("type".into(), ExecutorKind::Ec2.to_string().into());
    alone.insert(key.to_owned(), field_value.clone());
    let message = serde_json::from_value::<RegistryEntry>(Value::Object(alone))
        .err()?
        .to_string();
    let problem = if message.starts_with("unknown field") {
        let expected: Vec<String> = message
            .split_once("expected one of ")
            .map(|(_, list)| {
                list.split(", ")
                    .map(|f| f.trim_matches('`').to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let hint = expected
            .iter()
            .find(|f| normalised(f) == normalised(key))
            .map(|f| format!(" (did you mean `{f}`?)"))
            .unwrap_or_default();
        format!(
            "unknown field{hint}; an entry may have: {}",
            expected.join(", ")
        )
    } else if field_value.is_array() && message.ends_with("expected a string") {
        let found = type_problem(&message);
        let found = found.split_once(", found ").map_or("", |(_, f)| f);
        format!("must be a list of strings, found {found} in it")
    } else {
        type_problem(&message)
    };
    Some((key.to_owned(), problem))
}

/// What core's `RegistryEntry::to_rule` accepts but the operator should hear about.
fn lint_entry(index: usize, entry: &RegistryEntry, out: &mut Checked) {
    // A warning, not an error: seed files may carry it, and the seed ignored it too.
    if entry.kind.parse() == Ok(ExecutorKind::Ec2) && entry.lambda_arn.is_some() {
        out.warnings.push(Problem {
            index: Some(index),
            name: Some(entry.name.clone()),
            field: "lambdaArn".to_owned(),
            problem: "ignored for type EC2: not written to the table".to_owned(),
        });
    }
}

/// Rules with the same name, project and tags in another order are two items; both match the
/// same jobs, and the lower sort key wins.
fn same_tags_other_order(rules: &[Rule]) -> Vec<Problem> {
    let mut seen: HashMap<_, usize> = HashMap::new();
    let mut out = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let mut tags = rule.tags.clone();
        tags.sort();
        if let Some(first) = seen.insert((rule.pk(), rule.project.clone(), tags), index) {
            out.push(Problem {
                index: Some(index),
                name: Some(rule.job_name.clone()),
                field: "tags".into(),
                problem: format!(
                    "the same tags as jobs[{first}] in another order: two items that match the same jobs (the lower sort key wins)"
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str, format: Format) -> Vec<String> {
        check(text, format)
            .problems
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_seed_file_is_accepted_as_it_is() {
        let seed = r#"{"jobs": [
            {"type": "LAMBDA", "name": "unit-test", "tags": [], "lambdaArn": "arn:aws:lambda:eu-west-1:123456789012:function:runner"},
            {"type": "EC2", "name": "docker-build", "tags": ["docker", "large"]}
        ]}"#;
        let checked = check(seed, Format::Json);
        assert!(checked.is_valid(), "{:?}", checked.problems);
        assert_eq!(checked.rules.len(), 2);
        assert!(checked.warnings.is_empty());
    }

    #[test]
    fn every_problem_is_located() {
        let text = r#"{"jobs": [
            {"type": "LAMBDA", "name": "a", "tags": "docker", "instance_type": "t3.large"},
            {"name": "b", "tags": [1]},
            "oops",
            {"type": "FARGATE", "name": "d"},
            {"type": "LAMBDA", "name": "e", "arn": "arn:aws:lambda:us-east-1:1:function:f",
             "lambdaArn": "arn:aws:lambda:us-east-1:1:function:f"}
        ], "version": 2}"#;
        let mut p = problems(text, Format::Json);
        // The list of allowed fields is core's (serde's message); check it is there, then
        // compare the rest exactly.
        let allowed = "; an entry may have: name, type, tags, ";
        assert!(
            p[1].contains(allowed) && p[1].contains("instanceType"),
            "{}",
            p[1]
        );
        let cut = p[1].find(allowed).unwrap();
        p[1].truncate(cut);
        assert_eq!(
            p,
            [
                "top level: unknown field `version`: a registry file has only `jobs`, the list of entries",
                "jobs[0] (name `a`): instance_type: unknown field (did you mean `instanceType`?)",
                "jobs[0] (name `a`): tags: must be a list, found string \"docker\"",
                "jobs[1] (name `b`): tags: must be a list of strings, found integer `1` in it",
                "jobs[1] (name `b`): type: missing: LAMBDA or EC2",
                "jobs[2] (no name): (entry): must be an object like {\"name\": \"build\", \"type\": \"EC2\"}, found the string \"oops\"",
                "jobs[3] (name `d`): type: `FARGATE`: use LAMBDA or EC2",
                "jobs[4] (name `e`): lambdaArn: given twice (`arn` is another name for `lambdaArn`): keep one",
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn yaml_and_syntax_errors() {
        let yaml = "jobs:\n  - name: build\n    type: EC2\n    tags: [docker]\n    market: spot\n";
        let checked = check(yaml, Format::Yaml);
        assert!(checked.is_valid(), "{:?}", checked.problems);
        assert_eq!(checked.rules[0].sk(), "tags#docker");

        let p = problems("{\"jobs\": [}", Format::Json);
        assert!(
            p[0].starts_with("file: not valid JSON: ") && p[0].contains("line 1"),
            "{p:?}"
        );
        let p = problems("jobs:\n  - name: *\n", Format::Yaml);
        assert!(p[0].starts_with("file: not valid YAML: "), "{p:?}");
        assert_eq!(problems("", Format::Yaml).len(), 1);
        assert_eq!(
            problems("[]", Format::Json),
            ["top level: must be an object with a `jobs` list, found a list"]
        );
    }

    #[test]
    fn settings_that_cannot_apply_are_reported() {
        let text = r#"{"jobs": [
            {"type": "LAMBDA", "name": "a", "lambdaArn": "arn:aws:lambda:us-east-1:1:function:f", "subnets": ["subnet-1"], "executor": "docker"},
            {"type": "EC2", "name": "b", "lambdaArn": "arn:aws:lambda:us-east-1:1:function:f"},
            {"type": "EC2", "name": "c", "tags": ["x", "y"]},
            {"type": "EC2", "name": "c", "tags": ["y", "x"]}
        ]}"#;
        let checked = check(text, Format::Json);
        let p: Vec<String> = checked.problems.iter().map(ToString::to_string).collect();
        // Core reports the first EC2-only setting on a LAMBDA entry.
        assert_eq!(
            p,
            ["jobs[0] (name `a`): executor: only applies to type EC2"]
        );
        let w: Vec<String> = checked.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("jobs[1] (name `b`): lambdaArn: ignored"));

        let mut ok = check(
            &text.replace(r#", "subnets": ["subnet-1"], "executor": "docker""#, ""),
            Format::Json,
        );
        assert!(ok.is_valid(), "{:?}", ok.problems);
        let last = ok.warnings.pop().unwrap().to_string();
        assert!(
            last.starts_with("jobs[3] (name `c`): tags: the same tags as jobs[2]"),
            "{last}"
        );
    }
}
