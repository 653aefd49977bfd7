"""A Python client for lorad, the LoRA fine-tuning daemon, for scripts and notebooks.

It speaks the wire protocol of docs/PROTOCOL.md (version 1) over the daemon's Unix socket, with
plain blocking sockets and ``msgpack`` as its only dependency::

    from lorad_client import Client, LoradError

    c = Client()                                   # $LORAD_SOCKET, the user socket, or the system one
    job = c.submit("basic-fine-tune", "models/tiny", "data/train.jsonl",
                   overrides={"max_steps": 80, "lr": 0.01})
    for event in c.subscribe(job["id"]):           # history first, then live; survives restarts
        body = event["body"]
        if body["type"] == "metrics":
            print("step", body["point"]["step"], "loss", body["point"]["loss"])
        elif body["type"] == "state_changed" and body["to"] in ("completed", "failed", "cancelled"):
            break
    print(c.wait(job["id"])["state"])              # the final record

Records, statuses, metric points and events are dicts in the wire's shape (PROTOCOL.md "Data
types"); a job record is what ``get`` answers, without the answer's ``type`` tag. Errors the daemon
answers raise ``LoradError`` (or its subclass for the code, such as ``InvalidArgument``), whose
``code`` is one of the wire's closed set ``ERROR_CODES``; a lost connection raises
``LoradConnectionError``.

Design: one connection per ``Client``, used by one thread at a time. Each request gets a fresh id,
and the client reads frames until the reply with that id arrives; subscription pushes read on the
way (``{"sub", "event"}``) are queued in their ``Subscription``, including pushes that overtake the
``subscribed`` reply, so a script can call ``get`` in the middle of iterating events and lose
nothing. Reading a subscription likewise passes any stray reply by. A dedicated connection per
subscription would only add sockets: nothing here waits on two things at once. The price is that
events of a subscription nobody reads pile up in memory; close subscriptions you are done with (a
dropped one is ended with the next request).

When the daemon restarts, a call in flight raises ``LoradConnectionError`` and the next call
connects again; a subscription reconnects with backoff and subscribes again after the newest ``seq``
it received, so its events continue without a gap or a repeat (every event has a journal-wide
``seq``; PROTOCOL.md "Subscriptions and events").
"""

from .client import DEFAULT_CLIENT_NAME, TERMINAL_STATES, Client, __version__
from .connection import MAX_FRAME, PROTOCOL_VERSION, SOCKET_ENV, SYSTEM_SOCKET, default_socket
from .errors import (
    ERROR_CODES,
    Busy,
    Failed,
    Internal,
    InvalidArgument,
    InvalidState,
    LoradConnectionError,
    LoradError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    QuotaExceeded,
    TooLarge,
    Unsupported,
)
from .subscription import Subscription

__all__ = [
    "Client",
    "Subscription",
    "default_socket",
    "TERMINAL_STATES",
    "DEFAULT_CLIENT_NAME",
    "PROTOCOL_VERSION",
    "MAX_FRAME",
    "SOCKET_ENV",
    "SYSTEM_SOCKET",
    "ERROR_CODES",
    "LoradError",
    "NotFound",
    "InvalidArgument",
    "InvalidState",
    "PermissionDenied",
    "Unsupported",
    "TooLarge",
    "Busy",
    "Internal",
    "Failed",
    "QuotaExceeded",
    "LoradConnectionError",
    "ProtocolError",
    "__version__",
]
