"""FailureLog: a repeating failure is said once, reminded every remind_s, new causes at once."""
from __future__ import annotations

import logging

from daemon.sources.failure_log import FailureLog


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _levels(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_same_cause_once_then_a_reminder_new_cause_at_once_and_the_recovery(caplog) -> None:
    clock = _Clock()
    flog = FailureLog(logging.getLogger("t.failures"), "ecg", remind_s=600, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="t.failures"):
        assert flog.failed("box gone") is True
        for _ in range(19):  # 19 more tries every 30 s: 570 s, inside the reminder interval
            clock.t += 30
            assert flog.failed("box gone") is False
        assert _levels(caplog, logging.ERROR) == ["ecg: box gone"]
        clock.t += 30  # 600 s after the first line: one reminder that counts the tries
        assert flog.failed("box gone") is True
        assert _levels(caplog, logging.ERROR)[-1] == "ecg: box gone (still failing: 21 tries in 10 min)"
        clock.t += 30
        assert flog.failed("permission denied") is True  # another cause is news
        assert _levels(caplog, logging.ERROR)[-1] == "ecg: permission denied"
        clock.t += 30
        flog.failed("permission denied")
        clock.t += 30
        flog.recovered()
        # the whole outage is counted, both causes: 20 + 1 + 2 tries from t = 1000 to 1690 s
        assert _levels(caplog, logging.INFO) == ["ecg: working again after 23 failed tries in 690 s"]
        assert flog.failed("permission denied") is True  # after a recovery the same cause is news again
    assert len(_levels(caplog, logging.ERROR)) == 4


def test_a_single_failure_then_recovery_logs_no_working_again_line(caplog) -> None:
    flog = FailureLog(logging.getLogger("t.failures"), "imu", clock=_Clock())
    with caplog.at_level(logging.DEBUG, logger="t.failures"):
        flog.failed("link lost")
        flog.recovered()
    assert _levels(caplog, logging.INFO) == []
