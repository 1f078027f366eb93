import pytest

from appliance.dss import Pos


def test_pos_orders_by_generation_then_lsn_and_prints():
    assert Pos(1, 9) < Pos(1, 10) < Pos(2, 1)
    assert str(Pos(1, 42)) == "g1:42"
    assert Pos.parse("g3:7") == Pos(3, 7)
    assert Pos.parse(str(Pos(12, 345))) == Pos(12, 345)
    with pytest.raises(ValueError):
        Pos.parse("1:2")
