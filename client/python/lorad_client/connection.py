"""One connection to lorad: the socket path, framing and the handshake (PROTOCOL.md "Transport",
"Framing and encoding", "Handshake").

A frame is a 4-byte big-endian length, then that many bytes of MessagePack. Structs are maps with
named fields; enums are maps tagged by ``"type"``.
"""

import os
import socket
import struct
import time

import msgpack

from .errors import LoradConnectionError, LoradError, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_FRAME",
    "SOCKET_ENV",
    "SYSTEM_SOCKET",
    "default_socket",
    "Connection",
]

#: The protocol version this client speaks.
PROTOCOL_VERSION = 1
#: The largest frame either side may send (16 MiB).
MAX_FRAME = 16 * 1024 * 1024
#: The environment variable that overrides the socket path for every tool.
SOCKET_ENV = "LORAD_SOCKET"
#: The system daemon's socket.
SYSTEM_SOCKET = "/run/lorad/lorad.sock"
#: How long the daemon has to answer hello (the daemon itself waits 10 s for it).
HANDSHAKE_TIMEOUT = 10.0

_LEN = struct.Struct(">I")


def default_socket():
    """The socket a client uses when none is given, as lorad-schema's ``paths::default_socket``:
    ``$LORAD_SOCKET`` if set and not empty, else the user daemon's ``$XDG_RUNTIME_DIR/lorad.sock``
    if it exists, else the system socket ``/run/lorad/lorad.sock``."""
    explicit = os.environ.get(SOCKET_ENV)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        user = os.path.join(runtime, "lorad.sock")
        if os.path.exists(user):
            return user
    return SYSTEM_SOCKET


def encode(msg):
    """One frame holding ``msg``."""
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise LoradError("too_large", f"a frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class Connection:
    """A handshaken socket that sends frames and reads them back with an optional timeout.

    Received bytes are kept in a buffer until a whole frame is there, so a read that times out
    mid-frame loses nothing: the next read carries on. After any transport failure the connection is
    ``closed`` for good, and every later send or read raises ``LoradConnectionError``."""

    def __init__(self, path, client_name):
        self.path = os.fspath(path)
        self.closed = False
        self._buf = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            self.closed = True
            raise LoradConnectionError(f"cannot connect to lorad at {self.path}: {e}") from e
        try:
            self.welcome = self._handshake(client_name)
        except BaseException:
            self.close()
            raise

    def _handshake(self, client_name):
        hello = {"type": "hello", "protocol": PROTOCOL_VERSION, "client": client_name}
        sent = None
        try:
            self._sock.sendall(encode(hello))
        except OSError as e:
            # A daemon that turns the connection away (too many connections) answers and closes
            # without reading hello: its answer may still be there to read.
            sent = e
        try:
            answer = self.recv(timeout=HANDSHAKE_TIMEOUT)
        except LoradConnectionError:
            if sent is not None:
                raise LoradConnectionError(
                    f"lorad at {self.path} closed the connection: {sent}") from sent
            raise
        if answer is None:
            raise ProtocolError(
                f"no answer to hello from {self.path} within {HANDSHAKE_TIMEOUT:g} s "
                "(is it a lorad socket?)")
        kind = answer.get("type") if isinstance(answer, dict) else None
        if kind == "welcome":
            return answer
        if kind == "error":
            raise LoradError.from_wire(answer)
        raise ProtocolError(f"no welcome from {self.path}: {answer!r}")

    def send(self, msg):
        """Sends one frame."""
        if self.closed:
            raise LoradConnectionError(f"the connection to {self.path} is closed")
        data = encode(msg)
        try:
            self._sock.settimeout(None)
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise LoradConnectionError(f"lost the connection to lorad at {self.path}: {e}") from e

    def recv(self, timeout=None):
        """The next frame, decoded; ``None`` if none arrived within ``timeout`` seconds (``None``:
        wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = self._take_frame()
            if frame is not None:
                return frame
            if self.closed:
                raise LoradConnectionError(f"the connection to {self.path} is closed")
            if deadline is None:
                self._sock.settimeout(None)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError as e:
                self.close()
                raise LoradConnectionError(
                    f"lost the connection to lorad at {self.path}: {e}") from e
            if not chunk:
                self.close()
                raise LoradConnectionError(f"lorad at {self.path} closed the connection")
            self._buf += chunk

    def _take_frame(self):
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        # Checked before waiting for (and so before buffering) the body.
        if n > MAX_FRAME:
            self.close()
            raise ProtocolError(f"lorad sent a frame of {n} bytes; the limit is {MAX_FRAME}")
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as e:
            self.close()
            raise ProtocolError(f"lorad sent a frame that is not MessagePack: {e}") from e

    def __del__(self):
        self.close()

    def close(self):
        """Closes the socket (idempotent). Frames already buffered can still be read."""
        sock = getattr(self, "_sock", None)  # absent if socket() itself failed
        if not self.closed and sock is not None:
            self.closed = True
            try:
                sock.close()
            except OSError:
                pass
