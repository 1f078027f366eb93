"""The ZVM's wait for a checkpoint to become recoverable, and what it does when the recovery
site lost one (its barrier abandoned: a participant's marker lost in a restart, or late beyond
the limit). The recovery site's listings are given in the order the recovery VRA would answer;
producing a real lost barrier needs a participant to restart in the middle of one, which the
failover and move tests cannot time."""
import time
from types import SimpleNamespace

import pytest

from appliance.zvm.errors import CheckpointLost, Unavailable
from appliance.zvm.events import Events
from appliance.zvm.store import Store
from appliance.zvm.vpgs import Vpgs

VPG = {"name": "vpg-a", "identifier": "v1", "state": {"status": "MeetingSLA"}, "role": "protected"}


def _vpgs(listings, taken=()):
    """A Vpgs whose recovery site answers ``listings`` one after the other (the last one from
    then on), and whose leader takes the checkpoints ``taken``, all valid."""
    v = Vpgs.__new__(Vpgs)
    answers = iter(listings)
    last = []

    def checkpoints(vpg):
        nonlocal last
        last = next(answers, last)
        return [{"id": k, "time": float(k), "tag": None} for k in last]

    ids = iter(taken)
    v.checkpoints = checkpoints
    v.take_checkpoint = lambda vpg, tag=None: {"id": next(ids), "valid": True}
    return v


def test_a_listed_checkpoint_is_returned():
    v = _vpgs([[], [7], [7, 10]])
    assert v.wait_recoverable(VPG, 10, time.monotonic() + 10)["id"] == 10


def test_a_lost_checkpoint_fails_at_once_not_at_the_deadline():
    v = _vpgs([[7], [7, 12]])                # 10 never comes: 12, taken after it, is listed
    t0 = time.monotonic()
    with pytest.raises(CheckpointLost, match=r"checkpoint 10 .*a later one, 12, is"):
        v.wait_recoverable(VPG, 10, t0 + 60)
    assert time.monotonic() - t0 < 5
    assert issubclass(CheckpointLost, Unavailable)   # callers that handle Unavailable still do
    assert _vpgs([[12]]).wait_recoverable(VPG, 10, t0 + 60, required=False) is None


def test_the_deadline_still_holds_when_nothing_later_is_listed():
    v = _vpgs([[7]])
    with pytest.raises(Unavailable) as err:
        v.wait_recoverable(VPG, 10, time.monotonic() + 0.5)
    assert not isinstance(err.value, CheckpointLost)


def test_a_lost_checkpoint_is_replaced_by_a_new_one_and_recorded(tmp_path):
    v = _vpgs([[7], [7, 12], [7, 12], [7, 12, 13]], taken=[10, 13])
    events = Events(Store(tmp_path / "zvm.db"), lambda: {"identifier": "site-a"})
    v.zvm = SimpleNamespace(events=events)
    cp, entry = v.recoverable_checkpoint(VPG, None, time.monotonic() + 30)
    assert cp["id"] == 13 and entry["id"] == 13
    [ev] = events.list()
    assert ev["eventTypeName"] == "CheckpointLost" and not ev["eventCompletedSuccessfully"]
    assert ev["relatedEntities"]["vpgs"][0]["identifier"] == "v1"
    assert "checkpoint 10 of VPG vpg-a was not made recoverable" in ev["description"]
