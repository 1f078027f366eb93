"""appliance.pagecache: what the page cache holds of a file, and dropping it (the cold reads
of the segment tests and of bench/journal.py rest on it)."""
import os
import tempfile

import pytest

from appliance import pagecache

PAGE = os.sysconf("SC_PAGE_SIZE")


def _write(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fdatasync(f.fileno())


def test_written_pages_are_resident_until_dropped_and_a_read_brings_them_back(tmp_path):
    path = str(tmp_path / "f")
    _write(path, 256 * PAGE)
    assert pagecache.resident_pages(path) > 0               # just written: cached
    assert pagecache.drop([path]) is True
    assert pagecache.resident_pages(path) == 0
    with open(path, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)   # no readahead
        f.seek(100 * PAGE)
        f.read(PAGE)
    assert 1 <= pagecache.resident_pages(path) < 256
    assert pagecache.resident_pages(path) == pagecache.resident_pages(path)   # asking reads nothing


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert pagecache.resident_pages(str(empty)) == 0
    assert pagecache.drop([str(empty)]) is True
    with pytest.raises(FileNotFoundError):
        pagecache.resident_pages(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        pagecache.drop([str(tmp_path / "missing")])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm (tmpfs) here")
def test_a_tmpfs_file_cannot_be_dropped_and_drop_says_so():
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="tidemark-test-")
    os.close(fd)
    try:
        _write(path, 16 * PAGE)
        assert pagecache.drop([path], timeout=0.1) is False
        assert pagecache.resident_pages(path) == 16
    finally:
        os.unlink(path)
