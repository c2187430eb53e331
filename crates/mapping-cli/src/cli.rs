//! Arguments and the commands behind them. Each command writes its human (or `--json`)
//! output into an [`Outcome`]; `main` prints it and exits with its code.

use std::fmt::Write as _;
use std::io::Read;

use aws_config::SdkConfig;
use clap::{Args, Parser, Subcommand};
use ephemeral_core::mapping::{ExecutorKind, Registry, RegistryEntry, Rule, rule_from_item};
use serde_json::{Map, Value, json};

use crate::plan::{self, Plan, rule_error_text};
use crate::registry::{self, Format};
use crate::table::{self, TableItem, TableRef, key_text};

/// Manage the mapping table: which executor (in-Lambda shell runner or EC2) runs which
/// GitLab job.
///
/// Exit codes: 0 success (diff: no difference); 1 error (invalid file or item, AWS failure,
/// bad arguments); 2 diff found differences, or delete found no such item.
#[derive(Debug, Parser)]
#[command(name = "runner-mappings", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a registry file and report every problem, with its entry and field (no AWS access)
    Validate {
        #[command(flatten)]
        file: FileArg,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Compare a registry file with the table; exit 0 if they are equal, 2 if not
    Diff {
        #[command(flatten)]
        file: FileArg,
        #[command(flatten)]
        table: TableArg,
        /// Show items only in the table as "would be deleted" (what apply --prune does)
        #[arg(long)]
        prune: bool,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Make the table hold the file's items: validates first, then writes only what differs
    Apply {
        #[command(flatten)]
        file: FileArg,
        #[command(flatten)]
        table: TableArg,
        /// Also delete the table's items that are not in the file
        #[arg(long)]
        prune: bool,
        /// Say what would be written, write nothing
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Show every item of the table; invalid items are flagged
    List {
        #[command(flatten)]
        table: TableArg,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Delete one item, named as in a registry entry (or by its raw --pk/--sk)
    Delete {
        #[command(flatten)]
        table: TableArg,
        #[command(flatten)]
        key: KeyArgs,
        /// Machine-readable output (JSON)
        #[arg(long)]
        json: bool,
    },
    /// Print the table as a registry file (apply of the output changes nothing)
    Export {
        #[command(flatten)]
        table: TableArg,
        /// Output format
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        /// Leave invalid items out (listed on stderr) instead of failing
        #[arg(long)]
        skip_invalid: bool,
    },
}

impl Command {
    /// Whether the command talks to AWS (everything but `validate`).
    pub fn needs_aws(&self) -> bool {
        !matches!(self, Self::Validate { .. })
    }
}

#[derive(Debug, Args)]
pub struct FileArg {
    /// Registry file (.json, .yaml or .yml); `-` reads standard input and needs --format
    pub file: String,
    /// The file's format, when its extension does not say it
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TableArg {
    /// The mapping table's name
    #[arg(long, value_name = "NAME")]
    pub table: Option<String>,
    /// A deployed stack: its MappingTableName output, else its table resource with logical id
    /// MappingTable (or the seed's GitLabJobTagsMapping)
    #[arg(long, value_name = "STACK")]
    pub stack: Option<String>,
}

impl TableArg {
    fn to_ref(&self) -> TableRef {
        match (&self.table, &self.stack) {
            (Some(t), _) => TableRef::Name(t.clone()),
            (None, Some(s)) => TableRef::Stack(s.clone()),
            (None, None) => unreachable!("clap requires --table or --stack"),
        }
    }
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The job name, or `*` for an item that matches any name
    #[arg(long, required_unless_present = "pk", conflicts_with_all = ["pk", "sk"])]
    pub name: Option<String>,
    /// The item's tags, comma-separated, in the order they are stored
    #[arg(long, value_delimiter = ',', requires = "name")]
    pub tags: Vec<String>,
    /// The project the item is scoped to (id or path)
    #[arg(long, requires = "name")]
    pub project: Option<String>,
    /// The raw partition key, for items no registry entry can name
    #[arg(long, requires = "sk")]
    pub pk: Option<String>,
    /// The raw sort key (with --pk)
    #[arg(long, requires = "pk")]
    pub sk: Option<String>,
}

/// What a command printed and how it ended.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

/// Runs one command. `sdk` may be `None` for `validate`; `stdin` is read for the file `-`.
pub async fn run(cli: Cli, sdk: Option<&SdkConfig>, stdin: &mut dyn Read) -> Outcome {
    let mut out = Outcome::default();
    let result = if cli.command.needs_aws() && sdk.is_none() {
        Err("no AWS configuration".to_owned())
    } else {
        let sdk = sdk.cloned().unwrap_or_else(|| SdkConfig::builder().build());
        match cli.command {
            Command::Validate { file, json } => validate(&mut out, &file, stdin, json),
            Command::Diff {
                file,
                table,
                prune,
                json,
            } => diff(&mut out, &sdk, &file, stdin, &table.to_ref(), prune, json).await,
            Command::Apply {
                file,
                table,
                prune,
                dry_run,
                json,
            } => {
                let opts = ApplyOptions {
                    prune,
                    dry_run,
                    json,
                };
                apply(&mut out, &sdk, &file, stdin, &table.to_ref(), opts).await
            }
            Command::List { table, json } => list(&mut out, &sdk, &table.to_ref(), json).await,
            Command::Delete { table, key, json } => {
                delete(&mut out, &sdk, &table.to_ref(), &key, json).await
            }
            Command::Export {
                table,
                format,
                skip_invalid,
            } => export(&mut out, &sdk, &table.to_ref(), format, skip_invalid).await,
        }
    };
    match result {
        Ok(code) => out.code = code,
        Err(message) => {
            let _ = writeln!(out.stderr, "error: {message}");
            out.code = 1;
        }
    }
    out
}

fn read_source(file: &FileArg, stdin: &mut dyn Read) -> Result<(String, String, Format), String> {
    if file.file == "-" {
        let format = file.format.ok_or(
            "reading the registry from standard input needs --format json or --format yaml",
        )?;
        let mut text = String::new();
        stdin
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        return Ok(("<stdin>".into(), text, format));
    }
    let format = file.format.or_else(|| Format::from_path(&file.file)).ok_or_else(|| {
        format!(
            "cannot tell the format of `{}` from its name: use .json, .yaml or .yml, or pass --format json|yaml",
            file.file
        )
    })?;
    let text = std::fs::read_to_string(&file.file)
        .map_err(|e| format!("cannot read `{}`: {e}", file.file))?;
    Ok((file.file.clone(), text, format))
}

fn print_json(out: &mut Outcome, value: &Value) {
    out.stdout
        .push_str(&serde_json::to_string_pretty(value).expect("JSON values serialize"));
    out.stdout.push('\n');
}

fn kinds(rules: &[Rule]) -> String {
    let lambda = rules
        .iter()
        .filter(|r| r.executor.kind() == ExecutorKind::Lambda)
        .count();
    format!(
        "{lambda} {}, {} {}",
        ExecutorKind::Lambda,
        rules.len() - lambda,
        ExecutorKind::Ec2
    )
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn validate(
    out: &mut Outcome,
    file: &FileArg,
    stdin: &mut dyn Read,
    json: bool,
) -> Result<u8, String> {
    let (label, text, format) = read_source(file, stdin)?;
    let checked = registry::check(&text, format);
    if json {
        print_json(
            out,
            &json!({
                "file": label,
                "valid": checked.is_valid(),
                "entries": checked.entries,
                "problems": checked.problems,
                "warnings": checked.warnings,
            }),
        );
    } else {
        report_checked(out, &label, &checked);
        if checked.is_valid() {
            let _ = writeln!(
                out.stdout,
                "{label}: {} valid ({})",
                plural(checked.entries, "entry", "entries"),
                kinds(&checked.rules)
            );
        } else {
            let _ = writeln!(
                out.stderr,
                "{label}: {}; apply writes nothing until every one is fixed",
                plural(checked.problems.len(), "problem", "problems")
            );
        }
    }
    Ok(if checked.is_valid() { 0 } else { 1 })
}

fn report_checked(out: &mut Outcome, label: &str, checked: &registry::Checked) {
    for w in &checked.warnings {
        let _ = writeln!(out.stderr, "warning: {label}: {w}");
    }
    for p in &checked.problems {
        let _ = writeln!(out.stderr, "{label}: {p}");
    }
}

/// The file's rules, or its problems printed and an error saying what was not done.
fn load_valid(
    out: &mut Outcome,
    file: &FileArg,
    stdin: &mut dyn Read,
    not_done: &str,
) -> Result<(String, Vec<Rule>), String> {
    let (label, text, format) = read_source(file, stdin)?;
    let checked = registry::check(&text, format);
    report_checked(out, &label, &checked);
    if !checked.is_valid() {
        return Err(format!(
            "{label} has {}: {not_done}",
            plural(checked.problems.len(), "problem", "problems")
        ));
    }
    Ok((label, checked.rules))
}

fn value_text(value: Option<&Value>) -> String {
    value.map_or_else(|| "(absent)".to_owned(), Value::to_string)
}

/// `LAMBDA arn:...` or `EC2 instanceType=... market=...`, for one-line summaries.
fn rule_summary(rule: &Rule) -> String {
    let e = RegistryEntry::from_rule(rule);
    format!("{} {}", e.kind, target(&e))
}

fn target(e: &RegistryEntry) -> String {
    if let Some(arn) = &e.lambda_arn {
        return arn.clone();
    }
    let mut parts = Vec::new();
    let mut add = |name: &str, value: &Option<String>| {
        if let Some(v) = value {
            parts.push(format!("{name}={v}"));
        }
    };
    add("instanceType", &e.instance_type);
    add("ami", &e.ami);
    add("market", &e.market);
    if !e.subnets.is_empty() {
        add("subnets", &Some(e.subnets.join(",")));
    }
    add("executor", &e.executor);
    if parts.is_empty() {
        "(the stack's EC2 defaults)".to_owned()
    } else {
        parts.join(" ")
    }
}

fn item_summary(item: &Map<String, Value>) -> String {
    rule_from_item(item).map_or_else(
        |e| format!("invalid: {}", rule_error_text(&e)),
        |r| rule_summary(&r),
    )
}

fn warn_items(out: &mut Outcome, items: &[TableItem]) {
    for item in items {
        for w in item.warnings() {
            let _ = writeln!(out.stderr, "warning: {}: {w}", item.key_text());
        }
    }
}

async fn diff(
    out: &mut Outcome,
    sdk: &SdkConfig,
    file: &FileArg,
    stdin: &mut dyn Read,
    table: &TableRef,
    prune: bool,
    json: bool,
) -> Result<u8, String> {
    let (label, rules) = load_valid(out, file, stdin, "fix it before comparing")?;
    let table = table::open(sdk, table).await?;
    let items = table.scan().await?;
    let plan = plan::plan(&rules, &items);
    if json {
        print_json(
            out,
            &json!({
                "table": table.name,
                "file": label,
                "equal": plan.is_empty(),
                "add": plan.add,
                "change": plan.change,
                "only_in_table": only_in_table_json(&plan, if prune { "delete" } else { "remain" }),
                "unchanged": plan.unchanged,
            }),
        );
        return Ok(if plan.is_empty() { 0 } else { 2 });
    }
    if plan.is_empty() {
        let _ = writeln!(
            out.stdout,
            "{table} matches {label}: {}, no difference",
            plural(plan.unchanged, "item", "items")
        );
        return Ok(0);
    }
    let s = &mut out.stdout;
    for item in &plan.add {
        let (pk, sk) = item_key(item);
        let _ = writeln!(s, "add     {}: {}", key_text(&pk, &sk), item_summary(item));
    }
    for change in &plan.change {
        let _ = writeln!(s, "change  {}:", key_text(&change.pk, &change.sk));
        write_changes(s, change);
    }
    write_only_in_table(s, &plan, if prune { "delete" } else { "remain" });
    let _ = writeln!(
        s,
        "{table} differs from {label}: {} to add, {} to change, {} only in the table ({}), {} unchanged",
        plan.add.len(),
        plan.change.len(),
        plan.only_in_table.len(),
        if prune {
            "apply --prune deletes them"
        } else {
            "they remain; apply --prune would delete them"
        },
        plan.unchanged
    );
    Ok(2)
}

fn item_key(item: &Map<String, Value>) -> (String, String) {
    let text = |k| {
        item.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    (text("pk"), text("sk"))
}

fn write_changes(s: &mut String, change: &plan::Change) {
    if let Some(why) = &change.invalid_in_table {
        let _ = writeln!(s, "          the table's item is invalid now: {why}");
    }
    for c in &change.changes {
        let _ = writeln!(
            s,
            "          {}: {} -> {}",
            c.attribute,
            value_text(c.table.as_ref()),
            value_text(c.file.as_ref())
        );
    }
}

fn write_only_in_table(s: &mut String, plan: &Plan, action: &str) {
    for item in &plan.only_in_table {
        let what = match &item.rule {
            Ok(rule) => rule_summary(rule),
            Err(e) => format!("INVALID {}", rule_error_text(e)),
        };
        let verb = match action {
            "delete" => "delete  ",
            "deleted" => "deleted ",
            "kept" => "kept    ",
            _ => "remain  ",
        };
        let note = match action {
            "delete" | "deleted" => "",
            _ => " (not in the file; --prune deletes it)",
        };
        let _ = writeln!(s, "{verb}{}: {what}{note}", item.key_text());
    }
}

fn only_in_table_json(plan: &Plan, action: &str) -> Vec<Value> {
    plan.only_in_table
        .iter()
        .map(|i| {
            let mut v = json!({"pk": i.pk, "sk": i.sk, "action": action, "item": i.attributes});
            if let Err(e) = &i.rule {
                v["invalid"] = json!({"field": e.field, "problem": e.problem});
            }
            v
        })
        .collect()
}

struct ApplyOptions {
    prune: bool,
    dry_run: bool,
    json: bool,
}

async fn apply(
    out: &mut Outcome,
    sdk: &SdkConfig,
    file: &FileArg,
    stdin: &mut dyn Read,
    table: &TableRef,
    opts: ApplyOptions,
) -> Result<u8, String> {
    let (label, rules) = load_valid(out, file, stdin, "nothing was written")?;
    let table = table::open(sdk, table).await?;
    let items = table.scan().await?;
    let plan = plan::plan(&rules, &items);
    if !opts.dry_run {
        write_plan(&table, &plan, opts.prune).await?;
    }
    if opts.json {
        apply_json(out, &table.name, &label, &plan, &opts);
    } else {
        apply_report(out, &table, &plan, &opts);
    }
    Ok(0)
}

/// How many writes the plan makes: adds, updates, and (with `--prune`) deletes.
fn changed_count(plan: &Plan, prune: bool) -> usize {
    plan.add.len() + plan.change.len() + if prune { plan.only_in_table.len() } else { 0 }
}

/// The plan's writes. The file was valid, so every write is a valid item. Each write is
/// idempotent: after a failure, running apply again finishes the job and skips what is done.
async fn write_plan(table: &table::Table, plan: &Plan<'_>, prune: bool) -> Result<(), String> {
    let changed = changed_count(plan, prune);
    let mut done = 0;
    let failed = |e: String, done: usize| {
        format!(
            "{e}\n{done} of {changed} writes were done before it; run apply again to finish (it skips what is already done)"
        )
    };
    for item in plan.add.iter().chain(plan.change.iter().map(|c| &c.item)) {
        table.put(item).await.map_err(|e| failed(e, done))?;
        done += 1;
    }
    if prune {
        for item in &plan.only_in_table {
            table
                .delete(&item.pk, &item.sk)
                .await
                .map_err(|e| failed(e, done))?;
            done += 1;
        }
    }
    Ok(())
}

fn apply_json(out: &mut Outcome, table: &str, label: &str, plan: &Plan, opts: &ApplyOptions) {
    let keys = |items: Vec<(String, String)>| -> Vec<Value> {
        items
            .into_iter()
            .map(|(pk, sk)| json!({"pk": pk, "sk": sk}))
            .collect()
    };
    let only_in_table = || {
        keys(
            plan.only_in_table
                .iter()
                .map(|i| (i.pk.clone(), i.sk.clone()))
                .collect(),
        )
    };
    print_json(
        out,
        &json!({
            "table": table,
            "file": label,
            "dry_run": opts.dry_run,
            "changed": changed_count(plan, opts.prune),
            "added": keys(plan.add.iter().map(item_key).collect()),
            "updated": plan.change.iter().map(|c| json!({"pk": c.pk, "sk": c.sk,
                "attributes": c.changes.iter().map(|a| a.attribute.clone()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
            "deleted": if opts.prune { only_in_table() } else { vec![] },
            "kept": if opts.prune { vec![] } else { only_in_table() },
            "unchanged": plan.unchanged,
        }),
    );
}

fn apply_report(out: &mut Outcome, table: &table::Table, plan: &Plan, opts: &ApplyOptions) {
    let (added, updated) = if opts.dry_run {
        ("would add     ", "would update  ")
    } else {
        ("added   ", "updated ")
    };
    let s = &mut out.stdout;
    for item in &plan.add {
        let (pk, sk) = item_key(item);
        let _ = writeln!(s, "{added}{}: {}", key_text(&pk, &sk), item_summary(item));
    }
    for change in &plan.change {
        let _ = writeln!(s, "{updated}{}:", key_text(&change.pk, &change.sk));
        write_changes(s, change);
    }
    let action = match (opts.prune, opts.dry_run) {
        (true, true) => "delete",
        (true, false) => "deleted",
        (false, _) => "kept",
    };
    if opts.dry_run && opts.prune {
        for item in &plan.only_in_table {
            let _ = writeln!(s, "would delete  {}", item.key_text());
        }
    } else {
        write_only_in_table(s, plan, action);
    }
    let kept = if opts.prune || plan.only_in_table.is_empty() {
        String::new()
    } else {
        format!(
            ", {} not in the file kept (--prune deletes them)",
            plan.only_in_table.len()
        )
    };
    let deletes = if opts.prune {
        plan.only_in_table.len()
    } else {
        0
    };
    let changed = changed_count(plan, opts.prune);
    let counts = format!(
        "{} added, {} updated, {deletes} deleted",
        plan.add.len(),
        plan.change.len()
    );
    let _ = if opts.dry_run {
        writeln!(
            s,
            "dry run, nothing written: {table} would get {changed} changed ({counts}), {} unchanged{kept}",
            plan.unchanged
        )
    } else {
        writeln!(
            s,
            "{table}: {changed} changed ({counts}), {} unchanged{kept}",
            plan.unchanged
        )
    };
}

fn entry_columns(e: &RegistryEntry) -> [String; 4] {
    [
        e.name.clone(),
        match &e.project {
            Some(Value::String(p)) => p.clone(),
            Some(other) => other.to_string(),
            None => "-".into(),
        },
        if e.tags.is_empty() {
            "-".into()
        } else {
            e.tags.join(",")
        },
        e.kind.clone(),
    ]
}

pub fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for row in rows {
        let last = row.len() - 1;
        for (c, cell) in row.iter().enumerate() {
            if c == last {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{cell:<w$}  ", w = widths[c]);
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
    }
    s
}

async fn list(
    out: &mut Outcome,
    sdk: &SdkConfig,
    table: &TableRef,
    json: bool,
) -> Result<u8, String> {
    let table = table::open(sdk, table).await?;
    let items = table.scan().await?;
    if json {
        let rows: Vec<Value> = items.iter().map(item_json).collect();
        print_json(out, &json!({"table": table.name, "items": rows}));
        return Ok(0);
    }
    warn_items(out, &items);
    if items.is_empty() {
        let _ = writeln!(out.stdout, "{table} is empty");
        return Ok(0);
    }
    let with_description = items
        .iter()
        .any(|i| matches!(&i.rule, Ok(r) if r.description.is_some()));
    let mut rows = vec![
        ["NAME", "PROJECT", "TAGS", "TYPE", "TARGET"]
            .map(String::from)
            .to_vec(),
    ];
    if with_description {
        rows[0].push("DESCRIPTION".into());
    }
    for item in &items {
        let mut row = item_row(item, with_description);
        row.resize(rows[0].len(), String::new());
        rows.push(row);
    }
    out.stdout.push_str(&columns(&rows));
    let invalid = items.iter().filter(|i| i.rule.is_err()).count();
    let _ = writeln!(
        out.stdout,
        "{table}: {}{}",
        plural(items.len(), "item", "items"),
        if invalid > 0 {
            format!(
                ", {invalid} invalid (the mapper skips them; fix them with apply, or remove them with delete --pk/--sk or apply --prune)"
            )
        } else {
            String::new()
        }
    );
    Ok(0)
}

/// An item as `list --json` shows it: its key, the stored attributes, and either the entry it
/// reads as or why it is invalid.
fn item_json(item: &TableItem) -> Value {
    let mut v = json!({"pk": item.pk, "sk": item.sk, "valid": item.rule.is_ok(),
                       "item": item.attributes});
    match &item.rule {
        Ok(rule) => v["entry"] = json!(RegistryEntry::from_rule(rule)),
        Err(e) => v["invalid"] = json!({"field": e.field, "problem": e.problem}),
    }
    let warnings = item.warnings();
    if !warnings.is_empty() {
        v["warnings"] = json!(warnings);
    }
    v
}

/// An item's row of the `list` table; an invalid item shows what can be read of it.
fn item_row(item: &TableItem, with_description: bool) -> Vec<String> {
    match &item.rule {
        Ok(rule) => {
            let e = RegistryEntry::from_rule(rule);
            let mut row = entry_columns(&e).to_vec();
            row.push(target(&e));
            if with_description {
                row.push(e.description.clone().unwrap_or_default());
            }
            row
        }
        Err(e) => {
            let raw = |k: &str| {
                item.attributes.get(k).map_or_else(
                    || "?".into(),
                    |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            };
            vec![
                item.pk.strip_prefix("job#").unwrap_or(&item.pk).to_owned(),
                "?".into(),
                "?".into(),
                raw("type"),
                format!("INVALID {}: {}", item.key_text(), rule_error_text(e)),
            ]
        }
    }
}

async fn delete(
    out: &mut Outcome,
    sdk: &SdkConfig,
    table: &TableRef,
    key: &KeyArgs,
    json: bool,
) -> Result<u8, String> {
    let (pk, sk) = match (&key.name, &key.pk, &key.sk) {
        (Some(name), _, _) => {
            // The key comes from core's own logic, exactly as apply writes it.
            let tags: Vec<&str> = key
                .tags
                .iter()
                .map(String::as_str)
                .filter(|t| !t.is_empty())
                .collect();
            let entry: RegistryEntry = serde_json::from_value(json!({
                "name": name, "type": "EC2", "tags": tags, "project": key.project,
            }))
            .map_err(|e| format!("cannot build the key: {e}"))?;
            let rule = entry.to_rule().map_err(|e| {
                let flag = if e.field == "name" { "name" } else { e.field };
                format!("--{flag}: {}", e.problem)
            })?;
            (rule.pk(), rule.sk())
        }
        (None, Some(pk), Some(sk)) => (pk.clone(), sk.clone()),
        _ => {
            return Err(
                "name the item with --name (and --tags, --project), or with --pk and --sk".into(),
            );
        }
    };
    let table = table::open(sdk, table).await?;
    let old = table.delete(&pk, &sk).await?;
    let others = if old.is_none() {
        table.partition(&pk).await?
    } else {
        vec![]
    };
    if json {
        print_json(
            out,
            &json!({"table": table.name, "pk": pk, "sk": sk, "deleted": old.is_some(), "item": old,
                    "same_partition": others.iter().map(|i| i.sk.clone()).collect::<Vec<_>>()}),
        );
    } else if let Some(item) = &old {
        let _ = writeln!(
            out.stdout,
            "deleted {} from {table} (was: {})",
            key_text(&pk, &sk),
            item_summary(item)
        );
    } else {
        let _ = writeln!(
            out.stderr,
            "no item {} in {table}: nothing deleted",
            key_text(&pk, &sk)
        );
        if !others.is_empty() {
            let sks: Vec<String> = others.iter().map(|i| format!("sk={}", i.sk)).collect();
            let _ = writeln!(
                out.stderr,
                "items under pk={pk}: {} (tags are compared in order; --project scopes the key)",
                sks.join(", ")
            );
        }
    }
    Ok(if old.is_some() { 0 } else { 2 })
}

async fn export(
    out: &mut Outcome,
    sdk: &SdkConfig,
    table: &TableRef,
    format: Format,
    skip_invalid: bool,
) -> Result<u8, String> {
    let table = table::open(sdk, table).await?;
    let items = table.scan().await?;
    warn_items(out, &items);
    let mut jobs = Vec::new();
    let mut invalid = 0;
    for item in &items {
        match &item.rule {
            Ok(rule) => jobs.push(RegistryEntry::from_rule(rule)),
            Err(e) => {
                invalid += 1;
                let _ = writeln!(
                    out.stderr,
                    "invalid item {}: {}",
                    item.key_text(),
                    rule_error_text(e)
                );
            }
        }
    }
    if invalid > 0 && !skip_invalid {
        return Err(format!(
            "{} in {table} cannot be exported: fix them (apply), delete them (delete --pk/--sk), or pass --skip-invalid to export the others",
            plural(invalid, "invalid item", "invalid items")
        ));
    }
    if invalid > 0 {
        let _ = writeln!(
            out.stderr,
            "left out {}",
            plural(invalid, "invalid item", "invalid items")
        );
    }
    let registry = Registry { jobs };
    match format {
        Format::Json => {
            out.stdout.push_str(
                &serde_json::to_string_pretty(&registry)
                    .map_err(|e| format!("cannot write JSON: {e}"))?,
            );
            out.stdout.push('\n');
        }
        Format::Yaml => out.stdout.push_str(
            &serde_norway::to_string(&registry).map_err(|e| format!("cannot write YAML: {e}"))?,
        ),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn table_or_stack_is_required_and_exclusive() {
        assert!(Cli::try_parse_from(["runner-mappings", "list"]).is_err());
        assert!(
            Cli::try_parse_from(["runner-mappings", "list", "--table", "t", "--stack", "s"])
                .is_err()
        );
        let cli = Cli::try_parse_from([
            "runner-mappings",
            "delete",
            "--stack",
            "s",
            "--name",
            "build",
            "--tags",
            "a,b",
        ])
        .unwrap();
        match cli.command {
            Command::Delete { key, .. } => assert_eq!(key.tags, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from([
                "runner-mappings",
                "delete",
                "--table",
                "t",
                "--name",
                "b",
                "--pk",
                "job#b"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["runner-mappings", "delete", "--table", "t"]).is_err());
    }

    #[tokio::test]
    async fn validate_needs_no_aws_and_stdin_needs_a_format() {
        let cli =
            Cli::try_parse_from(["runner-mappings", "validate", "-", "--format", "yaml"]).unwrap();
        let yaml = b"jobs:\n  - {name: build, type: EC2, tags: [docker]}\n";
        let out = run(cli, None, &mut &yaml[..]).await;
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(out.stdout, "<stdin>: 1 entry valid (0 LAMBDA, 1 EC2)\n");

        let cli = Cli::try_parse_from(["runner-mappings", "validate", "-"]).unwrap();
        let out = run(cli, None, &mut &yaml[..]).await;
        assert_eq!(out.code, 1);
        assert!(out.stderr.contains("needs --format"), "{out:?}");
    }
}
