"""A stream of one subscription's events that survives dropped connections (PROTOCOL.md
"Subscriptions and events")."""

import time
import weakref
from collections import deque

from .errors import Busy, LoradConnectionError

__all__ = ["Subscription"]

#: First and largest pause between reconnection attempts, seconds.
_BACKOFF = (0.05, 1.0)


class Subscription:
    """The events of one subscription: replayed history first (``seq > since_seq``), then live ones.

    An iterator: ``for event in sub`` yields each event as a dict ``{"seq", "job", "at_ms", "body"}``
    in ``seq`` order and blocks for the next one; ``next_event(timeout)`` waits at most ``timeout``
    seconds. Events of kinds this client does not know are yielded too (``body["type"]`` says which;
    skip those you do not handle).

    When the connection drops (the daemon restarted, the laptop slept) and ``reconnect`` is true, the
    subscription connects again with backoff, for up to ``reconnect_timeout`` seconds (``None``: for
    ever), and subscribes again with ``since_seq`` = the newest ``seq`` it has received. Every event
    has a journal-wide, strictly increasing ``seq`` and the daemon replays exactly the events after
    ``since_seq``, so across reconnections nothing is lost or yielded twice. ``reconnects`` counts them.

    Made by ``Client.subscribe``; it shares the client's connection (see the ``lorad_client`` module
    docs). ``close()`` (or leaving a ``with`` block) ends it on the daemon; a subscription that is
    garbage-collected is ended by the client's next request.
    """

    def __init__(self, client, job, since_seq, reconnect=True, reconnect_timeout=60.0):
        self.job = job
        #: The ``seq`` of the newest event yielded (or the ``since_seq`` subscribed with, before any).
        self.last_seq = since_seq
        #: How many times the subscription reconnected after a dropped connection.
        self.reconnects = 0
        #: The subscription id the daemon assigned on the current connection.
        self.id = None
        #: The journal's newest ``seq`` when the (latest) subscription started: events up to it are
        #: replayed history.
        self.replay_until = None
        self.closed = False
        self.reconnect = reconnect
        self.reconnect_timeout = reconnect_timeout
        self._client = client
        self._received = since_seq  # newest seq received (yielded or still in _buffer)
        self._buffer = deque()
        self._conn = None
        self._finalizer = None
        self._outage_since = None  # when the current loss of connection was noticed
        self._attach()

    def _attach(self):
        """Subscribes on the client's current connection, from the newest event received."""
        if self._finalizer is not None:
            self._finalizer.detach()
        client = self._client
        sub, last_seq, conn = client._subscribe(self, self._received)
        self.id, self.replay_until, self._conn = sub, last_seq, conn
        # Ends the subscription on the daemon if this object is dropped without close(). The callback
        # must not hold `self`; it only queues an unsubscribe for the client's next request.
        self._finalizer = weakref.finalize(self, client._forget_sub, conn, sub)

    def _push(self, event):
        """Takes an event routed to this subscription by the client."""
        seq = event.get("seq", 0)
        if seq <= self._received:
            return  # a duplicate; the protocol says it does not happen, but cost nothing to skip
        self._received = seq
        self._buffer.append(event)

    def __iter__(self):
        return self

    def __next__(self):
        event = self.next_event()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def next_event(self, timeout=None):
        """The next event, waiting at most ``timeout`` seconds (``None``: as long as it takes).
        ``None`` if none arrived in time, or once the subscription is closed. Raises
        ``LoradConnectionError`` if the connection dropped and could not be made again (or
        ``reconnect`` is false)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._buffer:
                event = self._buffer.popleft()
                self.last_seq = max(self.last_seq, event.get("seq", 0))
                return event
            if self.closed:
                return None
            if not self._ensure_attached(deadline):
                return None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                frame = self._conn.recv(timeout=left)
            except LoradConnectionError:
                if not self.reconnect:
                    raise
                continue  # _ensure_attached reconnects
            if frame is None:
                return None
            self._client._route(frame)

    def _ensure_attached(self, deadline):
        """Makes sure the subscription lives on the client's current, open connection: reconnects
        and subscribes again if not. False if ``deadline`` passed first."""
        client = self._client
        if self._conn is client._conn and not self._conn.closed:
            return True
        if not self.reconnect:
            raise LoradConnectionError(
                f"the connection of subscription {self.id} to {client.socket_path} dropped")
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        give_up = None
        if self.reconnect_timeout is not None:
            give_up = self._outage_since + self.reconnect_timeout
        delay = _BACKOFF[0]
        while True:
            try:
                if client._conn is None or client._conn.closed:
                    client.connect()
                self._attach()
                self.reconnects += 1
                self._outage_since = None
                return True
            except (LoradConnectionError, Busy) as e:
                now = time.monotonic()
                if give_up is not None and now >= give_up:
                    raise LoradConnectionError(
                        f"could not reconnect subscription to {client.socket_path} within "
                        f"{self.reconnect_timeout:g} s: {e}") from e
                if deadline is not None and now >= deadline:
                    return False
                pause = delay
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - now))
                time.sleep(pause)
                delay = min(delay * 2, _BACKOFF[1])

    def close(self):
        """Ends the subscription on the daemon (if its connection is still up). Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._buffer.clear()
        if self._finalizer is not None:
            self._finalizer.detach()
        self._client._unsubscribe(self._conn, self.id)
