"""Bounded waiting for tests: poll a condition until it holds or a deadline passes."""
import time


def wait_until(pred, timeout=30, step=0.1, what="condition"):
    """The first truthy value of ``pred()``; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")
