"""`biod demo` (the README's first command) end to end: embedded broker, three enrolments from
real ECG-ID recordings of persons outside every model's training data, one box on the shelf
whose wearers change, and the events read back over MQTT. The demo is what a new user sees first,
so it must run clean: no ERROR line, every person announced, the stranger not named."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_demo_identifies_the_household_and_logs_no_error() -> None:
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "demo"], cwd=REPO, capture_output=True,
                         text=True, timeout=280)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert not re.search(r"\b(ERROR|CRITICAL|Traceback)\b", out), out
    assert out.count("calibrate ") == 3 and out.count("accepted: ok") == 3, out
    got = dict(re.findall(r"^  (alice|bob|carol|a stranger)\s+-> (\S+)", res.stdout, re.M))
    assert got == {"alice": "alice", "bob": "bob", "carol": "carol", "a stranger": "unknown"}, out
    # each wearer: one session announced and ended by taking the electrodes off, nothing in between
    kinds = re.findall(r"EVENT (new|update|end)\s+wearer='([^']+)'", res.stdout)
    assert [k for k, _ in kinds if k != "update"] == ["new", "end"] * 4, out
    # the demo household's templates and spool do not outlive the demo
    state = re.search(r"state in (\S+) \(removed at the end\)", res.stdout)
    assert state is not None and not Path(state.group(1)).exists(), out
