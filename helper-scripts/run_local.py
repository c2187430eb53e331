"""Local run: the webhook path under cargo lambda watch (each sample sent once, as GitLab sends
it; what the webhook kept on the intake fallback queue drained through the intake-drainer),
then the whole chain; see run-local. Everything listens on 127.0.0.1 only and is stopped on
exit, however the script exits."""
import argparse, base64, hashlib, hmac, json, os, pathlib, signal, socket, subprocess, sys, time
import urllib.request, urllib.error

import boto3

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRETS = json.loads((ROOT / "helper-scripts/local-secrets.json").read_text())
REGION = "us-east-1"
SOURCE = "ephemeral-runners.webhook"
# The template's IntakeFallbackQueue redrive policy.
FALLBACK_MAX_RECEIVES = 10
children = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, env=None, log=None):
    p = subprocess.Popen(cmd, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    children.append(p)
    return p


def stop_all(*_):
    for p in reversed(children):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in children:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    children.clear()


def wait_http(url, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.05)
    sys.exit(f"{url} did not answer within {seconds} s")


def wait_port(port, proc, log_path, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"cargo lambda watch exited ({proc.returncode}); see {log_path}:\n" + log_path.read_text()[-3000:])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    sys.exit(f"cargo lambda watch did not listen on {port} within {seconds} s; see {log_path}")


def wire_bus(events, sqs, bus):
    """The bus and its rules as the template makes them: dead letters go to their queue. The
    job-events queue stands in for the router's rule (the chain run below routes for real).
    Answers {detail-type: queue URL}; safe to call again after the bus was deleted."""
    events.create_event_bus(Name=bus)

    def queue_for(name, pattern):
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps(pattern))
        events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": name, "Arn": arn}])
        return url

    dlq = queue_for("local-dead-letters", {"source": [SOURCE], "detail-type": ["GitLab Hook Dead Letter"]})
    jobs = queue_for("local-job-events", {"source": [SOURCE], "detail-type": ["GitLab Job Event"]})
    return {"GitLab Job Event": jobs, "GitLab Hook Dead Letter": dlq}


def create_stack(endpoint):
    """What template.yaml creates for the webhook and the intake drainer, named as a local
    stack would be."""
    kw = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="local", aws_secret_access_key="local")
    events, ddb, ssm, sqs = (boto3.client(n, **kw) for n in ("events", "dynamodb", "ssm", "sqs"))
    bus = "local-jobs"
    table = "local-deliveries"
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "delivery_id", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "delivery_id", "KeyType": "HASH"}])
    ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"AttributeName": "expires_at", "Enabled": True})
    params = {"token": "/ephemeral-runners/local/secret-token", "signing": "/ephemeral-runners/local/signing-token"}
    ssm.put_parameter(Name=params["token"], Value=SECRETS["secret_token"], Type="SecureString")
    ssm.put_parameter(Name=params["signing"], Value=SECRETS["signing_token"], Type="SecureString")

    queues = wire_bus(events, sqs, bus)
    # The template's IntakeFallbackQueue: where the webhook keeps a hook when the table or the
    # bus fails; the intake drainer forwards it. SQS hands a message the drainer failed out
    # again after the visibility timeout, and after 10 receives files it in the
    # IntakeFallbackDeadLetterQueue.
    params["fallback_dlq"] = sqs.create_queue(QueueName="local-intake-fallback-dead-letters")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=params["fallback_dlq"], AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    params["fallback_queue"] = sqs.create_queue(QueueName="local-intake-fallback", Attributes={
        "VisibilityTimeout": "180",
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(FALLBACK_MAX_RECEIVES)}),
    })["QueueUrl"]
    return sqs, events, bus, table, params, queues


def drain(sqs, url):
    out = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            return out
        for m in got:
            out.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def show_bus(sqs, queues, ids=False):
    """Prints (and takes off) what reached the bus; answers the count per detail-type, or the
    delivery ids of the job events (`ids`)."""
    print("\nOn the bus:")
    seen, delivery_ids = {}, []
    for detail_type, url in queues.items():
        for ev in drain(sqs, url):
            seen[detail_type] = seen.get(detail_type, 0) + 1
            d = ev["detail"]
            if detail_type == "GitLab Job Event":
                delivery_ids.append(d["delivery_id"])
                print(f"  {detail_type}: job {d['job_id']} {d['status']:8} project {d.get('project_path') or d['project_id']}"
                      f" runner {(d.get('runner') or {}).get('id')} delivery {d['delivery_id']}")
                print(f"    detail: {json.dumps(d, separators=(',', ':'))}")
            else:
                print(f"  {detail_type}: {d['reason']} (body {d['body_bytes']} bytes kept as {d['body_encoding']})")
    if not seen:
        print("  nothing")
    return delivery_ids if ids else seen


def resign(env):
    """Fresh timestamp and signature with the local signing token."""
    h = env["headers"]
    ts = str(int(time.time()))
    body = base64.b64decode(env["body"]) if env.get("isBase64Encoded") else env["body"].encode()
    key = base64.b64decode(SECRETS["signing_token"].removeprefix("whsec_"))
    mac = hmac.new(key, f"{h['webhook-id']}.{ts}.".encode() + body, hashlib.sha256).digest()
    h["webhook-timestamp"] = ts
    h["webhook-signature"] = "v1," + base64.b64encode(mac).decode()


def invoke(port, envelope, function="webhook"):
    """One invoke through cargo lambda watch, which serves every binary of the webhook package
    by its name (webhook, intake-drainer). Each hook is sent once: GitLab does not resend a
    hook answered 5xx."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/2015-03-31/functions/{function}/invocations",
                                 data=json.dumps(envelope).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"{function} failed (HTTP {e.code}): {e.read().decode(errors='replace')}")


def sqs_record(m, queue_url):
    """A received message as the event source mapping hands it to Lambda (one SqsEvent record)."""
    return {"messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
            "attributes": m.get("Attributes", {}), "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
            "eventSource": "aws:sqs", "awsRegion": REGION,
            "eventSourceARN": f"arn:aws:sqs:{REGION}:123456789012:{queue_url.rsplit('/', 1)[-1]}"}


def describe_queued(body):
    try:
        hook = json.loads(body)
        d = hook["detail"]
        if hook["kind"] == "job_event":
            return d["delivery_id"], f"job {d['job_id']} {d['status']}"
        return d["delivery_id"], f"dead letter: {d['reason']}"
    except (ValueError, KeyError, TypeError):
        return "?", "not a queued hook"


def drain_fallback(sqs, params, port):
    """The fallback queue's event source, as Lambda runs it: batches of up to 10 messages to the
    intake-drainer; the messages its batch response does not list are deleted, the listed ones
    handed out again in the next round, until the queue is empty (after 10 receives SQS files
    a message in the dead-letter queue). Prints each drained hook; answers (drained, dead)."""
    queue, drained, retries = params["fallback_queue"], 0, 0
    print("\nFallback queue (drained through intake-drainer):")
    while True:
        received, failed = 0, []
        while True:
            got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                      VisibilityTimeout=600, MessageSystemAttributeNames=["All"]).get("Messages", [])
            if not got:
                break
            received += len(got)
            reply = invoke(port, {"Records": [sqs_record(m, queue) for m in got]}, "intake-drainer")
            failed_ids = {f["itemIdentifier"] for f in reply.get("batchItemFailures", [])}
            for m in got:
                delivery, what = describe_queued(m["Body"])
                n = m.get("Attributes", {}).get("ApproximateReceiveCount", "1")
                if m["MessageId"] in failed_ids:
                    retries += 1
                    failed.append(m["ReceiptHandle"])
                    print(f"  delivery {delivery} ({what}): not forwarded yet (receive {n} of {FALLBACK_MAX_RECEIVES}), left on the queue")
                else:
                    sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
                    drained += 1
                    print(f"  delivery {delivery} ({what}): drained (receive {n})")
        for handle in failed:
            sqs.change_message_visibility(QueueUrl=queue, ReceiptHandle=handle, VisibilityTimeout=0)
        if received == 0:
            break
    dead = drain(sqs, params["fallback_dlq"])
    for body in dead:
        delivery, what = describe_queued(json.dumps(body))
        print(f"  delivery {delivery} ({what}): failed {FALLBACK_MAX_RECEIVES} receives, in the drainer's dead-letter queue")
    if drained + retries + len(dead) == 0:
        print("  empty: nothing was queued")
    return drained, len(dead)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", default=str(ROOT / "events/webhook"),
                    help="directory of API Gateway envelopes (default: events/webhook)")
    ap.add_argument("--check", action="store_true", help="fail unless every outcome matches manifest.json")
    ap.add_argument("--show-logs", action="store_true", help="print the function's JSON log lines at the end")
    ap.add_argument("--hooks", default=str(ROOT / "events/chain/hooks.json"),
                    help="Job Hook bodies (JSON array) for the whole-chain run (default: events/chain/hooks.json)")
    ap.add_argument("--webhook-only", action="store_true", help="skip the whole-chain run")
    ap.add_argument("--lambda-only", action="store_true",
                    help="run the chain as a stack without EC2 settings: DefaultExecutor LAMBDA, no "
                         "RunnerApiTokenParameterName, GitLabUrl or SubnetIds (with --check: no "
                         "teardown step and no reaper pass may fail)")
    args = ap.parse_args()
    events_dir = pathlib.Path(args.events)
    manifest = json.loads((events_dir / "manifest.json").read_text()) if (events_dir / "manifest.json").exists() else {}

    logs = ROOT / "target" / "run-local"
    logs.mkdir(parents=True, exist_ok=True)
    moto_port, invoke_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{moto_port}"
    start(["moto_server", "-H", "127.0.0.1", "-p", str(moto_port)],
          env={**os.environ, "MOTO_PORT": str(moto_port)}, log=open(logs / "moto.log", "w"))
    wait_http(f"{endpoint}/moto-api/data.json", 30)
    sqs, events, bus, table, params, queues = create_stack(endpoint)
    print(f"moto server   {endpoint}  (bus {bus}, table {table})")

    fn_env = {
        "EVENT_BUS_NAME": bus, "DEDUP_TABLE_NAME": table, "AUTH_MODE": "either",
        "SECRET_TOKEN_PARAMETER": params["token"], "SIGNING_TOKEN_PARAMETER": params["signing"],
        "FALLBACK_QUEUE_URL": params["fallback_queue"], "DEDUP_TTL_SECONDS": "259200",
        "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
    }
    # Every binary of the webhook package, invoked by name: the webhook and the intake drainer
    # (which reads EVENT_BUS_NAME, DEDUP_TABLE_NAME and DEDUP_TTL_SECONDS of these, as the
    # template gives it).
    watch = ["cargo", "lambda", "watch", "--invoke-address", "127.0.0.1", "--invoke-port", str(invoke_port),
             "--ignore-changes", "-p", "webhook"]
    for k, v in fn_env.items():
        watch += ["--env-var", f"{k}={v}"]
    fn_log = open(logs / "webhook.log", "w")
    watcher = start(watch, env=os.environ.copy(), log=fn_log)
    wait_port(invoke_port, watcher, logs / "webhook.log", 120)
    print(f"cargo lambda  127.0.0.1:{invoke_port}  (webhook and intake-drainer logs: {logs / 'webhook.log'})\n")

    failures = []
    names = sorted(p.stem for p in events_dir.glob("*.json") if p.name != "manifest.json")
    for name in names:
        envelope = json.loads((events_dir / f"{name}.json").read_text())
        expect = manifest.get(name, {})
        if expect.get("resign"):
            resign(envelope)
        t0 = time.perf_counter()
        reply = invoke(invoke_port, envelope)
        ms = (time.perf_counter() - t0) * 1000
        status = reply.get("statusCode")
        mark = ""
        if "expect_status" in expect:
            ok = status == expect["expect_status"]
            mark = "ok  " if ok else f"FAIL (expected {expect['expect_status']})"
            if not ok:
                failures.append(f"{name}: status {status}, expected {expect['expect_status']}")
        print(f"{name:32} {status} {mark:6} {ms:7.1f} ms  {reply.get('body', '')}")

    # What the webhook kept on the fallback queue (nothing, unless the table or the bus failed).
    _, dead = drain_fallback(sqs, params, invoke_port)
    if args.check and dead:
        failures.append(f"{dead} queued hooks in the drainer's dead-letter queue")
    time.sleep(0.5)
    seen = show_bus(sqs, queues)
    if args.check:
        for detail_type in queues:
            want = sum(1 for v in manifest.values() if v.get("expect_on_bus") == detail_type)
            if seen.get(detail_type, 0) != want:
                failures.append(f"{detail_type}: {seen.get(detail_type, 0)} on the bus, expected {want}")

    # The intake fallback at work: the bus is gone for one hook (deleted in moto); the webhook
    # keeps the hook on the fallback queue and answers 202; once the bus is back, the drainer
    # forwards it, once.
    sample = events_dir / "01-pending-token.json"
    if sample.exists():
        print("\nIntake fallback: 01-pending-token again, under a new delivery id, while the bus is deleted")
        envelope = json.loads(sample.read_text())
        delivery = "local-delivery-bus-outage"
        envelope["headers"] = {k: v for k, v in envelope["headers"].items() if k.lower() != "idempotency-key"}
        envelope["headers"]["idempotency-key"] = delivery
        events.delete_event_bus(Name=bus)
        reply = invoke(invoke_port, envelope)
        queues = wire_bus(events, sqs, bus)
        status, text = reply.get("statusCode"), reply.get("body", "")
        print(f"  webhook answered {status} {text}")
        print("  the bus is back")
        drained, dead = drain_fallback(sqs, params, invoke_port)
        seen_ids = show_bus(sqs, queues, ids=True)
        if args.check:
            if status != 202 or not text.startswith("accepted and queued"):
                failures.append(f"bus outage: the webhook answered {status} {text!r}, expected 202 'accepted and queued'")
            if (drained, dead) != (1, 0) or seen_ids.count(delivery) != 1 or len(seen_ids) != 1:
                failures.append(f"bus outage: {drained} drained, {dead} dead letters, on the bus {seen_ids}; expected {delivery} once")
    if args.show_logs:
        fn_log.flush()
        print("\nFunction logs:\n" + (logs / "webhook.log").read_text())
    if not args.webhook_only:
        # The whole chain: the same moto, every function in one process through its real
        # handler (moto cannot call our Lambdas from a rule or a state machine), and a GitLab
        # runner API stand-in on loopback. See tests/e2e/src/chain.rs.
        print(f"\nWhole chain{' (Lambda-only stack)' if args.lambda_only else ''}: {args.hooks}\n", flush=True)
        chain = ["cargo", "run", "-q", "--locked", "-p", "e2e-tests", "--bin", "chain-local", "--", "--hooks", args.hooks]
        if args.check:
            chain.append("--check")
        if args.lambda_only:
            chain.append("--lambda-only")
        env = {**os.environ, "MOTO_ENDPOINT": endpoint, "RUST_LOG": "error"}
        # The functions' metric lines (EMF JSON on stdout) go to a log file; the trace is shown.
        with open(logs / "chain-metrics.log", "w") as metrics:
            run = subprocess.Popen(chain, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            for line in run.stdout:
                (metrics if line.startswith("{") else sys.stdout).write(line)
            if run.wait() != 0:
                failures.append("whole chain: see above")
        print(f"(metric lines: {logs / 'chain-metrics.log'})")
    if not args.webhook_only and not args.lambda_only:
        # A lost pending hook, reconciled: GitLab (a stand-in that holds jobs as GitLab does)
        # never resends it; the reconciler finds the job pending and provisions it. See
        # tests/e2e/src/bin/reconcile-local.rs.
        print("\nA lost hook, reconciled (three jobs; the third one's pending hook never arrives)\n", flush=True)
        demo = ["cargo", "run", "-q", "--locked", "-p", "e2e-tests", "--bin", "reconcile-local", "--"]
        if args.check:
            demo.append("--check")
        with open(logs / "reconcile-metrics.log", "w") as metrics:
            run = subprocess.Popen(demo, env={**os.environ, "RUST_LOG": "error"}, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, text=True)
            for line in run.stdout:
                (metrics if line.startswith("{") else sys.stdout).write(line)
            if run.wait() != 0:
                failures.append("lost hook reconciled: see above")
    if failures:
        print("\nCHECK FAILED:\n  " + "\n  ".join(failures))
        return 1
    if args.check:
        print(f"\ncheck passed: {len(names)} hooks, outcomes as in manifest.json"
              + ("; the hook sent while the bus was deleted was queued and drained once" if sample.exists() else ""))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        stop_all()
