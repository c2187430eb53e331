"""Local run: the webhook path under cargo lambda watch, then the whole chain; see run-local. Everything listens on 127.0.0.1 only and is
stopped on exit, however the script exits."""
import argparse, base64, hashlib, hmac, json, os, pathlib, signal, socket, subprocess, sys, time
import urllib.request, urllib.error

import boto3

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRETS = json.loads((ROOT / "helper-scripts/local-secrets.json").read_text())
REGION = "us-east-1"
SOURCE = "ephemeral-runners.webhook"
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


def create_stack(endpoint):
    """What template.yaml creates for the webhook, named as a local stack would be."""
    kw = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="local", aws_secret_access_key="local")
    events, ddb, ssm, sqs = (boto3.client(n, **kw) for n in ("events", "dynamodb", "ssm", "sqs"))
    bus = "local-jobs"
    events.create_event_bus(Name=bus)
    table = "local-deliveries"
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "delivery_id", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "delivery_id", "KeyType": "HASH"}])
    ddb.update_time_to_live(TableName=table, TimeToLiveSpecification={"AttributeName": "expires_at", "Enabled": True})
    params = {"token": "/ephemeral-runners/local/secret-token", "signing": "/ephemeral-runners/local/signing-token"}
    ssm.put_parameter(Name=params["token"], Value=SECRETS["secret_token"], Type="SecureString")
    ssm.put_parameter(Name=params["signing"], Value=SECRETS["signing_token"], Type="SecureString")

    def queue_for(name, pattern):
        url = sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps(pattern))
        events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": name, "Arn": arn}])
        return url

    # As in the template: dead letters go to their queue. The job-events queue stands in for
    # the router, which is not built yet.
    dlq = queue_for("local-dead-letters", {"source": [SOURCE], "detail-type": ["GitLab Hook Dead Letter"]})
    jobs = queue_for("local-job-events", {"source": [SOURCE], "detail-type": ["GitLab Job Event"]})
    return sqs, bus, table, params, {"GitLab Job Event": jobs, "GitLab Hook Dead Letter": dlq}


def drain(sqs, url):
    out = []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not got:
            return out
        for m in got:
            out.append(json.loads(m["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def resign(env):
    """Fresh timestamp and signature with the local signing token."""
    h = env["headers"]
    ts = str(int(time.time()))
    body = base64.b64decode(env["body"]) if env.get("isBase64Encoded") else env["body"].encode()
    key = base64.b64decode(SECRETS["signing_token"].removeprefix("whsec_"))
    mac = hmac.new(key, f"{h['webhook-id']}.{ts}.".encode() + body, hashlib.sha256).digest()
    h["webhook-timestamp"] = ts
    h["webhook-signature"] = "v1," + base64.b64encode(mac).decode()


def invoke(port, envelope):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/2015-03-31/functions/webhook/invocations",
                                 data=json.dumps(envelope).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"the function failed (HTTP {e.code}): {e.read().decode(errors='replace')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", default=str(ROOT / "events/webhook"),
                    help="directory of API Gateway envelopes (default: events/webhook)")
    ap.add_argument("--check", action="store_true", help="fail unless every outcome matches manifest.json")
    ap.add_argument("--show-logs", action="store_true", help="print the function's JSON log lines at the end")
    ap.add_argument("--hooks", default=str(ROOT / "events/chain/hooks.json"),
                    help="Job Hook bodies (JSON array) for the whole-chain run (default: events/chain/hooks.json)")
    ap.add_argument("--webhook-only", action="store_true", help="skip the whole-chain run")
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
    sqs, bus, table, params, queues = create_stack(endpoint)
    print(f"moto server   {endpoint}  (bus {bus}, table {table})")

    fn_env = {
        "EVENT_BUS_NAME": bus, "DEDUP_TABLE_NAME": table, "AUTH_MODE": "either",
        "SECRET_TOKEN_PARAMETER": params["token"], "SIGNING_TOKEN_PARAMETER": params["signing"],
        "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
    }
    watch = ["cargo", "lambda", "watch", "--invoke-address", "127.0.0.1", "--invoke-port", str(invoke_port),
             "--ignore-changes", "--bin", "webhook"]
    for k, v in fn_env.items():
        watch += ["--env-var", f"{k}={v}"]
    fn_log = open(logs / "webhook.log", "w")
    watcher = start(watch, env=os.environ.copy(), log=fn_log)
    wait_port(invoke_port, watcher, logs / "webhook.log", 120)
    print(f"cargo lambda  127.0.0.1:{invoke_port}  (function logs: {logs / 'webhook.log'})\n")

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

    time.sleep(0.5)
    print("\nOn the bus:")
    seen = {}
    for detail_type, url in queues.items():
        for ev in drain(sqs, url):
            seen[detail_type] = seen.get(detail_type, 0) + 1
            d = ev["detail"]
            if detail_type == "GitLab Job Event":
                print(f"  {detail_type}: job {d['job_id']} {d['status']:8} project {d.get('project_path') or d['project_id']}"
                      f" runner {(d.get('runner') or {}).get('id')} delivery {d['delivery_id']}")
                print(f"    detail: {json.dumps(d, separators=(',', ':'))}")
            else:
                print(f"  {detail_type}: {d['reason']} (body {d['body_bytes']} bytes kept as {d['body_encoding']})")
    if args.check:
        for detail_type in queues:
            want = sum(1 for v in manifest.values() if v.get("expect_on_bus") == detail_type)
            if seen.get(detail_type, 0) != want:
                failures.append(f"{detail_type}: {seen.get(detail_type, 0)} on the bus, expected {want}")
    if args.show_logs:
        fn_log.flush()
        print("\nFunction logs:\n" + (logs / "webhook.log").read_text())
    if not args.webhook_only:
        # The whole chain: the same moto, every function in one process through its real
        # handler (moto cannot call our Lambdas from a rule or a state machine), and a GitLab
        # runner API stand-in on loopback. See tests/e2e/src/chain.rs.
        print(f"\nWhole chain: {args.hooks}\n", flush=True)
        chain = ["cargo", "run", "-q", "--locked", "-p", "e2e-tests", "--bin", "chain-local", "--", "--hooks", args.hooks]
        if args.check:
            chain.append("--check")
        env = {**os.environ, "MOTO_ENDPOINT": endpoint, "RUST_LOG": "error"}
        # The functions' metric lines (EMF JSON on stdout) go to a log file; the trace is shown.
        with open(logs / "chain-metrics.log", "w") as metrics:
            run = subprocess.Popen(chain, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            for line in run.stdout:
                (metrics if line.startswith("{") else sys.stdout).write(line)
            if run.wait() != 0:
                failures.append("whole chain: see above")
        print(f"(metric lines: {logs / 'chain-metrics.log'})")
    if failures:
        print("\nCHECK FAILED:\n  " + "\n  ".join(failures))
        return 1
    if args.check:
        print(f"\ncheck passed: {len(names)} hooks, outcomes as in manifest.json")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    finally:
        stop_all()
