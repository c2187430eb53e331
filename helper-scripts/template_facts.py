"""What a machine can tell about template.yaml before a real account sees it.

Used by tests/template (pytest) and by helper-scripts/cfn-execution-permissions. Everything
here is offline: the template is read with the SAM CLI's own YAML loader, translated with the
SAM translator (the same code `sam deploy` runs in CloudFormation's transform), and the
permissions CloudFormation needs come from the resource types' registry schemas that cfn-lint
ships (their `handlers.*.permissions`).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "template.yaml"
EXECUTION_ROLE_POLICY = ROOT / "docs" / "cfn-execution-role-policy.json"

# The functions CloudFormation documents for the Rules section ("Rule functions"):
# anything else (Fn::Join, Fn::Sub, ...) is not promised to work there.
RULE_FUNCTIONS = {
    "Fn::And",
    "Fn::Contains",
    "Fn::EachMemberEquals",
    "Fn::EachMemberIn",
    "Fn::Equals",
    "Fn::Not",
    "Fn::Or",
    "Fn::RefAll",
    "Fn::ValueOf",
    "Fn::ValueOfAll",
    "Ref",
}

# Handler permissions the execution role leaves out on purpose: CloudFormation's handlers
# call them only for a property this template never sets (keys, VPCs, file systems, imports,
# layers, ...). Per resource type: property -> the actions it needs. The test checks that no
# resource of the type sets the property in the translated template, so a change that starts
# using one fails until its actions are granted.
UNUSED_HANDLER_PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "AWS::DynamoDB::Table": {
        "SSESpecification.KMSMasterKeyId": [
            "kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:Encrypt",
            "kms:ListAliases", "kms:RevokeGrant",
        ],
        "KinesisStreamSpecification": ["kinesis:DescribeStream", "kinesis:PutRecords"],
        "ImportSourceSpecification": [
            "s3:GetObjectMetadata", "s3:ListBucket", "logs:CreateLogStream",
            "logs:DescribeLogStreams", "logs:PutLogEvents",
        ],
        "ContributorInsightsSpecification": ["iam:CreateServiceLinkedRole"],
    },
    "AWS::Events::EventBus": {
        "KmsKeyIdentifier": [
            "kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey",
            "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncrypt", "kms:ReEncryptFrom",
            "kms:ReEncryptTo",
        ],
    },
    "AWS::Lambda::Function": {
        "VpcConfig": [
            "ec2:DescribeNetworkInterfaces", "ec2:DescribeSecurityGroups",
            "ec2:DescribeSubnets", "ec2:DescribeVpcs",
        ],
        "FileSystemConfigs": ["elasticfilesystem:DescribeMountTargets", "s3files:ListMountTargets"],
        "KmsKeyArn": [
            "kms:CreateGrant", "kms:Decrypt", "kms:DescribeKey", "kms:Encrypt",
            "kms:GenerateDataKey",
        ],
        "Layers": ["lambda:GetLayerVersion"],
        "CapacityProviderConfig": ["lambda:PassCapacityProvider"],
    },
    # The baked runner AMI (RunnerAmiRecipe): no KMS key, no S3 component document, no
    # launch template, no SNS notification, no image scanning.
    "AWS::ImageBuilder::Component": {
        "KmsKeyId": [
            "kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair",
            "kms:GenerateDataKeyPairWithoutPlaintext", "kms:GenerateDataKeyWithoutPlaintext",
        ],
        "Uri": ["s3:GetBucketLocation", "s3:HeadBucket"],
    },
    "AWS::ImageBuilder::DistributionConfiguration": {
        "Distributions.LaunchTemplateConfigurations": [
            "ec2:CreateLaunchTemplateVersion", "ec2:DescribeLaunchTemplates",
            "ec2:ModifyLaunchTemplate",
        ],
    },
    "AWS::ImageBuilder::InfrastructureConfiguration": {
        "SnsTopicArn": ["sns:Publish"],
    },
    "AWS::ImageBuilder::ImagePipeline": {
        "ImageScanningConfiguration": [
            "ecr:BatchGetRepositoryScanningConfiguration", "inspector2:BatchGetAccountStatus",
        ],
    },
    "AWS::Lambda::EventSourceMapping": {
        "KmsKeyArn": ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"],
    },
    "AWS::S3::Bucket": {
        # S3 Metadata tables (the cache bucket has none).
        "MetadataTableConfiguration": [
            "s3:CreateBucketMetadataTableConfiguration",
            "s3:DeleteBucketMetadataTableConfiguration",
            "s3:GetBucketMetadataTableConfiguration",
        ],
        "MetadataConfiguration": [
            "s3:UpdateBucketMetadataAnnotationTableConfiguration",
            "s3:UpdateBucketMetadataInventoryTableConfiguration",
            "s3:UpdateBucketMetadataJournalTableConfiguration",
            "s3tables:CreateNamespace", "s3tables:CreateTable", "s3tables:CreateTableBucket",
            "s3tables:GetTable", "s3tables:GetTableMetadataLocation",
            "s3tables:PutTableBucketPolicy", "s3tables:PutTableEncryption",
            "s3tables:PutTablePolicy", "s3tables:UpdateTableMetadataLocation",
        ],
    },
    "AWS::Logs::LogGroup": {
        # Not IAM actions of a log group's own: delivery to Firehose, and an S3 REST verb
        # the schema lists for data protection reports.
        "DataProtectionPolicy": ["firehose:TagDeliveryStream", "s3:REST.PUT.OBJECT"],
    },
    "AWS::StepFunctions::StateMachine": {
        "EncryptionConfiguration": ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"],
    },
}


def unused_actions(resource_type: str) -> set[str]:
    return {
        action
        for actions in UNUSED_HANDLER_PERMISSIONS.get(resource_type, {}).values()
        for action in actions
    }


def property_set(properties: dict[str, Any], path: str) -> bool:
    """Whether the dotted `path` (e.g. SSESpecification.KMSMasterKeyId) is set."""
    value: Any = properties
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """template.yaml as the SAM CLI reads it (short-form tags become Fn:: mappings)."""
    from samcli.yamlhelper import yaml_parse

    return yaml_parse(path.read_text())


def parameter_defaults(template: dict[str, Any]) -> dict[str, str]:
    return {
        name: str(spec["Default"])
        for name, spec in template["Parameters"].items()
        if "Default" in spec
    }


def translate(template: dict[str, Any], parameters: dict[str, str]) -> dict[str, Any]:
    """The CloudFormation template the SAM transform makes of `template`."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from samtranslator.translator.transform import transform

    class NoManagedPolicies:
        """The template names no managed policy by name: nothing to look up in IAM."""

        def load(self) -> dict[str, str]:
            return {}

    packaged = copy.deepcopy(template)
    # What `sam deploy` sends: local code and definitions uploaded (sam package) first.
    for name, resource in packaged["Resources"].items():
        properties = resource.get("Properties", {})
        for key in ("CodeUri", "DefinitionUri"):
            if isinstance(properties.get(key), str) and not properties[key].startswith("s3://"):
                properties[key] = f"s3://artifacts-bucket/{name}"
    values = {**parameter_defaults(template), **parameters}
    return transform(packaged, values, NoManagedPolicies())


# ---------------------------------------------------------------------------------------
# Rules: a small evaluator of the rule functions, to check a parameter set the way
# CloudFormation does before it creates anything.
# ---------------------------------------------------------------------------------------


def parameter_value(template: dict[str, Any], values: dict[str, str], name: str) -> Any:
    spec = template["Parameters"][name]
    raw = values.get(name, spec.get("Default"))
    if raw is None:
        raise ValueError(f"parameter {name} has no value and no default")
    raw = str(raw)
    if spec["Type"] == "CommaDelimitedList" or spec["Type"].startswith("List<"):
        return [item.strip() for item in raw.split(",")]
    return raw


def evaluate_rule_expression(
    expr: Any, template: dict[str, Any], values: dict[str, str]
) -> Any:
    if isinstance(expr, (str, int, float, bool)):
        return str(expr) if not isinstance(expr, bool) else expr
    if isinstance(expr, list):
        return [evaluate_rule_expression(e, template, values) for e in expr]
    if not isinstance(expr, dict) or len(expr) != 1:
        raise ValueError(f"not a rule expression: {expr!r}")
    (function, args), = expr.items()
    ev = lambda e: evaluate_rule_expression(e, template, values)  # noqa: E731
    if function == "Ref":
        return parameter_value(template, values, args)
    if function == "Fn::Equals":
        a, b = (ev(x) for x in args)
        return a == b
    if function == "Fn::Not":
        return not ev(args[0])
    if function == "Fn::And":
        return all(ev(x) for x in args)
    if function == "Fn::Or":
        return any(ev(x) for x in args)
    if function == "Fn::Contains":
        haystack, needle = ev(args[0]), ev(args[1])
        return needle in haystack
    if function == "Fn::EachMemberEquals":
        items, value = ev(args[0]), ev(args[1])
        return all(item == value for item in items)
    if function == "Fn::EachMemberIn":
        items, allowed = ev(args[0]), ev(args[1])
        return all(item in allowed for item in items)
    raise ValueError(f"{function} is not a rule function this evaluator knows")


def failed_rules(template: dict[str, Any], values: dict[str, str]) -> list[str]:
    """The AssertDescription of every rule assertion `values` break (empty: all hold)."""
    failures = []
    for name, rule in template.get("Rules", {}).items():
        condition = rule.get("RuleCondition")
        if condition is not None and not evaluate_rule_expression(condition, template, values):
            continue
        for assertion in rule["Assertions"]:
            if not evaluate_rule_expression(assertion["Assert"], template, values):
                failures.append(f"{name}: {assertion.get('AssertDescription', '')}")
    return failures


def functions_used(expr: Any) -> set[str]:
    """Every intrinsic function name (Fn::*, Ref, Condition) anywhere in `expr`."""
    found: set[str] = set()
    if isinstance(expr, dict):
        for key, value in expr.items():
            if key.startswith("Fn::") or key in ("Ref", "Condition"):
                found.add(key)
            found |= functions_used(value)
    elif isinstance(expr, list):
        for value in expr:
            found |= functions_used(value)
    return found


def parameter_problems(template: dict[str, Any], values: dict[str, str]) -> list[str]:
    """What CloudFormation's parameter constraints would reject in `values`."""
    problems = []
    for name, value in values.items():
        spec = template["Parameters"].get(name)
        if spec is None:
            problems.append(f"{name}: the template has no such parameter")
            continue
        items = (
            [v.strip() for v in value.split(",")]
            if spec["Type"] == "CommaDelimitedList"
            else [value]
        )
        for item in items:
            pattern = spec.get("AllowedPattern")
            if pattern and not re.fullmatch(pattern, item):
                problems.append(f"{name}={item!r} does not match {pattern}")
            allowed = spec.get("AllowedValues")
            if allowed and item not in [str(a) for a in allowed]:
                problems.append(f"{name}={item!r} is not one of {allowed}")
            if spec["Type"] == "Number":
                number = float(item)
                if "MinValue" in spec and number < float(spec["MinValue"]):
                    problems.append(f"{name}={item} is below {spec['MinValue']}")
                if "MaxValue" in spec and number > float(spec["MaxValue"]):
                    problems.append(f"{name}={item} is above {spec['MaxValue']}")
    return problems


# ---------------------------------------------------------------------------------------
# What CloudFormation needs to create, update, roll back and delete the resources.
# ---------------------------------------------------------------------------------------


def _schema_dir() -> Path:
    import cfnlint

    return Path(cfnlint.__file__).parent / "data" / "schemas"


def handler_permissions(resource_type: str, region: str = "us-east-1") -> dict[str, list[str]]:
    """`handlers.<create|read|update|delete|list>.permissions` of a registry schema."""
    providers = json.loads((_schema_dir() / "providers" / f"{region}.json").read_text())
    schema_id = providers[resource_type]
    schema = json.loads((_schema_dir() / "resources" / f"{schema_id}.json").read_text())
    return {
        handler: spec.get("permissions", [])
        for handler, spec in schema.get("handlers", {}).items()
    }


def resource_types(translated: dict[str, Any]) -> set[str]:
    return {r["Type"] for r in translated["Resources"].values()}


def allows(policy: dict[str, Any], action: str) -> bool:
    """Whether some Allow statement of `policy` names `action` (IAM wildcards, any case)."""
    for statement in policy["Statement"]:
        if statement.get("Effect") != "Allow":
            continue
        actions = statement.get("Action", [])
        for pattern in [actions] if isinstance(actions, str) else actions:
            if fnmatch.fnmatchcase(action.lower(), pattern.lower()):
                return True
    return False


def missing_permissions(
    translated: dict[str, Any], policy: dict[str, Any]
) -> dict[str, list[str]]:
    """Per resource type, the handler permissions `policy` grants nowhere (and that are not
    listed as unused with a reason)."""
    missing: dict[str, list[str]] = {}
    for resource_type in sorted(resource_types(translated)):
        needed = {
            p for perms in handler_permissions(resource_type).values() for p in perms
        }
        unused = unused_actions(resource_type)
        absent = sorted(p for p in needed if not allows(policy, p) and p not in unused)
        if absent:
            missing[resource_type] = absent
    return missing


# Every optional piece of the stack switched on (the shell runner, the tag lookup, a KMS key,
# mapped shell runners, EC2 runners): the configuration that creates the most resources.
FULLEST_CONFIGURATION = {
    "DefaultExecutor": "EC2",
    "GitLabUrl": "https://gitlab.example.com",
    "GitLabApiTokenParameterName": "/ephemeral-runners/gitlab/api-token",
    "RunnerApiTokenParameterName": "/ephemeral-runners/gitlab/runner-api-token",
    "RegistrationTokenParameterName": "/ephemeral-runners/gitlab/registration-token",
    "SubnetIds": "subnet-0123456789abcdef0,subnet-0123456789abcdef1",
    # No SecurityGroupIds: the stack creates the runners' egress-only group in this VPC.
    "VpcId": "vpc-0123456789abcdef0",
    "SecretsKmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555",
    # The shared token reads one more parameter than per-job runners do (the shell runner's
    # role then has both statements): tests/template/test_shell_runner_role.py checks per-job.
    "ShellRunnerMode": "shared-token",
    "ShellRunnerTokenParameterName": "/ephemeral-runners/gitlab/shell-runner-token",
    "DefaultLambdaArn": "arn:aws:lambda:us-east-1:123456789012:function:shell-runner",
    "RunnerFunctionArns": "arn:aws:lambda:us-east-1:123456789012:function:shell-runner-big",
    # Both baked runner AMI pipelines (Image Builder).
    "RunnerAmiRecipe": "both",
}


# ---------------------------------------------------------------------------------------
# Values as CloudFormation would resolve them for one parameter set (enough for IAM
# resources and environment variables: Ref, Fn::Sub, Fn::If, Fn::Join, conditions).
# ---------------------------------------------------------------------------------------

PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::StackName": "ephemeral-runners",
    "AWS::URLSuffix": "amazonaws.com",
}


def condition_holds(name: str, cfn: dict[str, Any], values: dict[str, str]) -> bool:
    return bool(resolve(cfn["Conditions"][name], cfn, values))


def resolve(expr: Any, cfn: dict[str, Any], values: dict[str, str]) -> Any:
    """`expr` resolved for `values` (parameters; defaults and pseudo parameters filled in).
    A GetAtt stays as `<Resource.Attribute>`."""
    r = lambda e: resolve(e, cfn, values)  # noqa: E731
    if isinstance(expr, list):
        return [r(e) for e in expr]
    if not isinstance(expr, dict):
        return expr
    if len(expr) != 1:
        return {k: r(v) for k, v in expr.items()}
    (function, args), = expr.items()
    if function == "Ref":
        if args in PSEUDO:
            return PSEUDO[args]
        if args in cfn.get("Parameters", {}):
            return parameter_value(cfn, values, args)
        return f"<{args}>"
    if function == "Fn::GetAtt":
        return f"<{'.'.join(args) if isinstance(args, list) else args}>"
    if function == "Fn::If":
        name, yes, no = args
        return r(yes) if condition_holds(name, cfn, values) else r(no)
    if function == "Condition":
        return condition_holds(args, cfn, values)
    if function == "Fn::Equals":
        a, b = (r(x) for x in args)
        return a == b
    if function == "Fn::Not":
        return not r(args[0])
    if function == "Fn::And":
        return all(r(x) for x in args)
    if function == "Fn::Or":
        return any(r(x) for x in args)
    if function == "Fn::Join":
        separator, items = args
        return separator.join(str(i) for i in r(items))
    if function == "Fn::Sub":
        text, extra = (args, {}) if isinstance(args, str) else (args[0], r(args[1]))

        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in extra:
                return str(extra[name])
            value = r({"Ref": name}) if "." not in name else f"<{name}>"
            return ",".join(value) if isinstance(value, list) else str(value)

        return re.sub(r"\$\{([^}!]+)\}", one, text)
    return {function: r(args)}


def policy_statement(cfn: dict[str, Any], function: str, sid: str) -> dict[str, Any] | None:
    """The statement `sid` among a translated function role's inline policies."""
    role = cfn["Resources"][f"{function}Role"]
    for policy in role["Properties"].get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            if isinstance(statement, dict) and statement.get("Sid") == sid:
                return statement
    return None
