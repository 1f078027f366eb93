"""Value types of the journal: a stream position, a replicated write, a checkpoint."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Pos:
    """A position in a VPG's stream, ordered by (generation, lsn); printed as ``g1:42``.

    A break in continuity starts a new generation, whose first lsn is 1. ``Pos(0, 0)`` is
    "before everything" and never names an entry.
    """

    generation: int
    lsn: int

    def __str__(self) -> str:
        return f"g{self.generation}:{self.lsn}"

    @classmethod
    def parse(cls, text: str) -> "Pos":
        gen, sep, lsn = text.partition(":")
        if not sep or not gen.startswith("g"):
            raise ValueError(f"not a position: {text!r} (expected g<generation>:<lsn>)")
        return cls(int(gen[1:]), int(lsn))


ZERO = Pos(0, 0)


@dataclass(frozen=True)
class Entry:
    """One replicated write: ``data`` at byte ``offset`` of disk ``disk`` of VM ``vm`` (instance UUID)."""

    pos: Pos
    vm: str
    disk: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A crash-consistent cut of the VPG's stream: every entry <= ``pos``.

    ``time`` is the protected side's clock; a tagged checkpoint was taken on demand.
    """

    id: int
    pos: Pos
    time: float
    tag: str | None = None
