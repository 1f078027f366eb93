import random
import uuid

from appliance.dss import Pos
from appliance.dss import keys as K

VM = str(uuid.UUID(int=7))


def test_format_and_parse_are_paired():
    vmb = K.format_vm(VM)
    assert K.parse_vm(vmb) == VM
    assert K.parse_vpg_key(K.format_vpg_key("vpg é")) == "vpg é"
    assert K.parse_state_key(K.format_state_key(5)) == 5
    assert K.parse_disk_key(K.format_disk_key(5, vmb, 3)) == (5, vmb, 3)
    assert K.parse_checkpoint_key(K.format_checkpoint_key(5, Pos(2, 9), 77)) == (5, Pos(2, 9), 77)
    assert K.parse_entry_key(K.format_entry_key(5, Pos(2, 9))) == (5, Pos(2, 9))
    ik = K.format_index_key(5, vmb, 3, 1234, Pos(2, 9))
    assert K.parse_index_key(ik) == (5, vmb, 3, 1234, Pos(2, 9))
    assert ik == K.index_disk_prefix(5, vmb, 3) + K.format_index_tail(1234, Pos(2, 9))
    assert K.index_entry_key(ik) == K.format_entry_key(5, Pos(2, 9))


def test_byte_order_is_logical_order():
    rng = random.Random(1)
    vmb = K.format_vm(VM)
    pos = [Pos(rng.randrange(1, 300), rng.randrange(1, 1 << 40)) for _ in range(300)]
    assert sorted(pos, key=lambda p: K.format_entry_key(1, p)) == sorted(pos)
    idx = [(rng.randrange(1 << 30), p) for p in pos]
    assert sorted(idx, key=lambda t: K.format_index_key(1, vmb, 0, *t)) == sorted(idx)
    assert sorted(pos, key=lambda p: K.format_checkpoint_key(1, p, 0)) == sorted(pos)
    # every key of VPG 1 sorts before every key of VPG 2, and within its range
    lo, hi = K.vpg_key_range(1)
    assert lo <= K.format_entry_key(1, K.MAX_POS) < hi <= K.format_entry_key(2, Pos(0, 0))
    assert lo <= K.format_index_key(1, b"\xff" * 16, 0xFFFF, (1 << 64) - 1, K.MAX_POS) < hi
    clo, chi = K.checkpoint_key_range(1)
    assert clo <= K.checkpoint_key_bound(1, Pos(3, 4)) <= K.format_checkpoint_key(1, Pos(3, 4), 0) < chi
    assert K.format_checkpoint_key(1, Pos(3, 3), (1 << 64) - 1) < K.checkpoint_key_bound(1, Pos(3, 4))
