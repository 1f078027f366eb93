"""The VPG status monitor: ``VpgMonitor.sync()`` (a public synchronous method; a job calls it
every ``monitor_interval_s``) and the pure rule ``evaluate()`` that turns measurements into
the reference's Status / SubStatus.

Per protected VPG, one pass asks the peer ZVM (``POST /v1/internal/vpgs/{id}/state``, which
also hands it this pass's state for its mirror) for the recovery VRA's RPO and journal usage,
and asks each protected VRA for its stream counters (bytes and records sent: throughput and
IOPS between two passes) and whether a delta/bitmap sync runs. Alerts are raised and cleared
by key ``vpg:<id>:<help>`` on every pass (events.py: idempotent both ways).
"""
from __future__ import annotations

import logging
import threading
import time

from .errors import ZVMError
from .vpgs import (HISTORY_NOT_MET, INITIALIZING, MEETING_SLA, OPERATION_STATUSES, RPO_NOT_MET,
                   STATUSES, SUB_DELTA_SYNC, SUB_DISCONNECTED, SUB_INITIAL_SYNC, SUB_NONE, SUB_PAUSED)

log = logging.getLogger("tidemark.zvm.vpgstatus")


def evaluate(*, initial_sync_done: bool, paused: bool, syncing: bool, reachable: bool,
             rpo_s: float | None, rpo_configured_s: int, history_s: float,
             history_configured_s: float, since_sync_s: float, grace_s: float = 0.0,
             dropped_s_ago: float | None = None,
             current: tuple[int, int] = (INITIALIZING, SUB_INITIAL_SYNC)) -> tuple[int, int]:
    """(status, substatus) of a protected VPG.

    - Initializing / InitialSync until the initial sync finished (the create task says so);
    - paused: the status stays as measured, SubStatus ReplicationPausedUserInitiated;
    - RpoNotMeetingSLA when the actual RPO exceeds the configured one (or none is known);
    - HistoryNotMeetingSLA when the journal holds less than the configured history and either
      the configured history could have built up (``since_sync_s >= history + grace``) or the
      journal dropped history to stay under its hard limit within the last configured history
      (``dropped_s_ago < history``: what it dropped was inside the window, so the configured
      history cannot be there, however young the VPG is);
    - else MeetingSLA; SubStatus DeltaSync while a delta/bitmap sync runs.
    """
    if not initial_sync_done:
        return current
    if not reachable:
        return current[0], SUB_DISCONNECTED
    built_up = since_sync_s >= history_configured_s + grace_s
    dropped = dropped_s_ago is not None and dropped_s_ago < history_configured_s
    if rpo_s is None or rpo_s > rpo_configured_s:
        status = RPO_NOT_MET
    elif (built_up or dropped) and history_s < history_configured_s * 0.95:
        status = HISTORY_NOT_MET
    else:
        status = MEETING_SLA
    sub = SUB_PAUSED if paused else SUB_DELTA_SYNC if syncing else SUB_NONE
    return status, sub


class VpgMonitor:
    def __init__(self, zvm, vpgs):
        self.zvm, self.vpgs = zvm, vpgs
        self._samples: dict[str, tuple[float, int, int]] = {}   # vpg -> (t, bytes, records)
        self._telling: set[str] = set()       # VPGs whose protected site is being told (a thread)
        self._lock = threading.Lock()

    def sync(self) -> dict[str, tuple[int, int]]:
        """One pass over this site's protected VPGs; their (status, substatus). A VPG recovered
        here while its protected site was down tells that site once it answers again
        (``operations.source.tell_protected_site``)."""
        out = {}
        for vpg in self.vpgs.list():
            if vpg.get("_sourcePending"):
                self._tell_source(vpg)
            if vpg["role"] != "protected" or vpg["state"]["status"] in OPERATION_STATUSES:
                continue                  # a failover, move or delete owns the status
            try:
                out[vpg["identifier"]] = self.sync_one(vpg)
            except ZVMError as exc:
                log.warning("VPG %s: status pass failed: %s", vpg["name"], exc)
        return out

    def _tell_source(self, vpg: dict) -> None:
        """Tell the VPG's protected site about a failover it missed, in a thread of its own (its
        calls may take a while: power-offs there), one at a time per VPG."""
        from .operations.source import tell_protected_site
        vid = vpg["identifier"]
        with self._lock:
            if vid in self._telling:
                return
            self._telling.add(vid)

        def run():
            try:
                tell_protected_site(self.zvm, vpg)
            except ZVMError as exc:
                log.warning("VPG %s: telling its protected site: %s", vpg["name"], exc)
            finally:
                with self._lock:
                    self._telling.discard(vid)
        threading.Thread(target=run, name=f"tell-source-{vid}", daemon=True).start()

    def _protected_counters(self, vpg: dict) -> tuple[int, int, bool]:
        total_bytes = total_recs = 0
        syncing = False
        for vra in self.vpgs.protected_vras(vpg):
            st = self.vpgs.vra_call(vra, "GET", "/v1/status")
            s = ((st.get("protected") or {}).get("vpgs") or {}).get(vpg["identifier"]) or {}
            total_bytes += int(s.get("sent_bytes", 0))
            total_recs += int(s.get("acked_seq", 0))
            if ((st.get("delta_syncs") or {}).get(vpg["identifier"]) or {}).get("running"):
                syncing = True
        return total_bytes, total_recs, syncing

    def sync_one(self, vpg: dict) -> tuple[int, int]:
        vid, state, basic = vpg["identifier"], vpg["state"], vpg["settings"]["basic"]
        now = time.time()
        stats = dict(vpg.get("stats") or {})
        syncing = bool(state.get("syncing"))
        if not state.get("paused") and vpg.get("protectedVras"):
            try:
                nbytes, nrecs, running = self._protected_counters(vpg)
                syncing = syncing or running
                prev = self._samples.get(vid)
                self._samples[vid] = (now, nbytes, nrecs)
                if prev and now > prev[0] and nbytes >= prev[1]:
                    dt = now - prev[0]
                    stats["throughputInMB"] = round((nbytes - prev[1]) / dt / 1e6, 3)
                    stats["ioPs"] = int((nrecs - prev[2]) / dt)
            except ZVMError as exc:
                log.info("VPG %s: protected VRA counters: %s", vpg["name"], exc)
        else:
            stats.update(throughputInMB=0.0, ioPs=0)
        reachable = True
        try:
            rep = self.vpgs.peer_call(vpg, "POST", f"/v1/internal/vpgs/{vid}/state",
                                              json={"state": state, "stats": stats})
            stats.update(actualRpo=None if rep["rpoS"] is None else int(rep["rpoS"]),
                         latestCheckpoint=rep["latestCheckpoint"], journalBytes=rep["journalBytes"],
                         historyS=rep["historyS"], journalAlerts=rep.get("journalAlerts", []),
                         journalHardLimitBytes=rep.get("journalHardLimitBytes"),
                         journalWarningBytes=rep.get("journalWarningBytes"))
            if any(j.get("kind") == "journal_hard_limit" for j in stats["journalAlerts"]):
                # the recovery VRA's last journal maintenance dropped the oldest history
                stats["historyDroppedAt"] = now
        except ZVMError as exc:
            reachable = False
            log.info("VPG %s: recovery side: %s", vpg["name"], exc)
        done = state.get("initialSyncDone")
        dropped_at = stats.get("historyDroppedAt")
        status, sub = evaluate(
            initial_sync_done=bool(done), paused=bool(state.get("paused")), syncing=syncing,
            reachable=reachable, rpo_s=stats.get("actualRpo"),
            rpo_configured_s=int(basic.get("rpoInSeconds") or 300),
            history_s=float(stats.get("historyS") or 0),
            history_configured_s=float(basic.get("journalHistoryInHours") or 24) * 3600,
            since_sync_s=now - done if done else 0.0, grace_s=self.zvm.cfg.vpg_history_grace_s,
            dropped_s_ago=now - dropped_at if dropped_at and done and dropped_at >= done else None,
            current=(state["status"], state["substatus"]))
        stats["sampleTime"] = now
        with self.vpgs.update(vid) as doc:
            if doc["state"]["status"] in OPERATION_STATUSES:   # an operation began meanwhile
                return status, sub
            doc["state"].update(status=status, substatus=sub)
            doc["stats"] = stats
        self._alerts(vpg, status, syncing and not state.get("paused"), stats, bool(done))
        return status, sub

    def _alerts(self, vpg: dict, status: int, syncing: bool, stats: dict, live: bool) -> None:
        a, vid, link = self.zvm.alerts, vpg["identifier"], self.vpgs.link(vpg)
        basic = vpg["settings"]["basic"]
        key = f"vpg:{vid}:"
        if not live:
            return
        if status == RPO_NOT_MET:
            a.raise_(key + "VPG0009", "VPG0009", f"VPG {vpg['name']}: actual RPO "
                     f"{stats.get('actualRpo')} s exceeds the configured {basic['rpoInSeconds']} s",
                     vpg=link)
        else:
            a.clear(key + "VPG0009")
        if status == HISTORY_NOT_MET:
            dropped = stats.get("historyDroppedAt")
            why = ""
            if dropped and time.time() - dropped < float(basic.get("journalHistoryInHours") or 24) * 3600:
                why = ("; it dropped its oldest history to stay under its hard limit at "
                       f"{time.strftime('%H:%M:%S', time.gmtime(dropped))} UTC: raise the limit")
            a.raise_(key + "VPG0010", "VPG0010", f"VPG {vpg['name']}: the journal holds "
                     f"{int(stats.get('historyS') or 0) // 60} min of history, configured "
                     f"{basic['journalHistoryInHours']} h{why}", vpg=link)
        else:
            a.clear(key + "VPG0010")
        if syncing:
            a.raise_(key + "VPG0018", "VPG0018", f"VPG {vpg['name']}: a delta sync is running",
                     vpg=link)
        else:
            a.clear(key + "VPG0018")
        lim = vpg["settings"]["journal"].get("limitation") or {}
        used = int(stats.get("journalBytes") or 0)
        # the limits in bytes as the recovery VRA holds them (MB or % of the journal's datastore,
        # the smaller: vpgsettings.journal_limits); from an older recovery site, the MB ones
        hard, warn = stats.get("journalHardLimitBytes"), stats.get("journalWarningBytes")
        if hard is None or warn is None:
            hard, warn = int(lim.get("hardLimitInMB") or 0) << 20, int(lim.get("warningThresholdInMB") or 0) << 20
        kinds = {j.get("kind") for j in stats.get("journalAlerts") or []}
        if (hard and used >= hard) or "journal_hard_limit" in kinds:
            a.raise_(key + "VPG0013", "VPG0013", f"VPG {vpg['name']}: the journal uses {used >> 20} MB, "
                     f"its hard limit is {hard >> 20} MB: the oldest history is being dropped", vpg=link)
        else:
            a.clear(key + "VPG0013")
        if (warn and used >= warn) or "journal_warning" in kinds:
            a.raise_(key + "VPG0012", "VPG0012", f"VPG {vpg['name']}: the journal uses {used >> 20} MB, "
                     f"over its warning threshold of {warn >> 20} MB", vpg=link)
        else:
            a.clear(key + "VPG0012")

    # -- Prometheus
    def metrics(self) -> list[str]:
        lines = []
        series = [("tidemark_vpg_actual_rpo_seconds", "Actual RPO of the VPG.", "actualRpo"),
                  ("tidemark_vpg_throughput_mb_per_second", "Replicated MB/s.", "throughputInMB"),
                  ("tidemark_vpg_iops", "Replicated write records per second.", "ioPs"),
                  ("tidemark_vpg_journal_used_bytes", "Journal bytes at the recovery site.", "journalBytes")]
        vpgs = self.vpgs.list()
        for name, text, key in series:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            for v in vpgs:
                val = (v.get("stats") or {}).get(key)
                if val is not None:
                    lines.append(f'{name}{{vpg="{_esc(v["name"])}",id="{v["identifier"]}"}} {val}')
        lines += ["# HELP tidemark_vpg_status VPG status (0 Initializing, 1 MeetingSLA, ...).",
                  "# TYPE tidemark_vpg_status gauge"]
        for v in vpgs:
            lines.append(f'tidemark_vpg_status{{vpg="{_esc(v["name"])}",id="{v["identifier"]}",'
                         f'status="{STATUSES[v["state"]["status"]]}"}} {v["state"]["status"]}')
        return lines


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
