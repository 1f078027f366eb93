"""DSS: the recovery-side journal of replicated writes (RocksDB), point-in-time reads,
checkpoints, promotion into replica disks, limits and recovery images.

Specification: docs/FORMAT.md, "Journal (DSS)".
"""
from .errors import (DSSError, DuplicateEntry, ImageBusy, InvalidAppend, JournalCorrupt, NotRecoverable,
                     StreamGap, UnknownDisk, UnknownVPG)
from .image import RecoveryImage
from .journal import Journal
from .pos import Checkpoint, Entry, Pos
from .settings import JournalSettings

__all__ = [
    "Checkpoint", "DSSError", "DuplicateEntry", "Entry", "ImageBusy", "InvalidAppend", "Journal",
    "JournalCorrupt", "JournalSettings", "NotRecoverable", "Pos", "RecoveryImage", "StreamGap",
    "UnknownDisk", "UnknownVPG",
]
