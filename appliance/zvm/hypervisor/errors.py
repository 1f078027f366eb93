"""Errors of the hypervisor adapters: one small hierarchy; each docstring is the default message.

``status`` and ``title`` follow the ZVM's problem-document convention (appliance/zvm/errors.py),
so the API layer can map them in its one place.
"""
from __future__ import annotations


class HypervisorError(Exception):
    """The hypervisor manager refused or failed the request."""
    status, title = 502, "Hypervisor error"

    def __init__(self, detail: str | None = None):
        super().__init__(detail or self.__doc__)


class NotFound(HypervisorError):
    """No such object in the hypervisor inventory: list the inventory again, it may have changed."""
    status, title = 404, "Not found in the hypervisor inventory"


class Unreachable(HypervisorError):
    """The hypervisor manager does not answer: check its address, the network and that it runs."""
    status, title = 503, "Hypervisor manager unreachable"


class AuthenticationFailed(HypervisorError):
    """The hypervisor manager refused the credentials: check the user name and password."""
    status, title = 502, "Hypervisor login failed"


class InvalidState(HypervisorError):
    """The object is not in a state that allows this (e.g. its host is down)."""
    status, title = 409, "Invalid state in the hypervisor"


class InvalidSpec(HypervisorError):
    """The request is not valid for this hypervisor: fix the named field."""
    status, title = 400, "Invalid hypervisor request"
