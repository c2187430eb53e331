"""Issue 12, finding 1: the shell runner's jobs run with its role, so the role may write only
to its own log group (no AWSLambdaBasicExecutionRole, which writes to any) and read only the
runner token."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helper-scripts"))

import template_facts as facts  # noqa: E402

VALUES = {**facts.FULLEST_CONFIGURATION}


def translated():
    return facts.translate(facts.load_template(), VALUES)


def statements(cfn, role):
    found = []
    for policy in cfn["Resources"][role]["Properties"].get("Policies", []):
        for statement in facts.resolve(policy["PolicyDocument"], cfn, VALUES)["Statement"]:
            if statement not in (None, "<AWS::NoValue>"):
                found.append(statement)
    return found


def test_the_shell_runner_has_its_own_role_without_managed_policies():
    cfn = translated()
    function = cfn["Resources"]["ShellRunnerFunction"]["Properties"]
    assert function["Role"] == {"Fn::GetAtt": ["ShellRunnerRole", "Arn"]}
    role = cfn["Resources"]["ShellRunnerRole"]["Properties"]
    assert role.get("ManagedPolicyArns", []) == [], "a managed policy grants more than the job needs"
    # Every other function keeps SAM's role with the basic execution policy: the check above
    # would not notice if the shell runner went back to it, this one would.
    sam_roles = [name for name in cfn["Resources"] if name.endswith("FunctionRole")]
    assert "ShellRunnerFunctionRole" not in sam_roles


def test_its_logs_go_only_to_its_own_log_group_and_it_reads_only_its_token():
    cfn = translated()
    granted = {}
    for statement in statements(cfn, "ShellRunnerRole"):
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        for action in actions:
            granted[action] = statement["Resource"]
    assert set(granted) == {"logs:CreateLogStream", "logs:PutLogEvents", "ssm:GetParameter", "kms:Decrypt"}
    own = "<ShellRunnerFunctionLogGroup.Arn>"
    assert granted["logs:CreateLogStream"] == own
    assert granted["logs:PutLogEvents"] == own
    assert granted["ssm:GetParameter"].endswith("parameter" + VALUES["ShellRunnerTokenParameterName"])
    logging = cfn["Resources"]["ShellRunnerFunction"]["Properties"]["LoggingConfig"]
    assert logging["LogGroup"] == {"Ref": "ShellRunnerFunctionLogGroup"}
