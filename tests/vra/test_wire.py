"""Replication frames: round trips, and every kind of corruption is caught before use."""
import socket

import pytest

from appliance.vra import wire


def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def recs(n=5):
    return [wire.Rec(wire.R_WRITE, 10 + i, bytes(range(16)), i % 2, i * 4096, bytes([i]) * (1000 + i))
            for i in range(n)]


@pytest.mark.parametrize("compress", [False, True])
def test_batch_round_trip(compress):
    a, b = pair()
    wire.send(a, wire.encode(wire.BATCH, wire.pack_batch(recs()), compress))
    ftype, payload = wire.recv(b)
    assert ftype == wire.BATCH
    got = wire.unpack_batch(payload)
    assert [(r.kind, r.seq, r.vm, r.disk, r.offset, bytes(r.data)) for r in got] == \
        [(r.kind, r.seq, r.vm, r.disk, r.offset, bytes(r.data)) for r in recs()]


def test_compression_is_used_when_it_helps():
    frame = wire.encode(wire.BATCH, bytes(1 << 20), compress=True)
    assert len(frame[1]) < 10000
    frame = wire.encode(wire.BATCH, bytes(1 << 20), compress=False)
    assert len(frame[1]) == 1 << 20


def test_adaptive_compression_pauses_on_incompressible_data_and_comes_back():
    import os
    c = wire.Compression()
    noise, zeros = os.urandom(64 << 10), bytes(64 << 10)
    for i in range(40):                         # incompressible: lz4 runs ever more rarely
        head, payload = wire.encode(wire.BATCH, noise, c)
        assert bytes(payload) == noise and not head[6] & wire.F_LZ4
    assert c.tried <= 6 and c.skipped == 40 - c.tried
    a, b = pair()                               # a raw frame from it reads back as it was
    wire.send(a, wire.encode(wire.BATCH, noise, c))
    assert wire.recv(b)[1] == noise
    while c._skip:                              # the pause ends; compressible data is compressed
        wire.encode(wire.BATCH, zeros, c)
    head, payload = wire.encode(wire.BATCH, zeros, c)
    assert head[6] & wire.F_LZ4 and len(payload) < 1000
    for _ in range(5):                          # and stays so
        head, payload = wire.encode(wire.BATCH, zeros, c)
        assert head[6] & wire.F_LZ4
    wire.send(a, [head, payload])
    assert wire.recv(b)[1] == zeros


@pytest.mark.parametrize("where", [0, 5, 9, 17, 30, 500])
def test_any_flipped_byte_is_detected(where):
    a, b = pair()
    buf = bytearray(b"".join(bytes(x) for x in wire.encode(wire.BATCH, wire.pack_batch(recs()), True)))
    buf[where % len(buf)] ^= 0x40
    a.sendall(buf)
    a.close()
    with pytest.raises((wire.WireError, ConnectionError)):
        wire.unpack_batch(wire.recv(b)[1])


def test_malformed_batches_are_refused():
    good = wire.pack_batch(recs(3))
    for bad in (good[:5], good[:-1], good + b"x"):
        with pytest.raises(wire.WireError):
            wire.unpack_batch(bad)
    r = recs(2)
    r[1].seq = 99                      # not contiguous
    with pytest.raises(wire.WireError):
        wire.unpack_batch(wire.pack_batch(r))


def test_error_frame_raises_connection_error():
    a, b = pair()
    wire.send(a, wire.encode_json(wire.ERROR, {"error": "authentication failed"}))
    with pytest.raises(ConnectionError, match="authentication"):
        wire.recv_json(b, wire.WELCOME)
