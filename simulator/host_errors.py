"""Errors of a host's control API: each carries its HTTP status (problem documents in ``host.py``)."""
from __future__ import annotations


class HTTPError(Exception):
    code = 500


class BadRequest(HTTPError):
    code = 400


class NotFound(HTTPError):
    code = 404


class Conflict(HTTPError):
    code = 409
