#!/usr/bin/env python3
"""Writes events/webhook/*.json: API Gateway HTTP API (payload v2) envelopes, as Lambda hands
them to the webhook function, one per case, and events/webhook/manifest.json with what each
should yield. Bodies come from the real payloads in crates/core/tests/fixtures/job_hooks.

The local secrets are in helper-scripts/local-secrets.json. Signed samples carry a signature
made when this script ran; `run-local` re-signs those marked "resign" so their timestamps are
fresh (GitLab signatures are only valid for 5 minutes).
"""
import base64, copy, hashlib, hmac, json, pathlib

root = pathlib.Path(__file__).resolve().parent.parent
fixtures = root / "crates/core/tests/fixtures/job_hooks"
out = root / "events/webhook"
secrets = json.loads((root / "helper-scripts/local-secrets.json").read_text())
TOKEN, SIGNING = secrets["secret_token"], secrets["signing_token"]
NOW = 1795460400  # fixed so regenerating gives the same files


def sign(msg_id, ts, body):
    key = base64.b64decode(SIGNING.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body.encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def envelope(headers, body, b64=False):
    return {
        "version": "2.0",
        "routeKey": "POST /webhook",
        "rawPath": "/webhook",
        "rawQueryString": "",
        "headers": {k.lower(): v for k, v in headers.items()},
        "requestContext": {
            "accountId": "123456789012", "apiId": "local", "domainName": "localhost",
            "http": {"method": "POST", "path": "/webhook", "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "GitLab/18.2.0"},
            "requestId": "local", "routeKey": "POST /webhook", "stage": "$default",
            "time": "23/Nov/2026:19:00:00 +0000", "timeEpoch": NOW * 1000,
        },
        "body": base64.b64encode(body.encode()).decode() if b64 else body,
        "isBase64Encoded": b64,
    }


def job_hook(fixture, **changes):
    hook = json.loads((fixtures / fixture).read_text())
    hook.update(changes)
    return json.dumps(hook, indent=2)


base = {"Content-Type": "application/json", "User-Agent": "GitLab/18.2.0", "X-Gitlab-Event": "Job Hook"}
pending = job_hook("gitlab-docs-18.x.json", build_status="pending", runner=None,
                   build_started_at=None, build_finished_at=None, build_duration=None)
running = job_hook("zulip-job-hook-build-failed-2026.json", build_status="running",
                   build_finished_at=None)
finished = job_hook("zulip-job-hook-build-failed-2026.json")
cases = {}


def case(name, env, expect, resign=False, note=""):
    (out / f"{name}.json").write_text(json.dumps(env, indent=2) + "\n")
    cases[name] = {"expect_status": expect[0], "expect_on_bus": expect[1], "resign": resign, "note": note}


token = {**base, "X-Gitlab-Token": TOKEN}
case("01-pending-token", envelope({**token, "Idempotency-Key": "local-delivery-1"}, pending),
     (202, "GitLab Job Event"), note="pending job, runner null, X-Gitlab-Token")
case("02-pending-token-redelivered", envelope({**token, "Idempotency-Key": "local-delivery-1"}, pending),
     (200, None), note="01 sent again (a resend from Recent events): answered 2xx, no second event")


def signed(msg_id, body):
    ts = str(NOW)
    return {**base, "webhook-id": msg_id, "Idempotency-Key": msg_id, "webhook-timestamp": ts,
            "webhook-signature": sign(msg_id, ts, body)}


case("03-running-signed", envelope(signed("msg_local_3", running), running),
     (202, "GitLab Job Event"), resign=True, note="running job with its runner, signing token")
case("04-failed-signed", envelope(signed("msg_local_4", finished), finished),
     (202, "GitLab Job Event"), resign=True, note="finished (failed) job, signing token")
case("05-wrong-token", envelope({**base, "X-Gitlab-Token": "not-the-secret"}, pending),
     (401, None), note="authentication fails: 401 'unauthorized', the log says why")
case("06-push-hook", envelope({**token, "X-Gitlab-Event": "Push Hook"}, '{"object_kind":"push"}'),
     (202, None), note="authentic but not a Job Hook: ignored")
case("07-invalid-json", envelope({**token, "Idempotency-Key": "local-delivery-7"}, '{"object_kind": "build", '),
     (202, "GitLab Hook Dead Letter"), note="authentic, unusable: dead letter on the bus")
missing = json.loads(pending)
del missing["build_id"]
case("08-missing-build-id", envelope(token, json.dumps(missing)),
     (202, "GitLab Hook Dead Letter"), note="authentic, required field missing: dead letter")
case("09-base64-body", envelope({**token, "Idempotency-Key": "local-delivery-9"},
                                job_hook("go-gitlab-job.json"), b64=True),
     (202, "GitLab Job Event"), note="API Gateway passed the body base64-encoded")
case("10-expired-signature", envelope(signed("msg_local_10", finished), finished),
     (401, None), note="signature older than 5 minutes: 401")

(out / "manifest.json").write_text(json.dumps(cases, indent=2) + "\n")
print(f"wrote {len(cases)} events to {out}")
