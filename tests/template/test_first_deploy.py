"""What would fail on the first `sam deploy` in a real account, checked offline on the template
as the SAM translator turns it into CloudFormation (issue 15)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helper-scripts"))

import template_facts as facts  # noqa: E402

LAMBDA_ONLY = {
    "DefaultExecutor": "LAMBDA",
    "DefaultLambdaArn": "arn:aws:lambda:us-east-1:123456789012:function:shell-runner",
}

CONFIGURATIONS = {
    "defaults": {},
    "lambda-only": LAMBDA_ONLY,
    "fullest": facts.FULLEST_CONFIGURATION,
    # The default shell-runner mode a user picks: a runner per job, no shared token.
    "per-job-shell-runner": {
        **facts.FULLEST_CONFIGURATION,
        "ShellRunnerMode": "per-job",
        "ShellRunnerTokenParameterName": "",
    },
}


@pytest.fixture(scope="module")
def template():
    return facts.load_template()


@pytest.fixture(scope="module", params=sorted(CONFIGURATIONS))
def translated(request, template):
    return request.param, facts.translate(template, CONFIGURATIONS[request.param])


def resources_of(translated_template, resource_type):
    return {
        name: resource
        for name, resource in translated_template["Resources"].items()
        if resource["Type"] == resource_type
    }


# --- 1. reserved concurrency ----------------------------------------------------------------


def reservations(cfn, values):
    """Each function's reserved concurrency as CloudFormation resolves it for `values`."""
    resolved = {
        name: facts.resolve(fn["Properties"].get("ReservedConcurrentExecutions"), cfn, values)
        for name, fn in resources_of(cfn, "AWS::Lambda::Function").items()
    }
    return {name: r for name, r in resolved.items() if r not in (None, "<AWS::NoValue>")}


def test_no_function_reserves_concurrency(translated):
    """New accounts have a concurrency quota of 10 and Lambda keeps 100 unreserved: any
    reservation fails CreateFunction there and rolls the whole stack back."""
    configuration, cfn = translated
    reserving = reservations(cfn, CONFIGURATIONS[configuration])
    assert reserving == {}, f"{configuration}: functions reserve concurrency: {reserving}"


def test_the_shell_runner_cap_reserves_only_when_asked(template):
    """ShellRunnerMaxConcurrency caps concurrent shell-runner jobs (issue 11): opt-in, and
    only on the shell runner."""
    values = {**facts.FULLEST_CONFIGURATION, "ShellRunnerMaxConcurrency": "5"}
    cfn = facts.translate(template, values)
    assert reservations(cfn, values) == {"ShellRunnerFunction": "5"}
    without_runner = {**values, "ShellRunnerMode": "off", "ShellRunnerTokenParameterName": ""}
    cfn = facts.translate(template, without_runner)
    assert reservations(cfn, without_runner) == {}


# --- 3. Rules use only rule functions, and say what to fix ------------------------------------


def test_rules_use_only_documented_rule_functions(template):
    used = facts.functions_used(template["Rules"])
    assert used <= facts.RULE_FUNCTIONS, f"not rule functions: {sorted(used - facts.RULE_FUNCTIONS)}"


@pytest.mark.parametrize(
    "values, broken",
    [
        ({"GitLabUrl": "https://g.example.com", "RunnerApiTokenParameterName": "/t"}, "SubnetIds"),
        (
            {
                "GitLabUrl": "https://g.example.com",
                "RunnerApiTokenParameterName": "/t",
                "SubnetIds": "subnet-1,",
            },
            "SubnetIds",
        ),
        ({"SubnetIds": "subnet-1", "RunnerApiTokenParameterName": "/t"}, "GitLabUrl"),
        (
            {
                "GitLabUrl": "https://g.example.com",
                "RunnerApiTokenParameterName": "/t",
                "SubnetIds": "subnet-1",
            },
            "GitLabApiTokenParameterName",
        ),
        ({"DefaultExecutor": "LAMBDA"}, "DefaultLambdaArn"),
        ({**LAMBDA_ONLY, "ShellRunnerMode": "shared-token", "ShellRunnerTokenParameterName": "/s"}, "GitLabUrl"),
        ({**LAMBDA_ONLY, "ShellRunnerMode": "shared-token", "GitLabUrl": "https://g.example.com"}, "ShellRunnerTokenParameterName"),
        # The shared token is unsafe for untrusted projects: only when asked for by name.
        ({**LAMBDA_ONLY, "ShellRunnerTokenParameterName": "/s", "GitLabUrl": "https://g.example.com"}, "ShellRunnerMode shared-token"),
        # A runner per job needs the token that creates runners.
        ({**LAMBDA_ONLY, "ShellRunnerMode": "per-job", "GitLabUrl": "https://g.example.com"}, "RunnerApiTokenParameterName"),
        # ...and the job's tags, for the runner made for it.
        ({**LAMBDA_ONLY, "ShellRunnerMode": "per-job", "GitLabUrl": "https://g.example.com"}, "GitLabApiTokenParameterName"),
        ({**LAMBDA_ONLY, "AuthMode": "token", "SecretTokenParameterName": ""}, "SecretTokenParameterName"),
    ],
)
def test_rules_reject_incomplete_configurations(template, values, broken):
    failures = facts.failed_rules(template, values)
    assert any(broken in f for f in failures), failures


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_rules_accept_the_supported_configurations(template, configuration):
    values = CONFIGURATIONS[configuration]
    if configuration == "defaults":
        # The defaults route to EC2, which needs the operator's GitLab and subnets.
        values = {
            "GitLabUrl": "https://g.example.com",
            "RunnerApiTokenParameterName": "/t",
            "GitLabApiTokenParameterName": "/r",
            "SubnetIds": "subnet-1,subnet-2",
            "VpcId": "vpc-0123456789abcdef0",
        }
    assert facts.failed_rules(template, values) == []
    assert facts.parameter_problems(template, values) == []


# --- 2. samconfig.toml.example deploys without a question -------------------------------------


def example_deploy_parameters(tmp_path):
    from samcli.cli.types import CfnParameterOverridesType
    from samcli.lib.config.samconfig import SamConfig

    # Read as the SAM CLI reads a copy named samconfig.toml (it picks the format by suffix).
    (tmp_path / "samconfig.toml").write_text((ROOT / "samconfig.toml.example").read_text())
    config = SamConfig(str(tmp_path))
    deploy = config.get_all(["deploy"], "parameters")
    overrides = CfnParameterOverridesType().convert(deploy["parameter_overrides"], None, None)
    return deploy, overrides


def without_placeholders(value: str) -> str:
    # The example marks what an operator must fill in with REPLACE-ME(-example).
    return re.sub(r"REPLACE-ME-(eg-)?", "", value)


def test_samconfig_example_answers_every_deploy_question(template, tmp_path):
    deploy, overrides = example_deploy_parameters(tmp_path)
    assert deploy["stack_name"]
    assert deploy["region"]
    assert deploy["resolve_s3"] is True or deploy.get("s3_bucket")
    assert deploy["confirm_changeset"] is False
    # The stack creates IAM roles (without custom names): CAPABILITY_IAM, and nothing more.
    assert "CAPABILITY_IAM" in deploy["capabilities"]
    values = {k: without_placeholders(v) for k, v in overrides.items()}
    assert facts.parameter_problems(template, values) == []
    assert facts.failed_rules(template, values) == []


def test_samconfig_example_shows_every_parameter(template):
    """Every parameter is in the example, set or commented, with a value the template takes."""
    text = (ROOT / "samconfig.toml.example").read_text()
    shown = dict(re.findall(r"""^\s*#?\s*["']([A-Za-z0-9]+)=(.*?)["'],?\s*$""", text, re.M))
    assert set(template["Parameters"]) - set(shown) == set()
    values = {k: without_placeholders(v.strip('"')) for k, v in shown.items()}
    assert facts.parameter_problems(template, values) == []


# --- 4. the CloudFormation execution role can create, update, roll back and delete ------------


def test_execution_role_grants_every_handler_permission(translated):
    configuration, cfn = translated
    policy = json.loads(facts.EXECUTION_ROLE_POLICY.read_text())
    assert facts.missing_permissions(cfn, policy) == {}, configuration


def test_handler_permissions_left_out_are_for_properties_never_set(translated):
    _, cfn = translated
    for resource_type, properties in facts.UNUSED_HANDLER_PERMISSIONS.items():
        for name, resource in resources_of(cfn, resource_type).items():
            for path in properties:
                assert not facts.property_set(resource.get("Properties", {}), path), (
                    f"{name} sets {path}: grant {properties[path]} in "
                    f"{facts.EXECUTION_ROLE_POLICY.name} and drop them from "
                    "UNUSED_HANDLER_PERMISSIONS"
                )


def test_coverage_check_finds_a_missing_permission(translated):
    """The check above can fail: without the role statements it names what is missing."""
    _, cfn = translated
    policy = json.loads(facts.EXECUTION_ROLE_POLICY.read_text())
    policy["Statement"] = [s for s in policy["Statement"] if s["Sid"] != "Roles"]
    missing = facts.missing_permissions(cfn, policy)
    assert "iam:ListRolePolicies" in missing["AWS::IAM::Role"]


def test_docs_name_the_policy_file():
    doc = (ROOT / "docs" / "deploy-from-ci.md").read_text()
    assert facts.EXECUTION_ROLE_POLICY.name in doc


# --- 8. the endpoint does not answer GitLab's bursts with 429 ---------------------------------


def test_webhook_stage_limits_stay_above_gitlab_bursts(template, translated):
    _, cfn = translated
    stages = resources_of(cfn, "AWS::ApiGatewayV2::Stage")
    assert stages
    for stage in stages.values():
        settings = stage["Properties"]["DefaultRouteSettings"]
        assert settings["ThrottlingBurstLimit"] == {"Ref": "WebhookBurstLimit"}
        assert settings["ThrottlingRateLimit"] == {"Ref": "WebhookRateLimit"}
    assert template["Parameters"]["WebhookBurstLimit"]["MinValue"] >= 1000
    assert template["Parameters"]["WebhookRateLimit"]["MinValue"] >= 500


# --- deploy from CI: every parameter can be set ----------------------------------------------


def test_ci_pipeline_and_its_docs_set_every_parameter(template):
    pipeline = (ROOT / "ci" / "gitlab-ci.yml").read_text()
    doc = (ROOT / "docs" / "deploy-from-ci.md").read_text()
    in_pipeline = dict(re.findall(r"^\s*param ([A-Za-z0-9]+) ([A-Z0-9_]+)\s*$", pipeline, re.M))
    in_doc = dict(
        (parameter, variable)
        for variable, parameter in re.findall(r"^\| `([A-Z0-9_]+)` \| `([A-Za-z0-9]+)`[^|]*\|", doc, re.M)
    )
    assert set(template["Parameters"]) - set(in_pipeline) == set()
    assert set(in_pipeline) - set(template["Parameters"]) == set()
    assert in_doc == in_pipeline


# --- 7. every ssm: AMI the functions accept is readable by the provision role ----------------


def public_ami_prefix() -> str:
    source = (ROOT / "crates" / "core" / "src" / "ec2.rs").read_text()
    match = re.search(r'PUBLIC_AMI_PARAMETER_PREFIX: &str = "([^"]+)"', source)
    assert match, "ephemeral_core::ec2::PUBLIC_AMI_PARAMETER_PREFIX not found"
    return match.group(1)


@pytest.mark.parametrize("own_prefix", ["", "/golden-amis/"])
def test_every_accepted_ami_parameter_is_readable(template, own_prefix):
    """The functions accept ssm: names under the public prefix and AMI_PARAMETER_PREFIX (the
    core's ami_parameter_prefixes); the role must read exactly those."""
    values = {**facts.FULLEST_CONFIGURATION, "AmiParameterPrefix": own_prefix}
    cfn = facts.translate(template, values)
    function = cfn["Resources"]["Ec2ProvisionFunction"]["Properties"]
    own = facts.resolve(function["Environment"]["Variables"]["AMI_PARAMETER_PREFIX"], cfn, values)
    assert own == (own_prefix or "/ephemeral-runners/ephemeral-runners/amis/")
    statement = facts.policy_statement(cfn, "Ec2ProvisionFunction", "ResolveAmiParameters")
    resources = facts.resolve(statement["Resource"], cfn, values)
    account_free = "arn:aws:ssm:us-east-1::parameter"
    own_arn = "arn:aws:ssm:us-east-1:123456789012:parameter"
    assert sorted(resources) == sorted(
        [f"{account_free}{public_ami_prefix()}*", f"{own_arn}{own}*"]
    ), resources
    assert statement["Action"] == "ssm:GetParameter"
