"""What the page cache holds of a file, and dropping it: for cold reads in tests and benches.

``POSIX_FADV_DONTNEED`` is advice. Pages whose writeback has only just finished, or that sit
in another CPU's LRU batch, can stay after it; asked again a moment later the kernel drops
them (here: one call was enough in 36 of 40 tries, two to four in the rest). So ``drop``
repeats the advice until ``mincore(2)`` shows no page of the files resident, within a time
limit, and says whether it got there: on a tmpfs, for one, the page cache is the file and
nothing can be dropped.

``resident_pages`` maps the file without touching the mapping, so asking reads nothing in (a
non-blocking read, ``RWF_NOWAIT``, of a page the cache lacks starts reading it).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: str) -> int:
    """How many of the file's pages the page cache holds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {path}: {os.strerror(err)}")
        try:
            vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            if _libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore of {path}: {os.strerror(err)}")
            return sum(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop(paths, timeout: float = 5.0) -> bool:
    """Write back the files and drop them from the page cache; True once no page of them is
    resident, False if some still are after ``timeout`` seconds."""
    paths = list(paths)
    deadline = time.monotonic() + timeout
    while True:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if not any(resident_pages(p) for p in paths):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
