//! Mapping decisions: seed-format items route as the seed intended; the documented order and
//! tie-breaks hold; malformed items and registry entries fail with the field named.

use ephemeral_core::mapping::*;
use serde_json::{Map, Value, json};

const ARN_A: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner-a";
const ARN_B: &str = "arn:aws:lambda:us-east-1:123456789012:function:shell-runner-b";
const DEFAULT_ARN: &str = "arn:aws:lambda:us-east-1:123456789012:function:default-runner";

fn item(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn rules(items: &[Value]) -> Vec<Rule> {
    items
        .iter()
        .map(|v| rule_from_item(&item(v.clone())).unwrap())
        .collect()
}

fn job(name: &str, tags: Option<&[&str]>) -> JobFacts {
    JobFacts {
        project_id: 42,
        project_path: Some("group/app".into()),
        job_name: name.into(),
        tags: tags.map(|t| t.iter().map(|s| s.to_string()).collect()),
    }
}

fn default() -> Executor {
    Executor::Lambda {
        arn: DEFAULT_ARN.into(),
    }
}

#[test]
fn seed_items_route_as_the_seed_intended_with_the_arn_as_a_string() {
    // Exactly what the seed's loader writes for {"type","name","tags","lambdaArn"}.
    let table = rules(&[
        json!({"pk": "job#unit-test", "sk": "tags#", "type": "LAMBDA", "arn": ARN_A}),
        json!({"pk": "job#docker-build", "sk": "tags#docker#large", "type": "EC2"}),
    ]);
    let d = decide(&job("unit-test", None), &table, &default());
    assert_eq!(d.executor, Executor::Lambda { arn: ARN_A.into() });
    let out = serde_json::to_value(&d).unwrap();
    assert_eq!(out["type"], "LAMBDA");
    assert_eq!(out["arn"], ARN_A, "the ARN is a string, not a list: {out}");

    // Tags unknown (no API token): the seed took the name's item whatever its tags.
    let d = decide(&job("docker-build", None), &table, &default());
    assert_eq!(d.executor.kind(), ExecutorKind::Ec2);
    assert_eq!(serde_json::to_value(&d).unwrap()["type"], "EC2");

    // No item: the default route, never a dropped job.
    let d = decide(&job("lint", None), &table, &default());
    assert_eq!((d.executor, d.matched.as_str()), (default(), "default"));
}

#[test]
fn decision_order_and_tie_breaks() {
    let table = rules(&[
        json!({"pk": "job#*", "sk": "tags#gpu", "type": "EC2", "instance_type": "g5.xlarge"}),
        json!({"pk": "job#*", "sk": "project#group/app#tags#", "type": "LAMBDA", "arn": ARN_B}),
        json!({"pk": "job#build", "sk": "tags#", "type": "LAMBDA", "arn": ARN_A}),
        json!({"pk": "job#build", "sk": "tags#docker", "type": "EC2", "executor": "docker"}),
        json!({"pk": "job#build", "sk": "project#42#tags#", "type": "EC2", "instance_type": "c7g.large"}),
        json!({"pk": "job#build", "sk": "project#99#tags#", "type": "EC2", "instance_type": "m7g.large"}),
    ]);
    let pick = |name, tags: Option<&[&str]>, project: u64| {
        let mut j = job(name, tags);
        j.project_id = project;
        if project != 42 {
            j.project_path = Some("other/project".into());
        }
        decide(&j, &table, &default()).matched
    };
    // 1. name + project wins over everything.
    assert_eq!(
        pick("build", Some(&["docker"]), 42),
        "job#build/project#42#tags#"
    );
    // 2. name, global: more tags (more specific) first, among those the job has.
    assert_eq!(pick("build", Some(&["docker"]), 7), "job#build/tags#docker");
    assert_eq!(pick("build", Some(&[]), 7), "job#build/tags#");
    // 3. any name, project-scoped (by path) beats 4. any name with tags.
    assert_eq!(
        pick("test", Some(&["gpu"]), 42),
        "job#*/project#group/app#tags#"
    );
    // 4. any name by tags.
    assert_eq!(pick("test", Some(&["gpu", "x"]), 7), "job#*/tags#gpu");
    // Tags unknown: a tag-only rule cannot be checked, so it does not match.
    assert_eq!(pick("test", None, 7), "default");
    // Tags unknown, name items: lowest sk first, as the seed's Query order.
    assert_eq!(pick("build", None, 7), "job#build/tags#");
}

#[test]
fn ec2_settings_are_parsed_and_round_trip() {
    let v = json!({"pk": "job#big", "sk": "tags#docker", "type": "EC2", "instance_type": "c7g.2xlarge",
                   "ami": "ssm:/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
                   "market": "on-demand", "subnets": ["subnet-0a1b2c3d", "subnet-4e5f6a7b"], "executor": "docker",
                   "description": "heavy builds"});
    let rule = rule_from_item(&item(v.clone())).unwrap();
    match &rule.executor {
        Executor::Ec2(s) => {
            assert_eq!(s.market, Some(Market::OnDemand));
            assert_eq!(s.subnets.len(), 2);
            assert!(matches!(s.ami, Some(AmiRef::SsmParameter(_))));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(Value::Object(rule.to_item()), v);
    let entry = RegistryEntry::from_rule(&rule);
    assert_eq!(entry.to_rule().unwrap(), rule);
}

#[test]
fn malformed_items_name_the_field() {
    let cases = [
        (json!({"sk": "tags#", "type": "EC2"}), "pk"),
        (json!({"pk": "build", "sk": "tags#", "type": "EC2"}), "pk"),
        (
            json!({"pk": "job#b", "sk": "labels#x", "type": "EC2"}),
            "sk",
        ),
        (
            json!({"pk": "job#b", "sk": "project#tags#", "type": "EC2"}),
            "sk",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#a##b", "type": "EC2"}),
            "sk",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "FARGATE"}),
            "type",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "LAMBDA"}),
            "arn",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "LAMBDA", "arn": "my-function"}),
            "arn",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "LAMBDA", "arn": ["x"]}),
            "arn",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "EC2", "market": "cheap"}),
            "market",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "EC2", "ami": "ubuntu"}),
            "ami",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "EC2", "subnets": "subnet-1"}),
            "subnets",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "EC2", "instance_type": "large"}),
            "instance_type",
        ),
        (
            json!({"pk": "job#b", "sk": "tags#", "type": "LAMBDA", "arn": ARN_A, "instance_type": "t3.small"}),
            "instance_type",
        ),
    ];
    for (v, field) in cases {
        let e = rule_from_item(&item(v.clone())).unwrap_err();
        assert_eq!(e.field, field, "{v}: {e}");
        assert!(!e.problem.is_empty());
    }
}

#[test]
fn the_seed_registry_file_is_accepted_and_errors_locate_the_entry() {
    let seed = r#"{"jobs": [
        {"type": "LAMBDA", "name": "unit-test", "tags": [], "lambdaArn": "arn:aws:lambda:eu-west-1:123456789012:function:runner"},
        {"type": "EC2", "name": "docker-build", "tags": ["docker", "large"]}
    ]}"#;
    let registry: Registry = serde_json::from_str(seed).unwrap();
    let rules = registry.rules().unwrap();
    assert_eq!(rules[0].pk(), "job#unit-test");
    assert_eq!(rules[0].sk(), "tags#");
    assert_eq!(rules[1].sk(), "tags#docker#large");

    let bad: Registry = serde_json::from_str(
        r#"{"jobs": [
        {"type": "LAMBDA", "name": "a", "tags": []},
        {"type": "EC2", "name": "b", "tags": ["x#y"]},
        {"type": "EC2", "name": "c", "tags": []},
        {"type": "EC2", "name": "c", "tags": []}
    ]}"#,
    )
    .unwrap();
    let errors = bad.rules().unwrap_err();
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{text:#?}");
    assert!(
        text[0].starts_with("jobs[0] (name `a`): arn: required"),
        "{}",
        text[0]
    );
    assert!(
        text[1].starts_with("jobs[1] (name `b`): tags:"),
        "{}",
        text[1]
    );
    assert!(
        text[2].contains("jobs[3] (name `c`)") && text[2].contains("jobs[2]"),
        "{}",
        text[2]
    );

    // A typo in a field name is an error, not a silently ignored setting.
    let typo = serde_json::from_str::<Registry>(
        r#"{"jobs": [{"type": "EC2", "name": "a", "instance_type": "t3.large"}]}"#,
    );
    assert!(
        typo.unwrap_err()
            .to_string()
            .contains("unknown field `instance_type`")
    );
}

#[test]
fn ec2_only_settings_on_a_lambda_item_are_errors_not_dropped() {
    for (extra, field) in [
        (json!({"subnets": ["subnet-0a1b2c3d"]}), "subnets"),
        (json!({"executor": "docker"}), "executor"),
        (json!({"market": "spot"}), "market"),
    ] {
        let mut v = json!({"pk": "job#b", "sk": "tags#", "type": "LAMBDA", "arn": ARN_A});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let e = rule_from_item(&item(v)).unwrap_err();
        assert_eq!(
            (e.field, e.problem.as_str()),
            (field, "only applies to type EC2")
        );
    }
}
