"""lorad_client against a real daemon.

    python3 client/python/tests/test_client.py SOCKET MODEL DATA

(or $LORAD_TEST_SOCKET, $LORAD_TEST_MODEL, $LORAD_TEST_DATA). MODEL is a tiny model (`lorad
make-tiny-model DIR`), DATA a JSONL dataset of ~64 `{"text": ...}` lines. tests/tests/python.rs runs
it with PYTHONPATH=client/python against a `TestDaemon` and acts as its restart coordinator: when this
script prints `RESTART stop PID` or `RESTART kill9 PID` (PID: the running job's worker), the
coordinator stops the daemon that way, waits for that worker to exit, starts the daemon again on the
same socket and state dir, and writes a line to this script's stdin. Run by hand, do the same in
another terminal and press Enter. Every check prints `ok NAME`; the first failure prints its
traceback and exits 1.
"""

import os
import sys
import time
import traceback

import lorad_client
from lorad_client import Client, InvalidArgument, InvalidState, LoradError, NotFound

# The demo job (daemon/src/demo.rs DEMO_OVERRIDES): the tiny model learns the dataset in seconds.
# Values of other types than str are converted as loractl --set would read them.
FAST = {
    "lr": 0.01,
    "max_steps": 80,
    "batch_size": 8,
    "warmup_steps": 0,
    "schedule": "constant",
    "lora_dropout": 0,
    "max_seq_len": 64,
}
# A job that runs until cancelled.
ENDLESS = dict(FAST, max_steps=1000000)
# Long enough for a job on the tiny model, short enough to fail rather than hang.
JOB_TIMEOUT = 180.0
EVENT_TIMEOUT = 120.0


def say(*words):
    print(*words, flush=True)


def test_handshake_and_status(c, model, data):
    info = c.server_info
    assert info["type"] == "welcome" and info["protocol"] == lorad_client.PROTOCOL_VERSION, info
    assert "subscribe" in info["features"], info
    st = c.status()
    assert "type" not in st, st
    assert st["protocol"] == 1 and st["pid"] > 0, st
    assert isinstance(st["last_seq"], int) and st["last_seq"] >= 0, st
    assert any(d["name"] == "cpu" for d in st["devices"]), st["devices"]


def test_templates(c, model, data):
    templates = {t["name"]: t for t in c.templates()}
    assert "basic-fine-tune" in templates, sorted(templates)
    settings = templates["basic-fine-tune"]["settings"]
    assert settings["lora_r"] >= 1 and "lr" in settings, settings


def test_errors_carry_the_wire_code(c, model, data):
    try:
        c.submit("no-such-template", model, data)
    except InvalidArgument as e:
        assert e.code == "invalid_argument" and isinstance(e, LoradError), e
        assert "no-such-template" in e.message, e.message
    else:
        raise AssertionError("an unknown template was accepted")
    try:
        c.submit("basic-fine-tune", model, data, overrides={"lr": "fast"})
    except LoradError as e:
        assert e.code == "invalid_argument" and "lr" in e.message, e
    else:
        raise AssertionError("lr=fast was accepted")
    try:
        c.get(10**12)
    except NotFound as e:
        assert e.code == "not_found", e
    else:
        raise AssertionError("a job that does not exist was found")
    # A request of an unknown type is refused for its id; the connection stays usable.
    try:
        c.call({"type": "no_such_request"})
    except LoradError as e:
        assert e.code == "invalid_argument", e
    else:
        raise AssertionError("an unknown request was answered")
    assert c.status()["protocol"] == 1


def test_dry_run(c, model, data):
    before = len(c.list())
    estimate = c.submit("basic-fine-tune", model, data, overrides=FAST, dry_run=True)
    assert estimate["memory_estimate"] > 0 and estimate["memory"], estimate
    assert estimate["examples"] > 0, estimate
    assert len(c.list()) == before, "a dry run queued nothing"


def test_submit_wait_and_read_back(c, model, data):
    # Relative paths are made absolute here, as loractl does: the daemon does not share our cwd.
    cwd = os.getcwd()
    os.chdir(os.path.dirname(data))
    try:
        job = c.submit("basic-fine-tune", model, "./" + os.path.basename(data), name="py-fast",
                       overrides=FAST)
    finally:
        os.chdir(cwd)
    assert job["dataset"] == data and job["base_model"] == model, job
    assert job["name"] == "py-fast" and job["state"] == "queued", job
    assert job["overrides"]["max_steps"] == "80" and job["overrides"]["lr"] == "0.01", job
    assert job["settings"]["max_steps"] == 80, job["settings"]

    final = c.wait(job["id"], timeout=JOB_TIMEOUT)
    assert final["state"] == "completed", final
    assert final["adapter_dir"] and os.path.isdir(final["adapter_dir"]), final
    assert c.get(job["id"]) == final and c.show(job["id"]) == final
    assert c.wait(job["id"], timeout=5)["state"] == "completed", "an ended job is answered at once"

    ids = [j["id"] for j in c.list()]
    assert job["id"] in ids and ids == sorted(ids), ids
    assert job["id"] in [j["id"] for j in c.list(state="completed")]
    assert job["id"] not in [j["id"] for j in c.list(state="queued")]
    assert job["id"] in [j["id"] for j in c.list(all=True)], "root is admin of a user daemon"

    points = c.metrics(job["id"])
    assert [p["step"] for p in points] == list(range(1, 81)), [p["step"] for p in points]
    assert all(p["loss"] > 0 for p in points), points[:3]
    assert [p["step"] for p in c.metrics(job["id"], since=70)] == list(range(71, 81))

    first = c.logs(job["id"], max_bytes=16)
    assert first["offset"] == 0 and 0 < first["next_offset"] <= 16 < first["size"], first
    text = c.log_text(job["id"])
    assert len(text.encode()) == first["size"] and text.startswith(first["text"]), first
    assert [k["step"] for k in c.checkpoints(job["id"])][-1:] == [80]


def test_cancel_pause_resume_retry(c, model, data):
    job = c.submit("basic-fine-tune", model, data, overrides=ENDLESS)
    try:
        c.wait(job["id"], timeout=0.5)
    except TimeoutError:
        pass
    else:
        raise AssertionError("wait returned before an endless job ended")
    cancelled = c.cancel(job["id"])
    assert cancelled["state"] == "cancelled" and "cancelled" in cancelled["reason"], cancelled
    assert c.wait(job["id"], timeout=JOB_TIMEOUT)["state"] == "cancelled"
    try:
        c.cancel(job["id"])
    except InvalidState as e:
        assert e.code == "invalid_state", e
    else:
        raise AssertionError("a cancelled job was cancelled again")
    assert c.retry(job["id"])["state"] == "queued"
    paused = c.pause(job["id"])
    assert paused["state"] == "paused", paused
    assert c.resume(job["id"])["state"] == "queued"
    assert c.cancel(job["id"])["state"] == "cancelled"


def restart_daemon(how, worker):
    """Asks the coordinator to restart the daemon and waits until it has."""
    say("RESTART", how, worker)
    line = sys.stdin.readline()
    assert line, "the coordinator closed stdin instead of restarting the daemon"


def test_subscription_survives_daemon_restarts(c, model, data):
    job = c.submit("basic-fine-tune", model, data, name="py-endless", overrides=ENDLESS)
    jid = job["id"]
    sub = c.subscribe(jid, since_seq=0)
    seen = []  # what the reconnecting subscription yielded, in order
    plan = ["stop", "kill9", "cancel"]  # what to do after each run of fresh metric points
    restarts = 0
    fresh = 0  # metric points seen since the last step of the plan (and since its reconnection)
    while True:
        event = sub.next_event(timeout=EVENT_TIMEOUT)
        assert event is not None, f"no event within {EVENT_TIMEOUT} s; saw {seen[-5:]}"
        seen.append(event)
        body = event["body"]
        assert event["job"] == jid, event
        # Count only live points of the current daemon: after a restart, the old connection may still
        # hold events, and the new subscription first replays what the old daemon committed last.
        live = sub.reconnects == restarts and event["seq"] > sub.replay_until
        if body["type"] == "metrics" and live:
            fresh += 1
        if body["type"] == "state_changed" and body["to"] == "cancelled":
            break
        if fresh < 5 or not plan:
            continue
        fresh = 0
        step = plan.pop(0)
        # Calls in the middle of a subscription: their replies interleave with its pushes.
        record = c.get(jid)
        assert record["state"] == "running", record
        if step == "cancel":
            assert c.cancel(jid)["state"] == "cancelled"
        else:
            restart_daemon(step, record["worker_pid"])
            restarts += 1
    assert not plan, plan
    assert sub.reconnects == 2, f"{sub.reconnects} reconnections, expected 2"

    seqs = [e["seq"] for e in seen]
    assert seqs == sorted(set(seqs)), f"seqs not strictly increasing: {seqs}"
    assert sub.last_seq == seqs[-1], (sub.last_seq, seqs[-1])
    kinds = {e["body"]["type"] for e in seen}
    assert {"state_changed", "metrics"} <= kinds, kinds
    states = [e["body"]["to"] for e in seen if e["body"]["type"] == "state_changed"]
    say(f"  job {jid}: {len(seen)} events (seq {seqs[0]}..{seqs[-1]}) across {sub.reconnects} "
        f"reconnections; states {' '.join(states)}")

    # The journal's whole history of the job is exactly what the subscription yielded across the two
    # restarts: nothing lost, nothing twice.
    replay = []
    with c.subscribe(jid, since_seq=0) as again:
        while not replay or replay[-1]["seq"] < seqs[-1]:
            event = again.next_event(timeout=EVENT_TIMEOUT)
            assert event is not None, f"replay stopped at {replay[-1:]}"
            replay.append(event)
    assert [e["seq"] for e in replay] == seqs, ([e["seq"] for e in replay], seqs)
    assert replay == seen, "the replayed events differ from the ones seen live"
    sub.close()
    assert sub.next_event(timeout=0.1) is None, "a closed subscription yields nothing"
    # The daemon restarted under the client: its calls work on the new connection.
    assert c.get(jid)["state"] == "cancelled"


TESTS = [
    test_handshake_and_status,
    test_templates,
    test_errors_carry_the_wire_code,
    test_dry_run,
    test_submit_wait_and_read_back,
    test_cancel_pause_resume_retry,
    test_subscription_survives_daemon_restarts,
]


def main(argv):
    args = argv[1:] or [os.environ.get(k, "") for k in
                        ("LORAD_TEST_SOCKET", "LORAD_TEST_MODEL", "LORAD_TEST_DATA")]
    if len(args) != 3 or not all(args):
        print(__doc__, file=sys.stderr)
        return 2
    socket_path, model, data = args[0], os.path.abspath(args[1]), os.path.abspath(args[2])
    c = Client(socket_path, client_name="test_client.py")
    for test in TESTS:
        started = time.monotonic()
        try:
            test(c, model, data)
        except Exception:
            say(f"FAILED {test.__name__}")
            traceback.print_exc()
            sys.stdout.flush()
            return 1
        say(f"ok {test.__name__} ({time.monotonic() - started:.1f} s)")
    say("all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
