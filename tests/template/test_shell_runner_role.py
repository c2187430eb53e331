"""Issue 12, finding 1: the shell runner's jobs run with its role, so the role may write only
to its own log group (no AWSLambdaBasicExecutionRole, which writes to any), take (read and
delete) only per-job runner token parameters, and read the shared token only when the stack
asks for the shared-token mode."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helper-scripts"))

import template_facts as facts  # noqa: E402

SHARED = {**facts.FULLEST_CONFIGURATION}
PER_JOB = {**SHARED, "ShellRunnerMode": "per-job", "ShellRunnerTokenParameterName": ""}
STACK = "ephemeral-runners"


def translated(values):
    return facts.translate(facts.load_template(), values)


def statements(cfn, role, values):
    found = []
    for policy in cfn["Resources"][role]["Properties"].get("Policies", []):
        for statement in facts.resolve(policy["PolicyDocument"], cfn, values)["Statement"]:
            if statement not in (None, "<AWS::NoValue>"):
                found.append(statement)
    return found


def grants(values):
    """(action, resource) pairs the shell runner's role allows."""
    cfn = translated(values)
    granted = set()
    for statement in statements(cfn, "ShellRunnerRole", values):
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            granted.add((action, statement["Resource"]))
    return cfn, granted


def test_the_shell_runner_has_its_own_role_without_managed_policies():
    cfn = translated(PER_JOB)
    function = cfn["Resources"]["ShellRunnerFunction"]["Properties"]
    assert function["Role"] == {"Fn::GetAtt": ["ShellRunnerRole", "Arn"]}
    role = cfn["Resources"]["ShellRunnerRole"]["Properties"]
    assert role.get("ManagedPolicyArns", []) == [], "a managed policy grants more than the job needs"
    # Every other function keeps SAM's role with the basic execution policy: the check above
    # would not notice if the shell runner went back to it, this one would.
    sam_roles = [name for name in cfn["Resources"] if name.endswith("FunctionRole")]
    assert "ShellRunnerFunctionRole" not in sam_roles


def test_per_job_it_writes_its_own_logs_and_takes_only_per_job_token_parameters():
    cfn, granted = grants(PER_JOB)
    own = "<ShellRunnerFunctionLogGroup.Arn>"
    per_job = f"parameter/ephemeral-runners/{STACK}/runner-tokens/lambda-*"
    actions = {action for action, _ in granted}
    assert actions == {
        "logs:CreateLogStream", "logs:PutLogEvents", "ssm:GetParameter", "ssm:DeleteParameter",
        # The job cache (RunnerCache on, the default): objects of the cache prefix only, no
        # list, no delete, no other bucket (docs/ec2-runners.md says it spans projects).
        "s3:GetObject", "s3:PutObject",
    }
    for action, resource in granted:
        if action.startswith("logs:"):
            assert resource == own
        elif action.startswith("s3:"):
            assert resource == "<CacheBucket.Arn>/cache/project/*", resource
        else:
            # Never an EC2 instance's token parameter (<prefix>/i-...), nor any other.
            assert resource.endswith(per_job), resource
    env = cfn["Resources"]["ShellRunnerFunction"]["Properties"]["Environment"]["Variables"]
    assert facts.resolve(env.get("RUNNER_TOKEN_PARAMETER"), cfn, PER_JOB) in (None, "<AWS::NoValue>")
    logging = cfn["Resources"]["ShellRunnerFunction"]["Properties"]["LoggingConfig"]
    assert logging["LogGroup"] == {"Ref": "ShellRunnerFunctionLogGroup"}


def test_the_shared_token_is_readable_only_in_the_shared_token_mode():
    _, per_job = grants(PER_JOB)
    _, shared = grants(SHARED)
    token = "parameter" + SHARED["ShellRunnerTokenParameterName"]
    assert not any(resource.endswith(token) for _, resource in per_job)
    assert any(action == "ssm:GetParameter" and resource.endswith(token) for action, resource in shared)
    assert ("kms:Decrypt", SHARED["SecretsKmsKeyArn"]) in shared


def test_the_provision_function_is_told_the_mode():
    for values in (PER_JOB, SHARED):
        cfn = translated(values)
        env = cfn["Resources"]["Ec2ProvisionFunction"]["Properties"]["Environment"]["Variables"]
        assert facts.resolve(env["SHELL_RUNNER_MODE"], cfn, values) == values["ShellRunnerMode"]


def test_without_a_cache_the_shell_runner_has_no_s3_right():
    _, granted = grants({**PER_JOB, "RunnerCache": "off"})
    assert not any(action.startswith("s3:") for action, _ in granted)
