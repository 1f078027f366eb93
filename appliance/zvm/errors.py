"""ZVM errors: one small hierarchy, mapped to HTTP problem responses (and CLI exit codes) in one
place. The docstring of each class is its default message."""
from __future__ import annotations


class ZVMError(Exception):
    """The ZVM could not do that."""
    status = 500
    title = "Internal error"
    exit_code = 1

    def __init__(self, detail: str | None = None):
        super().__init__(detail or self.__doc__)

    @property
    def detail(self) -> str:
        return str(self)


class ConfigError(ZVMError):
    """The ZVM configuration is invalid."""
    title = "Configuration error"
    exit_code = 2


class BadRequest(ZVMError):
    """The request is malformed."""
    status, title, exit_code = 400, "Bad request", 2


class Unauthorized(ZVMError):
    """Authenticate first: send Authorization: Bearer <token> (POST /auth/realms/zerto/protocol/openid-connect/token)."""
    status, title, exit_code = 401, "Unauthorized", 3


class Forbidden(ZVMError):
    """Your role does not allow this."""
    status, title, exit_code = 403, "Forbidden", 3


class NotFound(ZVMError):
    """No such object."""
    status, title, exit_code = 404, "Not found", 4


class Conflict(ZVMError):
    """The object is not in a state that allows this."""
    status, title, exit_code = 409, "Conflict", 5


class Unavailable(ZVMError):
    """A component this needs (peer site, VRA, hypervisor manager) cannot be reached."""
    status, title, exit_code = 503, "Unavailable", 6


class CheckpointLost(Unavailable):
    """A valid checkpoint the recovery site did not make recoverable (a later one is)."""


def problem(status: int, title: str, detail: str) -> dict:
    """An RFC 7807 problem document; `Message` too, for clients of the ErrorResponse shape."""
    return {"type": "about:blank", "title": title, "status": status, "detail": detail,
            "Message": detail}
