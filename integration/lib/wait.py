"""Polling with deadlines: the only way tests wait for anything."""

import time


class Timeout(AssertionError):
    pass


def wait_for(condition, timeout=30.0, interval=0.05, what="condition"):
    """Poll `condition()` until it returns a truthy value; return that value.

    Exceptions raised by `condition` count as "not yet" and the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise Timeout(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)
