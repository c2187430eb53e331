//! `runner-mappings` against a real moto server through the real AWS SDK: every command, on
//! tables created here with the mapping table's key (pk S HASH, sk S RANGE).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command as Process;

use aws_config::SdkConfig;
use aws_sdk_dynamodb::types::AttributeValue;
use clap::Parser as _;
use e2e_tests::{moto_endpoint, sdk_config, unique};
use ephemeral_core::mapping::{Registry, rule_from_item};
use mapping_cli::{Cli, Outcome, run};
use serde_json::{Value, json};

const ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner";
const ARN_APP: &str = "arn:aws:lambda:us-east-1:123456789012:function:app-runner";

/// Seed entries (exactly the seed's shape) and every addition.
fn mixed_registry() -> Value {
    json!({"jobs": [
        {"type": "LAMBDA", "name": "unit-test", "tags": [], "lambdaArn": ARN},
        {"type": "EC2", "name": "docker-build", "tags": ["docker", "large"]},
        {"type": "LAMBDA", "name": "lint", "tags": ["fast"], "lambdaArn": ARN},
        {"name": "build", "type": "EC2", "tags": [], "project": 42,
         "instanceType": "c7g.large", "market": "on-demand"},
        {"name": "*", "type": "LAMBDA", "tags": [], "lambdaArn": ARN_APP, "project": "group/app"},
        {"name": "*", "type": "EC2", "tags": ["gpu"], "instanceType": "g5.xlarge",
         "ami": "ami-0123456789abcdef0", "market": "spot",
         "subnets": ["subnet-0a1b2c3d", "subnet-4e5f6a7b"], "executor": "docker",
         "description": "GPU jobs"},
        {"name": "integration", "type": "EC2", "tags": ["docker"],
         "ami": "ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
         "executor": "shell"}
    ]})
}

/// The same registry, written by hand in YAML (`*` must be quoted in YAML).
const MIXED_YAML: &str = r#"
jobs:
  - type: LAMBDA
    name: unit-test
    tags: []
    lambdaArn: arn:aws:lambda:us-east-1:123456789012:function:shell-runner
  - {type: EC2, name: docker-build, tags: [docker, large]}
  - type: LAMBDA
    name: lint
    tags: [fast]
    lambdaArn: "arn:aws:lambda:us-east-1:123456789012:function:shell-runner"
  - name: build
    type: EC2
    tags: []
    project: 42
    instanceType: c7g.large
    market: on-demand
  - name: "*"
    type: LAMBDA
    tags: []
    lambdaArn: arn:aws:lambda:us-east-1:123456789012:function:app-runner
    project: group/app
  - name: "*"
    type: EC2
    tags: [gpu]
    instanceType: g5.xlarge
    ami: ami-0123456789abcdef0
    market: spot
    subnets:
      - subnet-0a1b2c3d
      - subnet-4e5f6a7b
    executor: docker
    description: GPU jobs
  - name: integration
    type: EC2
    tags: [docker]
    ami: ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64
    executor: shell
"#;

/// What export should print for a registry: its entries ordered by pk, then sk.
fn normalised(registry: &Value) -> Value {
    let parsed: Registry = serde_json::from_value(registry.clone()).unwrap();
    let rules = parsed.rules().unwrap();
    let mut entries: Vec<(String, String, Value)> = registry["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&rules)
        .map(|(entry, rule)| (rule.pk(), rule.sk(), entry.clone()))
        .collect();
    entries.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    json!({"jobs": entries.into_iter().map(|e| e.2).collect::<Vec<_>>()})
}

async fn cli(sdk: &SdkConfig, args: &[&str]) -> Outcome {
    cli_with_stdin(sdk, args, "").await
}

async fn cli_with_stdin(sdk: &SdkConfig, args: &[&str], stdin: &str) -> Outcome {
    let parsed =
        Cli::try_parse_from(std::iter::once("runner-mappings").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    run(parsed, Some(sdk), &mut stdin.as_bytes()).await
}

#[track_caller]
fn expect(out: &Outcome, code: u8, stdout_has: &[&str], stderr_has: &[&str]) {
    assert_eq!(out.code, code, "exit code\n{out:#?}");
    for s in stdout_has {
        assert!(out.stdout.contains(s), "stdout lacks {s:?}\n{}", out.stdout);
    }
    for s in stderr_has {
        assert!(out.stderr.contains(s), "stderr lacks {s:?}\n{}", out.stderr);
    }
}

fn file(name: &str, content: &str) -> String {
    let dir = std::env::temp_dir().join(unique("runner-mappings"));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn create_table(sdk: &SdkConfig) -> String {
    e2e_tests::create_table(sdk, "mappings", "pk", Some("sk")).await
}

/// The table's items as stored, ordered by key, through the SDK alone.
async fn scan(sdk: &SdkConfig, table: &str) -> Vec<HashMap<String, AttributeValue>> {
    let mut items = e2e_tests::scan_items(sdk, table).await;
    let key = |i: &HashMap<String, AttributeValue>| {
        (
            i["pk"].as_s().unwrap().clone(),
            i["sk"].as_s().unwrap().clone(),
        )
    };
    items.sort_by_key(key);
    items
}

async fn put_raw(sdk: &SdkConfig, table: &str, item: Value) {
    aws_sdk_dynamodb::Client::new(sdk)
        .put_item()
        .table_name(table)
        .set_item(Some(ephemeral_aws::json_to_item(item.as_object().unwrap())))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn round_trip_validate_apply_diff_export_in_json_and_yaml() {
    let sdk = sdk_config();
    let table = create_table(&sdk).await;
    let registry = mixed_registry();
    let json_file = file(
        "registry.json",
        &serde_json::to_string_pretty(&registry).unwrap(),
    );

    let out = cli(&sdk, &["validate", &json_file]).await;
    expect(&out, 0, &["7 entries valid (3 LAMBDA, 4 EC2)"], &[]);
    assert_eq!(out.stderr, "", "no warnings for a clean file");

    let out = cli(&sdk, &["apply", &json_file, "--table", &table]).await;
    expect(
        &out,
        0,
        &[
            "added   pk=job#unit-test sk=tags#: LAMBDA arn:aws:lambda:",
            "added   pk=job#* sk=tags#gpu: EC2 instanceType=g5.xlarge",
            "7 changed (7 added, 0 updated, 0 deleted), 0 unchanged",
        ],
        &[],
    );

    // The items are the seed's format plus the additions, attribute by attribute.
    let items = scan(&sdk, &table).await;
    assert_eq!(items.len(), 7);
    let as_json: Vec<Value> = items
        .iter()
        .map(|i| Value::Object(ephemeral_aws::item_to_json(i)))
        .collect();
    assert!(
        as_json
            .contains(&json!({"pk": "job#unit-test", "sk": "tags#", "type": "LAMBDA", "arn": ARN}))
    );
    assert!(
        as_json
            .contains(&json!({"pk": "job#docker-build", "sk": "tags#docker#large", "type": "EC2"}))
    );
    assert!(as_json.contains(
        &json!({"pk": "job#build", "sk": "project#42#tags#", "type": "EC2",
                                      "instance_type": "c7g.large", "market": "on-demand"})
    ));
    assert!(as_json.contains(
        &json!({"pk": "job#*", "sk": "project#group/app#tags#", "type": "LAMBDA", "arn": ARN_APP})
    ));
    let gpu = items
        .iter()
        .find(|i| i["sk"].as_s().unwrap() == "tags#gpu")
        .unwrap();
    assert!(matches!(&gpu["subnets"], AttributeValue::L(l) if l.len() == 2));
    for item in &as_json {
        rule_from_item(item.as_object().unwrap()).unwrap();
    }

    let out = cli(&sdk, &["diff", &json_file, "--table", &table]).await;
    expect(&out, 0, &["matches", "7 items, no difference"], &[]);

    let out = cli(&sdk, &["export", "--table", &table]).await;
    expect(&out, 0, &[], &[]);
    let exported: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(exported, normalised(&registry));

    // Exported, then applied: nothing changes.
    let exported_file = file("exported.json", &out.stdout);
    let out = cli(&sdk, &["apply", &exported_file, "--table", &table]).await;
    expect(
        &out,
        0,
        &["0 changed (0 added, 0 updated, 0 deleted), 7 unchanged"],
        &[],
    );

    // YAML: the same registry, so the same items.
    let yaml_file = file("registry.yaml", MIXED_YAML);
    let out = cli(&sdk, &["validate", &yaml_file]).await;
    expect(&out, 0, &["7 entries valid"], &[]);
    let out = cli(&sdk, &["diff", &yaml_file, "--table", &table]).await;
    expect(&out, 0, &["no difference"], &[]);
    let out = cli_with_stdin(
        &sdk,
        &["apply", "-", "--format", "yaml", "--table", &table],
        MIXED_YAML,
    )
    .await;
    expect(&out, 0, &["0 changed"], &[]);

    let yaml_table = create_table(&sdk).await;
    let out = cli(&sdk, &["apply", &yaml_file, "--table", &yaml_table]).await;
    expect(&out, 0, &["7 changed (7 added"], &[]);
    let out = cli(
        &sdk,
        &["export", "--table", &yaml_table, "--format", "yaml"],
    )
    .await;
    expect(&out, 0, &[], &[]);
    let exported: Value = serde_norway::from_str(&out.stdout).unwrap();
    assert_eq!(exported, normalised(&registry), "{}", out.stdout);
    let out = cli(&sdk, &["diff", &json_file, "--table", &yaml_table]).await;
    expect(&out, 0, &["no difference"], &[]);
}

#[tokio::test]
async fn apply_twice_changes_nothing_prune_deletes_and_dry_run_writes_nothing() {
    let sdk = sdk_config();
    let table = create_table(&sdk).await;
    let mut registry = json!({"jobs": [
        {"type": "LAMBDA", "name": "unit-test", "tags": [], "lambdaArn": ARN},
        {"type": "EC2", "name": "build", "tags": ["docker"], "instanceType": "c7g.large"},
        {"type": "EC2", "name": "*", "tags": ["gpu"], "market": "spot"}
    ]});
    let path = file("registry.json", &registry.to_string());

    let out = cli(&sdk, &["apply", &path, "--table", &table]).await;
    expect(
        &out,
        0,
        &["3 changed (3 added, 0 updated, 0 deleted), 0 unchanged"],
        &[],
    );
    let out = cli(&sdk, &["apply", &path, "--table", &table]).await;
    expect(
        &out,
        0,
        &["0 changed (0 added, 0 updated, 0 deleted), 3 unchanged"],
        &[],
    );
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);

    // An item someone else wrote stays unless --prune.
    put_raw(
        &sdk,
        &table,
        json!({"pk": "job#old", "sk": "tags#", "type": "LAMBDA", "arn": ARN}),
    )
    .await;
    let out = cli(&sdk, &["apply", &path, "--table", &table]).await;
    expect(
        &out,
        0,
        &[
            "kept    pk=job#old sk=tags#: LAMBDA",
            "0 changed (0 added, 0 updated, 0 deleted), 3 unchanged, 1 not in the file kept (--prune deletes them)",
        ],
        &[],
    );
    let out = cli(&sdk, &["diff", &path, "--table", &table]).await;
    expect(
        &out,
        2,
        &[
            "remain  pk=job#old sk=tags#",
            "0 to add, 0 to change, 1 only in the table",
        ],
        &[],
    );
    let out = cli(&sdk, &["diff", &path, "--table", &table, "--prune"]).await;
    expect(&out, 2, &["delete  pk=job#old sk=tags#"], &[]);

    // Dry runs write nothing.
    registry["jobs"][1]["instanceType"] = json!("c7g.xlarge");
    registry["jobs"][2]["tags"] = json!(["gpu", "large"]);
    std::fs::write(&path, registry.to_string()).unwrap();
    let before = scan(&sdk, &table).await;
    let out = cli(
        &sdk,
        &["apply", &path, "--table", &table, "--dry-run", "--prune"],
    )
    .await;
    expect(
        &out,
        0,
        &[
            "would add     pk=job#* sk=tags#gpu#large: EC2 market=spot",
            "would update  pk=job#build sk=tags#docker:",
            "instance_type: \"c7g.large\" -> \"c7g.xlarge\"",
            "would delete  pk=job#old sk=tags#",
            "would delete  pk=job#* sk=tags#gpu",
            "dry run, nothing written",
            "4 changed (1 added, 1 updated, 2 deleted), 1 unchanged",
        ],
        &[],
    );
    assert_eq!(
        scan(&sdk, &table).await,
        before,
        "a dry run wrote something"
    );

    let out = cli(&sdk, &["diff", &path, "--table", &table, "--json"]).await;
    assert_eq!(out.code, 2);
    let d: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(d["equal"], false);
    assert_eq!(d["add"][0]["sk"], "tags#gpu#large");
    assert_eq!(
        d["change"][0]["changes"],
        json!([{"attribute": "instance_type", "table": "c7g.large", "file": "c7g.xlarge"}])
    );
    assert_eq!(d["only_in_table"].as_array().unwrap().len(), 2);

    let out = cli(&sdk, &["apply", &path, "--table", &table, "--prune"]).await;
    expect(
        &out,
        0,
        &[
            "deleted pk=job#old sk=tags#",
            "4 changed (1 added, 1 updated, 2 deleted), 1 unchanged",
        ],
        &[],
    );
    let keys: Vec<String> = scan(&sdk, &table)
        .await
        .iter()
        .map(|i| format!("{}/{}", i["pk"].as_s().unwrap(), i["sk"].as_s().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [
            "job#*/tags#gpu#large",
            "job#build/tags#docker",
            "job#unit-test/tags#"
        ]
    );
    let out = cli(
        &sdk,
        &["apply", &path, "--table", &table, "--prune", "--json"],
    )
    .await;
    expect(&out, 0, &[], &[]);
    let a: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (a["changed"].clone(), a["unchanged"].clone()),
        (json!(0), json!(3))
    );
    let out = cli(&sdk, &["diff", &path, "--table", &table]).await;
    expect(&out, 0, &["no difference"], &[]);
}

#[tokio::test]
async fn an_invalid_registry_writes_nothing_and_names_entry_and_field() {
    let sdk = sdk_config();
    let table = create_table(&sdk).await;
    let path = file(
        "bad.json",
        &json!({"jobs": [
            {"type": "LAMBDA", "name": "unit-test", "tags": [], "lambdaArn": ARN},
            {"type": "LAMBDA", "name": "deploy", "tags": []},
            {"type": "EC2", "name": "docker-build", "tags": ["docker"]},
            {"type": "EC2", "name": "cheap", "market": "cheap"},
            {"type": "EC2", "name": "typo", "instance_type": "t3.large"}
        ]})
        .to_string(),
    );
    let out = cli(&sdk, &["apply", &path, "--table", &table]).await;
    expect(
        &out,
        1,
        &[],
        &[
            "jobs[1] (name `deploy`): arn: required when type is LAMBDA",
            "jobs[3] (name `cheap`): market: `cheap`: use spot or on-demand",
            "jobs[4] (name `typo`): instance_type: unknown field (did you mean `instanceType`?)",
            "has 3 problems: nothing was written",
        ],
    );
    assert_eq!(out.stdout, "");
    assert!(
        scan(&sdk, &table).await.is_empty(),
        "an invalid file wrote items"
    );

    let out = cli(&sdk, &["apply", &path, "--table", &table, "--prune"]).await;
    assert_eq!(out.code, 1);
    let out = cli(&sdk, &["diff", &path, "--table", &table]).await;
    expect(&out, 1, &[], &["fix it before comparing"]);
    assert!(scan(&sdk, &table).await.is_empty());

    let out = cli(&sdk, &["validate", &path, "--json"]).await;
    assert_eq!(out.code, 1);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(
        v["problems"][0],
        json!({"index": 1, "name": "deploy", "field": "arn",
               "problem": "required when type is LAMBDA: the shell-runner function's ARN"})
    );
}

#[tokio::test]
async fn malformed_items_in_the_table_are_reported_with_key_and_field() {
    let sdk = sdk_config();
    let table = create_table(&sdk).await;
    let registry = json!({"jobs": [
        {"type": "LAMBDA", "name": "unit-test", "tags": [], "lambdaArn": ARN},
        {"type": "EC2", "name": "docker-build", "tags": ["docker", "large"]}
    ]});
    let path = file("registry.json", &registry.to_string());
    expect(
        &cli(&sdk, &["apply", &path, "--table", &table]).await,
        0,
        &["2 changed"],
        &[],
    );
    put_raw(
        &sdk,
        &table,
        json!({"pk": "job#fargate", "sk": "tags#", "type": "FARGATE"}),
    )
    .await;
    put_raw(
        &sdk,
        &table,
        json!({"pk": "job#noarn", "sk": "tags#x", "type": "LAMBDA"}),
    )
    .await;
    put_raw(
        &sdk,
        &table,
        json!({"pk": "build", "sk": "tags#", "type": "EC2"}),
    )
    .await;
    put_raw(
        &sdk,
        &table,
        json!({"pk": "job#numbers", "sk": "tags#", "type": "EC2", "subnets": 5, "note": "x"}),
    )
    .await;

    let out = cli(&sdk, &["list", "--table", &table]).await;
    expect(
        &out,
        0,
        &[
            "NAME",
            "unit-test",
            "INVALID pk=job#fargate sk=tags#: type: `FARGATE`: use LAMBDA or EC2",
            "INVALID pk=job#noarn sk=tags#x: arn: required when type is LAMBDA",
            "INVALID pk=build sk=tags#: pk: `build` must be job#<job name>",
            "INVALID pk=job#numbers sk=tags#: subnets: must be a list of strings, found 5",
            "6 items, 4 invalid",
        ],
        &["pk=job#numbers sk=tags#: attribute `note` is not a mapping attribute"],
    );
    let out = cli(&sdk, &["list", "--table", &table, "--json"]).await;
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let fargate = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["pk"] == "job#fargate")
        .unwrap();
    assert_eq!(fargate["valid"], false);
    assert_eq!(fargate["invalid"]["field"], "type");

    let out = cli(&sdk, &["diff", &path, "--table", &table]).await;
    expect(
        &out,
        2,
        &[
            "remain  pk=job#fargate sk=tags#: INVALID type: `FARGATE`",
            "remain  pk=job#noarn sk=tags#x: INVALID arn: required",
            "4 only in the table",
        ],
        &[],
    );

    let out = cli(&sdk, &["export", "--table", &table]).await;
    expect(
        &out,
        1,
        &[],
        &[
            "invalid item pk=job#fargate sk=tags#: type: `FARGATE`: use LAMBDA or EC2",
            "invalid item pk=job#noarn sk=tags#x: arn:",
            "4 invalid items",
            "--skip-invalid",
        ],
    );
    assert_eq!(out.stdout, "", "a failed export prints no half registry");
    let out = cli(&sdk, &["export", "--table", &table, "--skip-invalid"]).await;
    expect(
        &out,
        0,
        &[],
        &[
            "invalid item pk=job#fargate sk=tags#",
            "left out 4 invalid items",
        ],
    );
    let exported: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(exported, normalised(&registry));

    // A file entry with an invalid item's key fixes it.
    let mut fixed = registry.clone();
    fixed["jobs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "LAMBDA", "name": "noarn", "tags": ["x"], "lambdaArn": ARN}));
    std::fs::write(&path, fixed.to_string()).unwrap();
    let out = cli(&sdk, &["diff", &path, "--table", &table]).await;
    expect(
        &out,
        2,
        &[
            "change  pk=job#noarn sk=tags#x:",
            "the table's item is invalid now: arn: required",
            "arn: (absent) -> \"arn:aws:lambda:",
        ],
        &[],
    );

    // delete: by the registry's names (core's key logic), or by raw key.
    let out = cli(
        &sdk,
        &[
            "delete", "--table", &table, "--pk", "build", "--sk", "tags#",
        ],
    )
    .await;
    expect(
        &out,
        0,
        &["deleted pk=build sk=tags# from table", "(was: invalid: pk:"],
        &[],
    );
    let out = cli(&sdk, &["delete", "--table", &table, "--name", "fargate"]).await;
    expect(&out, 0, &["deleted pk=job#fargate sk=tags#"], &[]);
    let out = cli(&sdk, &["delete", "--table", &table, "--name", "fargate"]).await;
    expect(
        &out,
        2,
        &[],
        &[
            "no item pk=job#fargate sk=tags# in table",
            "nothing deleted",
        ],
    );
    let out = cli(
        &sdk,
        &[
            "delete",
            "--table",
            &table,
            "--name",
            "docker-build",
            "--tags",
            "large,docker",
        ],
    )
    .await;
    expect(
        &out,
        2,
        &[],
        &[
            "no item pk=job#docker-build sk=tags#large#docker",
            "items under pk=job#docker-build: sk=tags#docker#large",
        ],
    );
    let out = cli(
        &sdk,
        &["delete", "--table", &table, "--name", "x", "--tags", "a#b"],
    )
    .await;
    expect(
        &out,
        1,
        &[],
        &["--tags: `a#b`: a tag may not be empty or contain `#`"],
    );

    let out = cli(&sdk, &["apply", &path, "--table", &table, "--prune"]).await;
    expect(
        &out,
        0,
        &[
            "updated pk=job#noarn sk=tags#x:",
            "deleted pk=job#numbers sk=tags#",
        ],
        &[],
    );
    let out = cli(&sdk, &["list", "--table", &table]).await;
    expect(&out, 0, &["3 items\n"], &[]);
    assert!(!out.stdout.contains("INVALID"), "{}", out.stdout);
    let out = cli(
        &sdk,
        &[
            "delete",
            "--table",
            &table,
            "--name",
            "docker-build",
            "--tags",
            "docker,large",
            "--json",
        ],
    )
    .await;
    assert_eq!(out.code, 0);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (v["deleted"].clone(), v["item"]["type"].clone()),
        (json!(true), json!("EC2"))
    );
}

/// A stack in moto, created from a JSON template.
async fn create_stack(sdk: &SdkConfig, template: Value) -> String {
    let name = unique("runners");
    aws_sdk_cloudformation::Client::new(sdk)
        .create_stack()
        .stack_name(&name)
        .template_body(template.to_string())
        .send()
        .await
        .unwrap();
    name
}

fn table_resource(name: &str) -> Value {
    json!({
        "Type": "AWS::DynamoDB::Table",
        "Properties": {
            "TableName": name,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"}
            ],
            "KeySchema": [
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"}
            ]
        }
    })
}

#[tokio::test]
async fn the_table_is_found_through_the_stack() {
    let sdk = sdk_config();
    let path = file("registry.json", &mixed_registry().to_string());

    // Our template: the MappingTableName output.
    let table = unique("stack-mappings");
    let stack = create_stack(
        &sdk,
        json!({
            "Resources": {"MappingTable": table_resource(&table)},
            "Outputs": {"MappingTableName": {"Value": {"Ref": "MappingTable"}}}
        }),
    )
    .await;
    let out = cli(&sdk, &["apply", &path, "--stack", &stack]).await;
    expect(
        &out,
        0,
        &[&format!(
            "table `{table}` (stack `{stack}`, output MappingTableName): 7 changed"
        )],
        &[],
    );
    assert_eq!(scan(&sdk, &table).await.len(), 7);
    let out = cli(&sdk, &["diff", &path, "--stack", &stack]).await;
    expect(&out, 0, &["no difference"], &[]);

    // The seed's template: no output, the table's logical id.
    let seed_table = unique("seed-mappings");
    let seed_stack = create_stack(
        &sdk,
        json!({"Resources": {"GitLabJobTagsMapping": table_resource(&seed_table)}}),
    )
    .await;
    put_raw(
        &sdk,
        &seed_table,
        json!({"pk": "job#unit-test", "sk": "tags#", "type": "LAMBDA", "arn": ARN}),
    )
    .await;
    let out = cli(&sdk, &["list", "--stack", &seed_stack]).await;
    expect(
        &out,
        0,
        &[
            "unit-test",
            &format!(
                "table `{seed_table}` (stack `{seed_stack}`, resource GitLabJobTagsMapping): 1 item"
            ),
        ],
        &[],
    );

    // A stack without the table says what was looked for.
    let other = create_stack(
        &sdk,
        json!({"Resources": {"Queue": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": unique("q")}}},
               "Outputs": {"QueueName": {"Value": {"Fn::GetAtt": ["Queue", "QueueName"]}}}}),
    )
    .await;
    let out = cli(&sdk, &["list", "--stack", &other]).await;
    expect(
        &out,
        1,
        &[],
        &[&format!(
            "stack `{other}` has no output `MappingTableName` and no AWS::DynamoDB::Table resource with logical id `MappingTable` or `GitLabJobTagsMapping` (its outputs: QueueName; its DynamoDB tables: none): pass --table NAME"
        )],
    );
    let out = cli(&sdk, &["list", "--stack", "no-such-stack"]).await;
    expect(
        &out,
        1,
        &[],
        &["stack `no-such-stack` not found in region us-east-1"],
    );
    let out = cli(&sdk, &["list", "--table", "no-such-table"]).await;
    expect(
        &out,
        1,
        &[],
        &["table `no-such-table` not found in region us-east-1"],
    );
}

#[tokio::test]
async fn a_table_with_another_key_is_refused() {
    let sdk = sdk_config();
    // The webhook's deliveries table, say: a mistaken --table must not be pruned.
    let name = e2e_tests::create_table(&sdk, "not-mappings", "delivery_id", None).await;
    let path = file("registry.json", &mixed_registry().to_string());
    let out = cli(&sdk, &["apply", &path, "--table", &name, "--prune"]).await;
    expect(
        &out,
        1,
        &[],
        &["has the key (delivery_id HASH), not (pk HASH, sk RANGE): it is not a mapping table"],
    );
}

/// The real binary: exit codes and messages, and AWS settings from the environment.
#[test]
fn the_binary_validates_and_reads_aws_settings_from_the_environment() {
    let bin = env!("CARGO_BIN_EXE_runner-mappings");
    let good = file("good.json", &mixed_registry().to_string());
    let bad = file(
        "bad.yaml",
        "jobs:\n  - {type: LAMBDA, name: unit-test, lambdaArn: \"arn:aws:lambda:us-east-1:123456789012:function:r\"}\n  - {type: LAMBDA, name: deploy}\n  - {type: EC2, name: big, instance_type: t3.large}\n",
    );
    let output = |args: &[&str]| {
        let o = Process::new(bin)
            .args(args)
            .env("AWS_ENDPOINT_URL", moto_endpoint())
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials",
            )
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8(o.stdout).unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    };

    let (code, stdout, stderr) = output(&["validate", &good]);
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
    assert!(stdout.contains("7 entries valid"), "{stdout}");

    let (code, stdout, stderr) = output(&["validate", &bad]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("bad.yaml: jobs[1] (name `deploy`): arn: required"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.yaml: jobs[2] (name `big`): instance_type: unknown field (did you mean `instanceType`?)"),
        "{stderr}"
    );
    assert!(stderr.contains("2 problems"), "{stderr}");

    let (code, stdout, _) = output(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("validate") && stdout.contains("export"),
        "{stdout}"
    );
    let (code, _, stderr) = output(&["list"]);
    assert_eq!(code, 1, "a usage error exits 1: {stderr}");
    let (code, _, stderr) = output(&["validate", "registry.txt"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("use .json, .yaml or .yml, or pass --format"),
        "{stderr}"
    );

    // AWS_ENDPOINT_URL, region and credentials from the environment reach moto.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sdk = sdk_config();
    let table = rt.block_on(create_table(&sdk));
    let (code, stdout, stderr) = output(&["apply", &good, "--table", &table]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("7 changed"), "{stdout}");
    let (code, stdout, _) = output(&["diff", &good, "--table", &table]);
    assert_eq!(code, 0, "{stdout}");
    rt.block_on(put_raw(
        &sdk,
        &table,
        json!({"pk": "job#extra", "sk": "tags#", "type": "EC2"}),
    ));
    let (code, stdout, _) = output(&["diff", &good, "--table", &table]);
    assert_eq!(code, 2, "{stdout}");
    let (code, _, stderr) = output(&["delete", "--table", &table, "--name", "nope"]);
    assert_eq!(code, 2, "{stderr}");
}
