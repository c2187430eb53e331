"""The EC2 provision role's RunInstances statements and the event bus policy, evaluated for
described requests (issue 12, findings 4 and 5): a launch in an unlisted subnet, with an
unlisted security group, from a community AMI or with an instance metadata service that job
containers could reach is refused by the policy's shape; so is an event with our source put
by anyone but the functions that publish it.

The evaluator is deliberately small: Allow statements whose Action, Resource and every
Condition match (a condition on a key the request lacks does not match, as in IAM), and
Deny statements that win. It knows the operators the template uses and fails on any other,
so a new operator cannot pass unevaluated. Which resources RunInstances authorizes, and with
which condition keys, is AWS's Service Authorization Reference; the keys used are checked
against the copy cfn-lint ships.
"""

from __future__ import annotations

import fnmatch
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helper-scripts"))

import template_facts as facts  # noqa: E402

REGION, ACCOUNT, STACK = "us-east-1", "123456789012", "ephemeral-runners"
SUBNETS = ["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"]
AMAZON_AMI_OWNER = "amazon"
COMMUNITY_OWNER = "999988887777"

EC2_STACK = {**facts.FULLEST_CONFIGURATION, "SubnetIds": ",".join(SUBNETS)}
OWN_GROUPS = {**EC2_STACK, "SecurityGroupIds": "sg-0aaa1111bbbb2222c", "VpcId": ""}


# --- resolving the translated template --------------------------------------------------------


def resolved(expr: Any, cfn: dict[str, Any], values: dict[str, str]) -> Any:
    """facts.resolve, plus Fn::Split (which it leaves as is) and AWS::NoValue dropped."""
    return _finish(facts.resolve(expr, cfn, values))


def _finish(value: Any) -> Any:
    if isinstance(value, list):
        return [_finish(v) for v in value if v != "<AWS::NoValue>"]
    if isinstance(value, dict):
        if set(value) == {"Fn::Split"}:
            separator, text = value["Fn::Split"]
            return str(_finish(text)).split(separator)
        return {k: _finish(v) for k, v in value.items() if v != "<AWS::NoValue>"}
    return value


def role_statements(values: dict[str, str], function: str = "Ec2ProvisionFunction"):
    cfn = facts.translate(facts.load_template(), values)
    role = cfn["Resources"][f"{function}Role"]
    statements = []
    for policy in role["Properties"].get("Policies", []):
        document = resolved(policy["PolicyDocument"], cfn, values)
        statements += [s for s in document["Statement"] if isinstance(s, dict)]
    return cfn, statements


# --- a small, strict IAM evaluator -------------------------------------------------------------


def _values(v: Any) -> list[str]:
    return [str(x) for x in (v if isinstance(v, list) else [v])]


def _condition_holds(operator: str, key: str, wanted: Any, context: dict[str, Any]) -> bool:
    wanted = _values(wanted)
    present = key in context
    have = _values(context[key]) if present else []
    if operator == "StringEquals":
        return present and all(h in wanted for h in have)
    if operator in ("StringLike", "ArnLike"):
        return present and all(any(fnmatch.fnmatchcase(h, w) for w in wanted) for h in have)
    if operator == "ArnNotEquals":
        # Negated: holds when the key matches none of the values (or is absent).
        return not any(h in wanted for h in have)
    if operator == "ForAnyValue:StringEquals":
        return any(h in wanted for h in have)
    if operator == "NumericLessThanEquals":
        return present and all(float(h) <= float(wanted[0]) for h in have)
    raise AssertionError(f"the evaluator does not know {operator}: teach it before using it")


def _matches(statement: dict[str, Any], action: str, resource: str, context: dict) -> bool:
    actions = _values(statement.get("Action", []))
    if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions):
        return False
    if not any(fnmatch.fnmatchcase(resource, r) for r in _values(statement["Resource"])):
        return False
    return all(
        _condition_holds(operator, key, value, context)
        for operator, keys in statement.get("Condition", {}).items()
        for key, value in keys.items()
    )


def allowed(statements, action: str, resource: str, context: dict[str, Any]) -> bool:
    matching = [s for s in statements if _matches(s, action, resource, context)]
    if any(s["Effect"] == "Deny" for s in matching):
        return False
    return any(s["Effect"] == "Allow" for s in matching)


def denied(statements, action: str, resource: str, context: dict[str, Any]) -> bool:
    return any(
        s["Effect"] == "Deny" and _matches(s, action, resource, context) for s in statements
    )


# --- what RunInstances authorizes -------------------------------------------------------------


def arn(kind: str, name: str, account: str = ACCOUNT) -> str:
    return f"arn:aws:ec2:{REGION}:{account}:{kind}/{name}"


def launch(
    *,
    subnet: str = SUBNETS[0],
    groups: list[str],
    image_owner: str = AMAZON_AMI_OWNER,
    tags: dict[str, str] | None = None,
    http_tokens: str = "required",
    hop_limit: int = 1,
    spot: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """The (resource, condition context) pairs IAM checks for one RunInstances call shaped
    like the fleet's (crates/fleet/src/aws.rs): a subnet and security groups (no network
    interface given: EC2 creates one in the subnet), tags on instance and volumes, IMDS
    options, an AMI, spot or on demand."""
    tags = {"ephemeral-runners:managed-by": STACK} if tags is None else tags
    request_tags = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    resources = [
        (
            arn("instance", "*"),
            {
                **request_tags,
                "ec2:MetadataHttpTokens": http_tokens,
                "ec2:MetadataHttpPutResponseHopLimit": hop_limit,
            },
        ),
        (arn("volume", "*"), dict(request_tags)),
        (arn("network-interface", "*"), {"ec2:Subnet": arn("subnet", subnet)}),
        (arn("subnet", subnet), {"ec2:SubnetID": subnet}),
        (f"arn:aws:ec2:{REGION}::image/ami-0123456789abcdef0", {"ec2:Owner": image_owner}),
    ]
    resources += [(arn("security-group", g), {"ec2:SecurityGroupID": g}) for g in groups]
    if spot:
        resources.append((arn("spot-instances-request", "*"), {}))
    return resources


def refused_resources(statements, request) -> list[str]:
    return [r for r, context in request if not allowed(statements, "ec2:RunInstances", r, context)]


def stack_group(cfn, values) -> list[str]:
    env = cfn["Resources"]["Ec2ProvisionFunction"]["Properties"]["Environment"]["Variables"]
    return [g for g in resolved(env["SECURITY_GROUP_IDS"], cfn, values).split(",") if g]


# --- findings 4: the launch ---------------------------------------------------------------------


@pytest.mark.parametrize("values", [EC2_STACK, OWN_GROUPS], ids=["stack-group", "own-groups"])
def test_the_fleets_launch_is_allowed_on_demand_and_spot(values):
    cfn, statements = role_statements(values)
    groups = stack_group(cfn, values)
    expected = ["<RunnerSecurityGroup.GroupId>"] if values is EC2_STACK else ["sg-0aaa1111bbbb2222c"]
    assert groups == expected
    for subnet in SUBNETS:
        for spot in (False, True):
            request = launch(subnet=subnet, groups=groups, spot=spot)
            assert refused_resources(statements, request) == []
    # The account's own AMIs too.
    assert refused_resources(statements, launch(groups=groups, image_owner=ACCOUNT)) == []


@pytest.mark.parametrize(
    "change, refused_kind",
    [
        ({"subnet": "subnet-0ffffffffffffffff"}, ["network-interface", "subnet"]),
        ({"image_owner": COMMUNITY_OWNER}, ["image"]),
        ({"image_owner": "aws-marketplace"}, ["image"]),
        ({"groups": ["sg-0bad0bad0bad0bad0"]}, ["security-group"]),
        ({"hop_limit": 2}, ["instance"]),
        ({"http_tokens": "optional"}, ["instance"]),
        ({"tags": {}}, ["instance", "volume"]),
        ({"tags": {"ephemeral-runners:managed-by": "another-stack"}}, ["instance", "volume"]),
    ],
)
def test_a_launch_outside_the_configuration_is_refused(change, refused_kind):
    cfn, statements = role_statements(EC2_STACK)
    request = launch(**{"groups": stack_group(cfn, EC2_STACK), **change})
    refused = refused_resources(statements, request)
    kinds = sorted({re.sub(r"^arn:aws:ec2:[^:]*:[^:]*:([a-z-]+)/.*$", r"\1", r) for r in refused})
    assert kinds == sorted(refused_kind), refused


def test_the_default_vpc_group_is_not_usable_without_configured_groups():
    """No SecurityGroupIds and no VpcId (a stack without EC2 subnets): no group is allowed,
    so a launch cannot fall back to the VPC's default group."""
    values = {**EC2_STACK, "VpcId": ""}
    cfn, statements = role_statements(values)
    assert stack_group(cfn, values) == []
    assert not any(
        allowed(statements, "ec2:RunInstances", arn("security-group", g), {"ec2:SecurityGroupID": g})
        for g in ("sg-default0000000000", "*")
    )


def test_listed_ami_owners_and_mapping_subnets_are_allowed_and_only_those():
    values = {**EC2_STACK, "AmiOwners": "099720109477", "MappingSubnetIds": "subnet-0mapped00000000"}
    cfn, statements = role_statements(values)
    groups = stack_group(cfn, values)
    assert refused_resources(statements, launch(groups=groups, image_owner="099720109477")) == []
    assert refused_resources(statements, launch(groups=groups, subnet="subnet-0mapped00000000")) == []
    assert refused_resources(statements, launch(groups=groups, image_owner=COMMUNITY_OWNER))
    # Without the parameters, neither is allowed.
    cfn, statements = role_statements(EC2_STACK)
    groups = stack_group(cfn, EC2_STACK)
    assert refused_resources(statements, launch(groups=groups, image_owner="099720109477"))
    assert refused_resources(statements, launch(groups=groups, subnet="subnet-0mapped00000000"))


def test_no_runinstances_statement_is_unconditioned_on_a_wildcard():
    """Every RunInstances statement on a `*` resource is narrowed by a condition (the spot
    request, which carries no key to narrow by, aside)."""
    _, statements = role_statements(EC2_STACK)
    for s in statements:
        if "ec2:RunInstances" in _values(s["Action"]) and not s["Resource"].endswith(
            ":spot-instances-request/*"
        ):
            assert s.get("Condition"), s["Sid"]


def test_condition_keys_are_documented_for_their_resource_types():
    """A key IAM does not evaluate for a resource type makes its condition never match (the
    launch fails in a real account); moto does not check IAM, so check AWS's own list."""
    import cfnlint

    policies = json.loads(
        (Path(cfnlint.__file__).parent / "data" / "AdditionalSpecs" / "Policies.json").read_text()
    )["ec2"]["Resources"]
    _, statements = role_statements(EC2_STACK)
    checked = 0
    for s in statements:
        if "ec2:RunInstances" not in _values(s["Action"]):
            continue
        kind = re.match(r"^arn:aws:ec2:[^:]*:[^:]*:([a-z-]+)/", s["Resource"]).group(1)
        documented = {k.lower() for k in policies[kind]["ConditionKeys"]}
        for keys in s.get("Condition", {}).values():
            for key in keys:
                general = re.sub(r"/.*$", "/${TagKey}", key).lower()
                assert key.lower() in documented or general in documented, (kind, key)
                checked += 1
    assert checked >= 7


def test_imds_hop_limit_is_one_in_the_code_and_the_policy():
    """The core's constant, the fleet's RunInstances call and the policy agree."""
    core = (ROOT / "crates" / "core" / "src" / "ec2.rs").read_text()
    assert re.search(r"pub const IMDS_HOP_LIMIT: i32 = 1;", core)
    fleet = (ROOT / "crates" / "fleet" / "src" / "aws.rs").read_text()
    assert ".http_put_response_hop_limit(ephemeral_core::ec2::IMDS_HOP_LIMIT)" in fleet
    assert ".http_tokens(HttpTokensState::Required)" in fleet
    _, statements = role_statements(EC2_STACK)
    (instance,) = [s for s in statements if s.get("Sid") == "LaunchTaggedInstances"]
    assert instance["Condition"]["NumericLessThanEquals"] == {"ec2:MetadataHttpPutResponseHopLimit": 1}
    assert instance["Condition"]["StringEquals"]["ec2:MetadataHttpTokens"] == "required"


def test_the_stacks_security_group_lets_nothing_in():
    values = EC2_STACK
    cfn = facts.translate(facts.load_template(), values)
    group = cfn["Resources"]["RunnerSecurityGroup"]
    assert facts.condition_holds(group["Condition"], cfn, values)
    properties = group["Properties"]
    assert "SecurityGroupIngress" not in properties
    assert not [
        name
        for name, r in cfn["Resources"].items()
        if r["Type"] == "AWS::EC2::SecurityGroupIngress"
    ]
    egress = properties["SecurityGroupEgress"]
    assert egress and all(rule["IpProtocol"] == "tcp" for rule in egress)
    assert {(rule["FromPort"], rule["ToPort"]) for rule in egress} <= {(443, 443), (80, 80)}
    # With the operator's own groups, the stack creates none.
    assert not facts.condition_holds(group["Condition"], cfn, OWN_GROUPS)


def test_subnets_without_groups_need_the_vpc():
    template = facts.load_template()
    values = {
        "GitLabUrl": "https://g.example.com",
        "RunnerApiTokenParameterName": "/t",
        "GitLabApiTokenParameterName": "/r",
        "SubnetIds": "subnet-1",
    }
    assert any("VpcId" in f for f in facts.failed_rules(template, values))
    assert facts.failed_rules(template, {**values, "VpcId": "vpc-0123456789abcdef0"}) == []
    assert facts.failed_rules(template, {**values, "SecurityGroupIds": "sg-1"}) == []


# --- finding 5: who may put our events on the bus ----------------------------------------------


def event_source() -> str:
    source = (ROOT / "crates" / "core" / "src" / "webhook.rs").read_text()
    match = re.search(r'pub const EVENT_SOURCE: &str = "([^"]+)";', source)
    assert match, "ephemeral_core::webhook::EVENT_SOURCE not found"
    return match.group(1)


def bus_policy(cfn, values):
    (policy,) = [r for r in cfn["Resources"].values() if r["Type"] == "AWS::Events::EventBusPolicy"]
    assert policy["Properties"]["EventBusName"] == {"Ref": "EventBus"}
    return [resolved(policy["Properties"]["Statement"], cfn, values)]


def publishers(cfn, values) -> set[str]:
    """`<Role.Arn>` of every role whose policies allow events:PutEvents."""
    found = set()
    for name, resource in cfn["Resources"].items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        for policy in resource["Properties"].get("Policies", []):
            document = resolved(policy["PolicyDocument"], cfn, values)
            if facts.allows(document, "events:PutEvents"):
                found.add(f"<{name}.Arn>")
    return found


@pytest.mark.parametrize("values", [{}, facts.FULLEST_CONFIGURATION], ids=["defaults", "fullest"])
def test_only_the_functions_that_publish_may_put_our_source(values):
    cfn = facts.translate(facts.load_template(), values)
    statements = bus_policy(cfn, values)
    roles = publishers(cfn, values)
    assert roles == {"<WebhookFunctionRole.Arn>", "<IntakeDrainerFunctionRole.Arn>"}
    (deny,) = statements
    assert sorted(_values(deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"])) == sorted(roles)

    bus = "<EventBus.Arn>"
    ours = {"events:source": [event_source()]}
    for role in roles:
        assert not denied(statements, "events:PutEvents", bus, {**ours, "aws:PrincipalArn": role})
    intruder = f"arn:aws:iam::{ACCOUNT}:role/anyone-with-putevents"
    assert denied(statements, "events:PutEvents", bus, {**ours, "aws:PrincipalArn": intruder})
    # One entry with our source among others is enough to refuse the call.
    mixed = {"events:source": ["my.app", event_source()], "aws:PrincipalArn": intruder}
    assert denied(statements, "events:PutEvents", bus, mixed)
    # Other sources on the bus are not this policy's business.
    other = {"events:source": ["my.app"], "aws:PrincipalArn": intruder}
    assert not denied(statements, "events:PutEvents", bus, other)


def test_the_rules_match_the_source_the_policy_protects():
    cfn = facts.translate(facts.load_template(), {})
    sources = {
        s
        for r in cfn["Resources"].values()
        if r["Type"] == "AWS::Events::Rule"
        for s in r["Properties"].get("EventPattern", {}).get("source", [])
    }
    assert sources == {event_source()}
    (deny,) = bus_policy(cfn, {})
    assert _values(deny["Condition"]["ForAnyValue:StringEquals"]["events:source"]) == [event_source()]
