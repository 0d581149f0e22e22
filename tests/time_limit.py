"""A wall-clock limit for one call in a test: a hang fails the example instead of stalling the suite."""

import contextlib
import signal


class Hang(Exception):
    """Raised by `time_limit` when a call runs past its budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `Hang` in the main thread after `seconds` of wall-clock time (SIGALRM: main thread only)."""

    def expire(signum, frame):
        raise Hang(f"the call ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
