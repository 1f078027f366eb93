"""DSS errors: a small hierarchy whose docstring is the message template (borg style).

Every error says what failed and what to do next. ``exit_code`` is what the CLI returns and
``http_status`` what the API maps the error to (one place: here).
"""
from __future__ import annotations


class DSSError(Exception):
    """Journal error: {}"""

    exit_code = 20
    http_status = 500

    def get_message(self) -> str:
        return type(self).__doc__.format(*self.args)

    __str__ = get_message


class JournalCorrupt(DSSError):
    """Journal record {} of VPG {} failed its check ({}). Its data is never served: run check() and resync the VPG."""

    exit_code = 21


class DuplicateEntry(DSSError):
    """Entry {} of VPG {} is already durable (durable position {}): resume sending after the durable position."""

    exit_code = 22
    http_status = 409


class StreamGap(DSSError):
    """Entry {} of VPG {} does not follow durable position {} ({}): start a new generation (delta sync)."""

    exit_code = 23
    http_status = 409


class UnknownVPG(DSSError):
    """VPG {} has no journal on this VRA: create it with create_vpg() first."""

    exit_code = 24
    http_status = 404


class UnknownDisk(DSSError):
    """Disk {} of VM {} is not registered in VPG {}: call register_disk() first."""

    exit_code = 25
    http_status = 404


class NotRecoverable(DSSError):
    """Position {} of VPG {} is no longer recoverable (history starts at {}): pick a newer checkpoint."""

    exit_code = 26
    http_status = 410


class InvalidAppend(DSSError, ValueError):
    """Append to VPG {} refused: {}. Nothing was written."""

    exit_code = 27
    http_status = 400


class ImageBusy(DSSError):
    """VPG {} has {}: {}."""

    exit_code = 28
    http_status = 409
