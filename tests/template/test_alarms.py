"""Issue 14: every function has an alarm on its Lambda errors and throttles, deployed with it
(same condition), and every alarm notifies the optional topic."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "helper-scripts"))

import template_facts as facts  # noqa: E402


def test_every_function_has_errors_and_throttles_alarms_with_its_condition():
    template = facts.load_template()
    resources = template["Resources"]
    functions = {n: r.get("Condition") for n, r in resources.items() if r["Type"] == "AWS::Serverless::Function"}
    watched = {}
    for name, r in resources.items():
        p = r.get("Properties", {})
        if r["Type"] == "AWS::CloudWatch::Alarm" and p.get("Namespace") == "AWS/Lambda":
            (dimension,) = p["Dimensions"]
            assert dimension["Name"] == "FunctionName", name
            function = dimension["Value"]["Ref"]
            watched.setdefault(function, set()).add(p["MetricName"])
            assert r.get("Condition") == functions[function], f"{name}: not deployed with {function}"
    assert {f: {"Errors", "Throttles"} for f in functions} == watched


def test_every_alarm_notifies_the_optional_topic():
    template = facts.load_template()
    for name, r in template["Resources"].items():
        if r["Type"] != "AWS::CloudWatch::Alarm":
            continue
        for key in ("AlarmActions", "OKActions"):
            assert r["Properties"][key] == {
                "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]
            }, f"{name}.{key}"
