"""The exceptions of lorad_client.

Every error the daemon answers carries a code from a closed set (schema/src/error.rs, PROTOCOL.md
"Errors"). ``LoradError`` has it as ``.code``; each code also has a subclass, so callers can write
either ``except NotFound:`` or ``except LoradError as e: if e.code == "not_found": ...``.
"""

__all__ = [
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
]


class LoradError(Exception):
    """An error answer from lorad: ``code`` (one of ``ERROR_CODES``) and ``message`` for people."""

    code = None

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @staticmethod
    def from_wire(err):
        """The exception for a wire error map ``{"code": ..., "message": ...}``: the subclass of its
        code, or ``LoradError`` itself for a code this client does not know (a newer daemon)."""
        code = str(err.get("code", "internal"))
        message = str(err.get("message", ""))
        return _BY_CODE.get(code, LoradError)(code, message)


class NotFound(LoradError):
    """The job (or subscription, template, checkpoint) does not exist."""
    code = "not_found"


class InvalidArgument(LoradError):
    """The request is malformed or names a bad value; the message says which field (and line)."""
    code = "invalid_argument"


class InvalidState(LoradError):
    """Not allowed in the job's current state, e.g. cancelling a completed job."""
    code = "invalid_state"


class PermissionDenied(LoradError):
    """The caller may not see or change this job, or the request is admin only."""
    code = "permission_denied"


class Unsupported(LoradError):
    """The daemon does not support this request or protocol version."""
    code = "unsupported"


class TooLarge(LoradError):
    """A frame or a value exceeds a limit."""
    code = "too_large"


class Busy(LoradError):
    """The daemon cannot take the request (or the connection) now; retry later."""
    code = "busy"


class Internal(LoradError):
    """A bug or an I/O failure inside the daemon; the daemon's log has details."""
    code = "internal"


class Failed(LoradError):
    """The work ran and failed, e.g. an exporter plugin reported an error; the message says why."""
    code = "failed"


class QuotaExceeded(LoradError):
    """A per-user limit the admin set would be exceeded; the message names it. Nothing changed."""
    code = "quota_exceeded"


_BY_CODE = {
    cls.code: cls
    for cls in (NotFound, InvalidArgument, InvalidState, PermissionDenied, Unsupported, TooLarge,
                Busy, Internal, Failed, QuotaExceeded)
}

#: The wire's closed set of error codes, as in schema/src/error.rs.
ERROR_CODES = tuple(_BY_CODE)


class LoradConnectionError(ConnectionError):
    """The connection to lorad could not be made, or it dropped (the daemon stopped or restarted).

    A request that was in flight when the connection dropped may or may not have been carried out.
    The next call on the same ``Client`` connects again."""


class ProtocolError(Exception):
    """The peer sent something that is not lorad's protocol (a bad frame, an unexpected answer)."""
