"""Opening the journal's RocksDB: column families and the option choices, each with its reason."""
from __future__ import annotations

import functools
import traceback

from rocksdict import (BlockBasedOptions, Cache, DBCompactionStyle, DBCompressionType, Options, Rdict,
                       WriteOptions)

MiB = 1 << 20

ENTRIES_CF = "entries"   # one record per replicated write (header + where its data is), by VPG and position
INDEX_CF = "index"       # one small record per (VPG, VM, disk, 4 KiB block, position)


def _common(write_buffer: int, cache: Cache, *, bloom: bool, block_size: int) -> Options:
    o = Options(raw_mode=True)
    # Journal data is mostly incompressible guest data and is written once, read rarely:
    # compression would cost CPU on the ingest path for little gain.
    o.set_compression_type(DBCompressionType.none())
    o.set_compaction_style(DBCompactionStyle.level())
    o.set_level_compaction_dynamic_level_bytes(True)
    # Larger memtables: fewer, larger L0 files for a write-heavy stream.
    o.set_write_buffer_size(write_buffer)
    o.set_max_write_buffer_number(4)
    o.set_target_file_size_base(64 * MiB)
    t = BlockBasedOptions()
    t.set_block_cache(cache)
    t.set_block_size(block_size)
    t.set_cache_index_and_filter_blocks(False)
    if bloom:
        # Entries are fetched by exact key (point lookups): a bloom filter saves SST probes.
        # The index column family is only ever read with seeks, where whole-key blooms do not help.
        t.set_bloom_filter(10, False)
    o.set_block_based_table_factory(t)
    return o


def open_db(path: str) -> tuple[Rdict, Cache]:
    """Open (creating if needed) the journal database; RocksDB replays its WAL on open."""
    cache = Cache(256 * MiB)
    main = _common(16 * MiB, cache, bloom=True, block_size=4096)
    main.create_if_missing(True)
    main.create_missing_column_families(True)
    # Two cores: one flush and one compaction at a time is enough and leaves the CPU to ingest.
    main.set_max_background_jobs(2)
    main.set_bytes_per_sync(MiB)
    main.set_wal_bytes_per_sync(0)
    main.set_keep_log_file_num(4)
    cfs = {
        # Values are 72 bytes (48 + data in format 2 journals): 16 KiB blocks keep old inline
        # entries from straddling blocks.
        ENTRIES_CF: _common(128 * MiB, cache, bloom=True, block_size=16 * 1024),
        # 54-byte records: the whole index of a large journal stays in the block cache.
        INDEX_CF: _common(64 * MiB, cache, bloom=False, block_size=4096),
    }
    return Rdict(path, main, column_families=cfs), cache


def write_options(sync: bool) -> WriteOptions:
    """WAL always on; ``sync`` fsyncs the WAL before a write returns (holding the GIL meanwhile)."""
    w = WriteOptions()
    w.sync = sync
    return w


def releases_iterators(fn):
    """On an exception, clear the locals of the frames it passed through below ``fn``'s caller.

    A RocksDB iterator keeps the whole database open (and its LOCK held) for as long as it
    lives; an exception's traceback keeps the frames that raised it, and their iterators,
    alive. Without this, a caller that keeps an exception (a log record, pytest) could never
    reopen the journal after ``close``.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            tb = exc.__traceback__
            traceback.clear_frames(tb.tb_next if tb is not None else None)
            raise
    return wrapper
