"""The daemon's two clocks: durations on the monotonic clock, timestamps in epoch seconds.

WHY: every duration the daemon acts on (a session gone stale after 30 s, identity evidence
older than its window, an enrolment's 90 s, the ECG silent for 3 s, uptime) is a difference of
two readings. On the wall clock (``time.time()``) such a difference jumps when NTP steps the
clock, and a Raspberry Pi has no RTC: at boot it resumes from the last shutdown's time and is
stepped forward by hours once the network is up. On the wall clock that step ended the wearing
session, started a new one, emptied the identity pools and finished an enrolment at once.

So the runtime reads ``time.monotonic()`` for its ``now`` and converts to epoch seconds only
where a time leaves the process (event ``start_time``/``end_time``, ``since``, ``last_seen``,
``until``), with the wall clock of that moment: a session that began before a step is reported
in the corrected clock, and its duration stays what really elapsed."""
from __future__ import annotations

import time


def to_epoch(t: float) -> float:
    """Epoch seconds of the monotonic reading ``t``, by the wall clock of this moment."""
    return time.time() - (time.monotonic() - t)
