"""Per-VPG journal settings: declared once, validated in one place."""
from __future__ import annotations

from dataclasses import asdict, dataclass

HISTORY_MIN_S = 3600.0
HISTORY_MAX_S = 30 * 86400.0


@dataclass
class JournalSettings:
    replica_dir: str                # where replica disk files of this VPG live
    history_s: float = 4 * 3600     # history window, 3600 .. 30*86400
    hard_limit_bytes: int = 0       # 0 = none; when exceeded the oldest history is promoted first and an alert raised
    warn_bytes: int = 0             # warning threshold (alert), 0 = none

    def validate(self) -> "JournalSettings":
        if not self.replica_dir:
            raise ValueError("replica_dir must name a directory")
        if not HISTORY_MIN_S <= float(self.history_s) <= HISTORY_MAX_S:
            raise ValueError(f"history_s must be within {HISTORY_MIN_S:.0f}..{HISTORY_MAX_S:.0f} s, "
                             f"not {self.history_s}")
        if self.hard_limit_bytes < 0 or self.warn_bytes < 0:
            raise ValueError("hard_limit_bytes and warn_bytes must be >= 0 (0 = none)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JournalSettings":
        return cls(**{k: d[k] for k in ("replica_dir", "history_s", "hard_limit_bytes", "warn_bytes") if k in d})
