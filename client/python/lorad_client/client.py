"""The synchronous client: one connection, the typed calls, and the routing of replies and pushes."""

import os
import time
import weakref

from .connection import Connection, default_socket
from .errors import LoradConnectionError, LoradError, NotFound, ProtocolError
from .subscription import Subscription

__all__ = ["Client", "TERMINAL_STATES", "DEFAULT_CLIENT_NAME"]

__version__ = "0.1.0"

#: The name sent in hello (the daemon logs it).
DEFAULT_CLIENT_NAME = f"lorad_client.py/{__version__}"

#: Job states after which nothing more happens unless someone retries the job.
TERMINAL_STATES = frozenset(["completed", "failed", "cancelled"])


def _absolute(path):
    """``path`` made absolute against the current directory, as loractl does (not resolved: the
    daemon checks the file, and opens it as the submitting user)."""
    path = os.fspath(path)
    if os.path.isabs(path):
        return path
    while path.startswith("./"):
        path = path[2:].lstrip("/")
    return os.path.join(os.getcwd(), path) if path not in ("", ".") else os.getcwd()


def _override_value(value):
    """An override in ``loractl --set`` syntax: lists comma-separated, ``None`` as ``none``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class Client:
    """A connection to lorad; see the ``lorad_client`` module docs for an example.

    ``socket_path`` defaults to ``default_socket()`` (``$LORAD_SOCKET``, else the user daemon's socket
    if it exists, else the system socket). Connecting performs the handshake; ``server_info`` is the
    daemon's welcome. Records, statuses and events are dicts in the wire's shape (PROTOCOL.md, "Data
    types"); answers lose only their ``type`` tag.

    If the connection drops, a call raises ``LoradConnectionError`` and the next call connects again;
    subscriptions reconnect by themselves. Not thread-safe: use one ``Client`` per thread.
    """

    def __init__(self, socket_path=None, client_name=DEFAULT_CLIENT_NAME):
        self.socket_path = os.fspath(socket_path) if socket_path is not None else default_socket()
        self.client_name = client_name
        self._conn = None
        self._next_id = 1
        self._subs = {}  # sub id -> weakref to its Subscription, on the current connection
        self._subscribing = 0  # subscribe requests in flight on the current connection
        self._early = {}  # sub id -> pushes that arrived before their `subscribed` reply
        self._stale_subs = []  # sub ids to unsubscribe with the next request
        self.connect()

    # -- connection ------------------------------------------------------------------------------

    def connect(self):
        """(Re)connects and performs the handshake. Subscriptions move to the new connection the next
        time they are read."""
        self.close()
        self._conn = Connection(self.socket_path, self.client_name)
        self._subs.clear()
        self._early.clear()
        self._stale_subs.clear()
        self._subscribing = 0

    @property
    def server_info(self):
        """The daemon's welcome: ``protocol``, ``daemon_version`` and ``features``."""
        return self._conn.welcome if self._conn is not None else None

    def close(self):
        """Closes the connection; its subscriptions reconnect if read again."""
        if self._conn is not None:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests and routing --------------------------------------------------------------------

    def call(self, req, timeout=None):
        """Sends the request ``req`` (a dict with ``type``) and returns the daemon's answer (the
        ``ok`` map, with its ``type``). Raises ``LoradError`` for an error answer, ``TimeoutError`` if
        none came within ``timeout`` seconds. Prefer the typed methods; use ``subscribe`` for
        events."""
        return self._call(req, timeout)[0]

    def _call(self, req, timeout=None):
        """``call``, and for a ``subscribe`` the pushes of the new subscription that overtook its
        reply (in a list; empty otherwise)."""
        if self._conn is None or self._conn.closed:
            self.connect()
        conn = self._conn
        self._send_stale_unsubscribes(conn)
        rid = self._next_id
        self._next_id += 1
        conn.send({"id": rid, "req": req})
        subscribing = req.get("type") == "subscribe"
        if subscribing:
            self._subscribing += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                frame = conn.recv(timeout=left)
                if frame is None:
                    raise TimeoutError(f"lorad did not answer {req.get('type')} within {timeout} s")
                reply = self._route(frame)
                if reply is None or reply.get("id") != rid:
                    continue
                if reply.get("err") is not None:
                    raise LoradError.from_wire(reply["err"])
                ok = reply.get("ok")
                if not isinstance(ok, dict):
                    raise ProtocolError(f"a reply with neither ok nor err: {reply!r}")
                early = self._early.pop(ok.get("sub"), []) if subscribing else []
                return ok, early
        finally:
            if subscribing and conn is self._conn:
                self._subscribing -= 1
                if self._subscribing == 0:
                    self._early.clear()  # pushes of subscriptions that ended, not of a new one

    def _route(self, frame):
        """Hands a push to its subscription; returns a reply (``None`` for a push)."""
        if not isinstance(frame, dict):
            raise ProtocolError(f"lorad sent a frame that is not a map: {frame!r}")
        if "id" in frame:
            if frame["id"] == 0 and frame.get("err") is not None:
                # The daemon could not read a frame of this connection and closes it.
                self._conn.close()
                raise LoradError.from_wire(frame["err"])
            return frame
        sub, event = frame.get("sub"), frame.get("event")
        if sub is None or not isinstance(event, dict):
            raise ProtocolError(f"lorad sent a frame that is neither a reply nor a push: {frame!r}")
        ref = self._subs.get(sub)
        target = ref() if ref is not None else None
        if target is not None:
            target._push(event)
        elif self._subscribing:
            # Replay starts as soon as the subscription exists, so its first pushes may overtake
            # the `subscribed` reply: keep them for it.
            self._early.setdefault(sub, []).append(event)
        return None

    def _subscribe(self, subscription, since_seq):
        """Subscribes ``subscription`` on the current connection; returns (sub, last_seq, conn)."""
        ok, early = self._call({"type": "subscribe", "job": subscription.job,
                                "since_seq": since_seq})
        if ok.get("type") != "subscribed":
            raise ProtocolError(f"expected a subscribed answer to subscribe, got {ok!r}")
        sub = ok["sub"]
        self._subs[sub] = weakref.ref(subscription)
        for event in early:
            subscription._push(event)
        return sub, ok.get("last_seq", 0), self._conn

    def _forget_sub(self, conn, sub):
        """A subscription was dropped unclosed: unsubscribe with the next request."""
        if conn is self._conn and not conn.closed:
            self._subs.pop(sub, None)
            self._stale_subs.append(sub)

    def _send_stale_unsubscribes(self, conn):
        # Their replies carry ids nobody waits for; call() skips them.
        while self._stale_subs:
            sub = self._stale_subs.pop()
            conn.send({"id": self._next_id, "req": {"type": "unsubscribe", "sub": sub}})
            self._next_id += 1

    def _unsubscribe(self, conn, sub):
        if conn is not self._conn or conn is None or conn.closed:
            return  # the connection that had it is gone, and the subscription with it
        self._subs.pop(sub, None)
        try:
            self.call({"type": "unsubscribe", "sub": sub})
        except (NotFound, LoradConnectionError):
            pass

    def _answer(self, req, expected):
        ok = self.call(req)
        if ok.get("type") != expected:
            raise ProtocolError(f"expected a {expected} answer to {req['type']}, got {ok!r}")
        return ok

    def _record(self, req, expected="job"):
        ok = dict(self._answer(req, expected))
        ok.pop("type", None)
        return ok

    # -- the requests ----------------------------------------------------------------------------

    def status(self):
        """Daemon version, uptime, devices, queue, plugins and ``last_seq`` (the newest event)."""
        return self._record({"type": "status"}, "status")

    def templates(self):
        """Every template: a list of ``{"name", "description", "settings"}``."""
        return self._answer({"type": "templates"}, "templates")["templates"]

    def submit(self, template, base_model, dataset, name=None, output_dir=None, priority=0,
               overrides=None, dry_run=False):
        """Queues a job and returns its record. Paths are made absolute against the current
        directory (the daemon does not share it). ``overrides`` maps setting names to values in
        ``loractl --set`` syntax; non-strings are converted (lists comma-separated, ``None`` to
        ``none``, booleans to ``true``/``false``). With ``dry_run`` nothing is queued and the answer
        is the estimate (``memory_estimate``, ``memory``, ``examples``, ``devices``)."""
        req = {
            "type": "submit",
            "template": template,
            "base_model": _absolute(base_model),
            "dataset": _absolute(dataset),
            "priority": int(priority),
            "overrides": {str(k): _override_value(v) for k, v in (overrides or {}).items()},
        }
        if name is not None:
            req["name"] = name
        if output_dir is not None:
            req["output_dir"] = _absolute(output_dir)
        if dry_run:
            req["dry_run"] = True
            return self._record(req, "estimate")
        return self._record(req)

    def list(self, state=None, all=False):
        """The caller's jobs in id order (every user's with ``all``, admin only), optionally only
        those in ``state``; follows the daemon's pages."""
        jobs, after = [], None
        while True:
            req = {"type": "list", "state": state, "all": bool(all)}
            if after is not None:
                req["after"] = after
            ok = self._answer(req, "jobs")
            jobs.extend(ok.get("jobs") or [])
            nxt = ok.get("next")
            # A daemon must move forward; stop rather than loop if it does not.
            if nxt is None or (after is not None and nxt <= after):
                return jobs
            after = nxt

    def get(self, job):
        """One job's record."""
        return self._record({"type": "get", "job": job})

    show = get

    def cancel(self, job):
        """Stops a queued, initializing, running or paused job; returns its record afterwards."""
        return self._record({"type": "cancel", "job": job})

    def pause(self, job):
        """Holds a queued job, or checkpoints and stops a running one; returns its record."""
        return self._record({"type": "pause", "job": job})

    def resume(self, job, checkpoint=None):
        """Puts a paused job back in the queue, from ``checkpoint`` (``step-N``) or the newest."""
        return self._record({"type": "resume", "job": job, "checkpoint": checkpoint})

    def retry(self, job):
        """Puts a failed or cancelled job back in the queue (from its newest checkpoint)."""
        return self._record({"type": "retry", "job": job})

    def set_priority(self, job, priority):
        """Changes the priority of a job that has not ended (higher runs first)."""
        return self._record({"type": "set_priority", "job": job, "priority": int(priority)})

    def checkpoints(self, job):
        """A job's complete checkpoints, oldest first: ``{"name", "step", "path", "created_at_ms"}``."""
        return self._answer({"type": "checkpoints", "job": job}, "checkpoints")["checkpoints"]

    def export(self, job, format, out, checkpoint=None):
        """Exports the job's final adapter (or ``checkpoint``) as ``format`` (``peft``, ``merged``,
        ``zip``, or a plugin's) to ``out``, made absolute; it must not exist. Returns when the export
        is written: ``{"format", "out", "checkpoint", "files", "elapsed_s"}``."""
        return self._record({"type": "export", "job": job, "format": format, "out": _absolute(out),
                             "checkpoint": checkpoint}, "exported")

    def metrics(self, job, since=None):
        """A job's metric points in step order, only those with ``step > since`` when given;
        follows the daemon's pages."""
        points = []
        while True:
            ok = self._answer({"type": "metrics", "job": job, "since_step": since}, "metrics")
            points.extend(ok.get("points") or [])
            nxt = ok.get("next")
            if nxt is None or (since is not None and nxt <= since):
                return points
            since = nxt

    def logs(self, job, offset=0, max_bytes=None):
        """One page of the job's log from byte ``offset``: ``{"offset", "text", "next_offset",
        "size"}``. Page on with ``offset=next_offset`` until ``next_offset == size``."""
        req = {"type": "logs", "job": job, "offset": int(offset)}
        if max_bytes is not None:
            req["max_bytes"] = int(max_bytes)
        return self._record(req, "logs")

    def log_text(self, job, offset=0):
        """The job's log from ``offset`` to its current end, read page by page."""
        parts = []
        while True:
            page = self.logs(job, offset)
            parts.append(page["text"])
            nxt = page["next_offset"]
            if not page["text"] or nxt >= page["size"] or nxt <= offset:
                return "".join(parts)
            offset = nxt

    def subscribe(self, job=None, since_seq=0, reconnect=True, reconnect_timeout=60.0):
        """Subscribes to one job's events (``job=None``: every job's, admin only), replaying those
        with ``seq > since_seq`` first. Returns a ``Subscription``: iterate it for the events. Pass
        ``status()["last_seq"]`` as ``since_seq`` for only what happens from now on."""
        return Subscription(self, job, since_seq, reconnect, reconnect_timeout)

    def wait(self, job, timeout=None):
        """Waits until the job is completed, failed or cancelled and returns its final record; raises
        ``TimeoutError`` after ``timeout`` seconds. Survives daemon restarts.

        Subscribes first, then reads the record: the record covers every event up to the
        subscription's start, and every later change arrives as an event."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left():
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        sub = self.subscribe(job, since_seq=self.status()["last_seq"],
                             reconnect_timeout=max(60.0, timeout or 0.0))
        try:
            stale = True  # the record must be read (again)
            while True:
                if stale:
                    try:
                        record = self.get(job)
                    except LoradConnectionError:
                        # The subscription reconnects (losing no event); then read the record again.
                        if not sub._ensure_attached(deadline):
                            raise TimeoutError(f"job {job} did not finish within {timeout} s")
                        continue
                    if record["state"] in TERMINAL_STATES:
                        return record
                    stale = False
                event = sub.next_event(timeout=left())
                if event is None:
                    raise TimeoutError(f"job {job} did not finish within {timeout} s")
                body = event.get("body") or {}
                # A replayed end may be stale (the job was retried since): the record decides.
                if body.get("type") == "state_changed" and body.get("to") in TERMINAL_STATES:
                    stale = True
        finally:
            sub.close()

    def unsubscribe(self, sub):
        """Ends subscription ``sub`` (an id) of this connection. ``Subscription.close`` does this."""
        self._subs.pop(sub, None)
        self._answer({"type": "unsubscribe", "sub": sub}, "done")

    def shutdown(self):
        """Admin only: stops the daemon."""
        self._answer({"type": "shutdown"}, "done")

    def backup(self):
        """Admin only: a consistent copy of the journal in the daemon's state dir: ``{"path",
        "records"}``."""
        return self._record({"type": "backup"}, "backup")
