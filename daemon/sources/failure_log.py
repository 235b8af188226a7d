"""Say a failure that keeps repeating once, then remind now and then: not every retry.

WHY: a hub whose ECG box is unplugged, or whose MetaMotion is away, retries for days. Logging
the same ERROR and "retrying" WARNING on every try (every 30 s at the longest back-off) buried
the journal and every other message in it. The first failure and any *new* cause are logged at
ERROR at once; the same cause again only at DEBUG, with an ERROR reminder every ``remind_s``
that counts the tries; the recovery is logged at INFO with how long it took. The health record
(``errors``, and ``last_error`` on the stats topic and in systemd's STATUS) still sees every
try.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable


class FailureLog:
    """One source's failures, deduplicated for the log (not for the health record)."""

    REMIND_S = 600.0

    def __init__(self, logger: logging.Logger, prefix: str, *, remind_s: float = REMIND_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._prefix = prefix
        self.remind_s = remind_s
        self._clock = clock
        self._message: str | None = None
        self._tries = 0            # of the current cause
        self._since = 0.0          # first try of the current cause
        self._said_at = 0.0
        self._outage_tries = 0     # every failed try since the source last worked, whatever the cause
        self._outage_since = 0.0

    def failed(self, message: str) -> bool:
        """Log one failed try; True when it was said out loud (ERROR), so that the caller's
        "retrying in ..." line can follow it at the same loudness."""
        now = self._clock()
        if self._outage_tries == 0:
            self._outage_since = now
        self._outage_tries += 1
        if message != self._message:
            self._message, self._tries, self._since, self._said_at = message, 1, now, now
            self._log.error("%s: %s", self._prefix, message)
            return True
        self._tries += 1
        if now - self._said_at >= self.remind_s:
            self._said_at = now
            self._log.error("%s: %s (still failing: %d tries in %.0f min)", self._prefix, message,
                            self._tries, (now - self._since) / 60)
            return True
        self._log.debug("%s: %s (try %d)", self._prefix, message, self._tries)
        return False

    def recovered(self) -> None:
        """The source works again: say after how many failed tries (of any cause) and how long
        since the first, and forget the outage."""
        if self._outage_tries > 1:
            self._log.info("%s: working again after %d failed tries in %.0f s", self._prefix, self._outage_tries,
                           self._clock() - self._outage_since)
        self._message = None
        self._tries = self._outage_tries = 0
