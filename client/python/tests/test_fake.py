"""lorad_client against a scripted fake daemon: the orderings a real daemon produces only by chance
(pushes that overtake the `subscribed` reply, stray replies, pages, a connection that drops at a
chosen frame).

    PYTHONPATH=client/python python3 -m unittest discover -s client/python/tests -p 'test_fake.py'
"""

import gc
import os
import socket
import struct
import tempfile
import threading
import unittest

import msgpack

import lorad_client
from lorad_client import Busy, Client, LoradConnectionError, TooLarge, Unsupported
from lorad_client.client import _absolute, _override_value

WELCOME = {"type": "welcome", "protocol": 1, "daemon_version": "fake", "features": ["subscribe"]}


def send(sock, msg):
    body = msgpack.packb(msg)
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv(sock):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    head = exactly(4)
    if head is None:
        return None
    body = exactly(struct.unpack(">I", head)[0])
    return None if body is None else msgpack.unpackb(body, raw=False)


class FakeDaemon:
    """Serves one connection after another on a temp socket. ``script(n, sock, frame)`` answers each
    request frame of connection ``n`` (0, 1, ...) and returns False to close that connection."""

    def __init__(self, script, handshake=WELCOME):
        self.dir = tempfile.TemporaryDirectory(prefix="lorad-fake-")
        self.path = os.path.join(self.dir.name, "lorad.sock")
        self.script, self.handshake = script, handshake
        self.requests = []  # (connection, request) in arrival order
        self.hellos = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        n = 0
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                self.hellos.append(recv(sock))
                send(sock, self.handshake)
                while True:
                    frame = recv(sock)
                    if frame is None:
                        break
                    self.requests.append((n, frame["req"]))
                    if self.script(n, sock, frame) is False:
                        break
            n += 1

    def close(self):
        self.listener.close()
        self.dir.cleanup()


def reply(sock, frame, ok):
    send(sock, {"id": frame["id"], "ok": ok})


def push(sock, sub, seq, job=1, body=None):
    send(sock, {"sub": sub, "event": {"seq": seq, "job": job, "at_ms": seq,
                                      "body": body or {"type": "log", "offset": 0, "text": "x"}}})


def record(job, state):
    return {"type": "job", "id": job, "state": state}


class FakeDaemonTests(unittest.TestCase):
    def serve(self, script, handshake=WELCOME):
        fake = FakeDaemon(script, handshake)
        self.addCleanup(fake.close)
        return fake

    def test_hello_and_default_name(self):
        fake = self.serve(lambda n, s, f: reply(s, f, {"type": "done"}))
        c = Client(fake.path)
        self.assertEqual(c.server_info["daemon_version"], "fake")
        self.assertEqual(fake.hellos[0], {"type": "hello", "protocol": 1,
                                          "client": lorad_client.DEFAULT_CLIENT_NAME})

    def test_handshake_refusals_raise_their_code(self):
        for code, cls in (("unsupported", Unsupported), ("busy", Busy)):
            fake = self.serve(lambda n, s, f: None,
                              handshake={"type": "error", "code": code, "message": "no"})
            with self.assertRaises(cls) as e:
                Client(fake.path)
            self.assertEqual(e.exception.code, code)

    def test_no_daemon_is_a_connection_error(self):
        with self.assertRaises(LoradConnectionError):
            Client(os.path.join(tempfile.gettempdir(), "no-such-dir", "lorad.sock"))

    def test_pushes_before_the_subscribed_reply_are_kept(self):
        def script(n, sock, frame):
            if frame["req"]["type"] == "subscribe":
                push(sock, 7, 5)
                push(sock, 99, 6)  # a subscription this client does not have
                push(sock, 7, 6)
                reply(sock, frame, {"type": "subscribed", "sub": 7, "last_seq": 6})
                push(sock, 7, 8)

        c = Client(self.serve(script).path)
        sub = c.subscribe(1, since_seq=4)
        self.assertEqual((sub.id, sub.replay_until), (7, 6))
        self.assertEqual([sub.next_event(timeout=5)["seq"] for _ in range(3)], [5, 6, 8])
        self.assertIsNone(sub.next_event(timeout=0.1))
        self.assertEqual(sub.last_seq, 8)

    def test_replies_match_by_id_and_pushes_wait_in_their_subscription(self):
        def script(n, sock, frame):
            kind = frame["req"]["type"]
            if kind == "subscribe":
                reply(sock, frame, {"type": "subscribed", "sub": 1, "last_seq": 0})
            elif kind == "get":
                push(sock, 1, 10)
                send(sock, {"id": frame["id"] + 1000, "ok": {"type": "done"}})  # nobody's
                push(sock, 1, 11)
                reply(sock, frame, record(1, "running"))

        c = Client(self.serve(script).path)
        sub = c.subscribe(1)
        self.assertEqual(c.get(1), {"id": 1, "state": "running"})
        self.assertEqual([e["seq"] for e in (next(sub), next(sub))], [10, 11])

    def test_list_and_metrics_follow_pages(self):
        def script(n, sock, frame):
            req = frame["req"]
            if req["type"] == "list":
                after = req.get("after") or 0
                if after < 3:
                    reply(sock, frame, {"type": "jobs", "jobs": [record(after + 1, "queued")],
                                        "next": after + 1})
                else:
                    reply(sock, frame, {"type": "jobs", "jobs": []})
            elif req["type"] == "metrics":
                since = req.get("since_step") or 0
                points = [{"step": s} for s in range(since + 1, min(since + 2, 5) + 1)]
                ok = {"type": "metrics", "points": points}
                if points and points[-1]["step"] < 5:
                    ok["next"] = points[-1]["step"]
                reply(sock, frame, ok)

        fake = self.serve(script)
        c = Client(fake.path)
        self.assertEqual([j["id"] for j in c.list(state="queued")], [1, 2, 3])
        self.assertEqual([p["step"] for p in c.metrics(1)], [1, 2, 3, 4, 5])
        self.assertEqual([p["step"] for p in c.metrics(1, since=3)], [4, 5])
        lists = [r for _, r in fake.requests if r["type"] == "list"]
        self.assertEqual([r.get("after") for r in lists], [None, 1, 2, 3])
        self.assertTrue(all(r["state"] == "queued" for r in lists))

    def test_subscription_resubscribes_after_the_newest_seq_received(self):
        def script(n, sock, frame):
            req = frame["req"]
            if req["type"] != "subscribe":
                return reply(sock, frame, {"type": "done"})
            reply(sock, frame, {"type": "subscribed", "sub": n + 1, "last_seq": 0})
            if n == 0:
                push(sock, 1, 3)
                push(sock, 1, 4)
                return False  # the daemon goes away
            push(sock, n + 1, 4)  # a repeat would not be yielded twice
            push(sock, n + 1, 9)

        fake = self.serve(script)
        c = Client(fake.path)
        sub = c.subscribe(1, since_seq=2)
        self.assertEqual([sub.next_event(timeout=5)["seq"] for _ in range(3)], [3, 4, 9])
        self.assertEqual(sub.reconnects, 1)
        subscribes = [(n, r["since_seq"]) for n, r in fake.requests if r["type"] == "subscribe"]
        self.assertEqual(subscribes, [(0, 2), (1, 4)])

    def test_wait_reads_the_record_again_after_a_lost_connection(self):
        def script(n, sock, frame):
            kind = frame["req"]["type"]
            if kind == "status":
                reply(sock, frame, {"type": "status", "last_seq": 10})
            elif kind == "subscribe":
                reply(sock, frame, {"type": "subscribed", "sub": 1, "last_seq": 10})
            elif kind == "get" and n == 0:
                return False  # lost while reading the record
            elif kind == "get":
                reply(sock, frame, record(1, "completed"))
            else:
                reply(sock, frame, {"type": "done"})

        fake = self.serve(script)
        self.assertEqual(Client(fake.path).wait(1, timeout=10)["state"], "completed")
        self.assertEqual([(n, r["since_seq"]) for n, r in fake.requests
                          if r["type"] == "subscribe"], [(0, 10), (1, 10)])

    def test_a_fatal_error_closes_and_the_next_call_reconnects(self):
        def script(n, sock, frame):
            if n == 0:
                send(sock, {"id": 0, "err": {"code": "too_large", "message": "frame too big"}})
                return False
            reply(sock, frame, {"type": "done"})

        c = Client(self.serve(script).path)
        with self.assertRaises(TooLarge):
            c.call({"type": "status"})
        self.assertEqual(c.call({"type": "status"}), {"type": "done"})

    def test_a_dropped_subscription_is_ended_with_the_next_request(self):
        def script(n, sock, frame):
            if frame["req"]["type"] == "subscribe":
                reply(sock, frame, {"type": "subscribed", "sub": 5, "last_seq": 0})
            else:
                reply(sock, frame, {"type": "status", "last_seq": 0})

        fake = self.serve(script)
        c = Client(fake.path)
        c.subscribe(1)  # dropped at once
        gc.collect()
        c.status()
        self.assertEqual([r for _, r in fake.requests][1:],
                         [{"type": "unsubscribe", "sub": 5}, {"type": "status"}])

    def test_submit_sends_absolute_paths_and_string_overrides(self):
        fake = self.serve(lambda n, s, f: reply(s, f, record(1, "queued")))
        c = Client(fake.path)
        c.submit("t", "./model", "/abs/data.jsonl", output_dir="out",
                 overrides={"lr": 0.01, "max_steps": 80, "packing": True, "max_steps_x": None,
                            "target_modules": ["q_proj", "v_proj"]})
        req = fake.requests[0][1]
        self.assertEqual(req["base_model"], os.path.join(os.getcwd(), "model"))
        self.assertEqual(req["dataset"], "/abs/data.jsonl")
        self.assertEqual(req["output_dir"], os.path.join(os.getcwd(), "out"))
        self.assertEqual(req["overrides"], {"lr": "0.01", "max_steps": "80", "packing": "true",
                                            "max_steps_x": "none",
                                            "target_modules": "q_proj,v_proj"})
        self.assertNotIn("dry_run", req)
        self.assertNotIn("name", req)


class HelperTests(unittest.TestCase):
    def test_absolute_is_not_resolved(self):
        cwd = os.getcwd()
        self.assertEqual(_absolute("/x/../y"), "/x/../y")
        self.assertEqual(_absolute("a/../b"), os.path.join(cwd, "a/../b"))
        self.assertEqual(_absolute("./a"), os.path.join(cwd, "a"))
        self.assertEqual(_absolute("."), cwd)

    def test_override_values(self):
        self.assertEqual(_override_value("1e-4"), "1e-4")
        self.assertEqual(_override_value(False), "false")

    def test_default_socket_follows_lorad_schema(self):
        saved = {k: os.environ.get(k) for k in ("LORAD_SOCKET", "XDG_RUNTIME_DIR")}

        def restore():
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        self.addCleanup(restore)
        with tempfile.TemporaryDirectory() as runtime:
            os.environ["LORAD_SOCKET"] = "/x/lorad.sock"
            os.environ["XDG_RUNTIME_DIR"] = runtime
            self.assertEqual(lorad_client.default_socket(), "/x/lorad.sock")
            os.environ["LORAD_SOCKET"] = ""  # empty counts as unset
            self.assertEqual(lorad_client.default_socket(), "/run/lorad/lorad.sock")
            open(os.path.join(runtime, "lorad.sock"), "w").close()
            self.assertEqual(lorad_client.default_socket(), os.path.join(runtime, "lorad.sock"))

    def test_error_classes_cover_the_closed_set(self):
        for code in lorad_client.ERROR_CODES:
            e = lorad_client.LoradError.from_wire({"code": code, "message": "m"})
            self.assertEqual((e.code, e.message, str(e)), (code, "m", f"{code}: m"))
            self.assertIsNot(type(e), lorad_client.LoradError)
        unknown = lorad_client.LoradError.from_wire({"code": "new_code", "message": "m"})
        self.assertIs(type(unknown), lorad_client.LoradError)


if __name__ == "__main__":
    unittest.main()
