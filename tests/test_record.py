"""biod record writes WFDB that the reference implementation (PhysioNet's wfdb) reads back exactly."""
from __future__ import annotations

import stat

import numpy as np
import pytest
import wfdb

from daemon.record import WfdbSignal, WfdbWriter


@pytest.mark.parametrize("fmt", [16, 24])
def test_streamed_record_reads_back_exactly(tmp_path, fmt) -> None:
    rng = np.random.default_rng(1)
    top = 2 ** (fmt - 1) - 1
    chunks = [rng.integers(-top, top, size=(n, 3)) for n in (1, 7, 500, 33)]
    chunks[0][0] = [top, -top, 0]  # extremes survive
    sigs = [WfdbSignal(n, "mV", 2000.0, fmt) for n in ("I", "II", "III")]
    with WfdbWriter(tmp_path, "rec1", 500, sigs, comments=["person alice"]) as w:
        w.write_digital(chunks[0])
        w.label("activity", "rest")
        w.write_digital(chunks[1])
        w.flush()
        w.write_digital(chunks[2])
        w.label("activity", "walking")
        w.write_digital(chunks[3])
    rec = wfdb.rdrecord(str(tmp_path / "rec1"), physical=False)
    assert rec.fs == 500 and rec.sig_name == ["I", "II", "III"]
    np.testing.assert_array_equal(rec.d_signal, np.concatenate(chunks))
    assert "person alice" in rec.comments
    assert any("activity=walking samples 508-541" in c for c in rec.comments)
    for suffix in (".dat", ".hea", ".labels.csv"):
        assert stat.S_IMODE((tmp_path / f"rec1{suffix}").stat().st_mode) == 0o600, suffix
    labels = (tmp_path / "rec1.labels.csv").read_text().splitlines()
    assert labels[1:] == ["1,508,activity,rest", "508,541,activity,walking"]


def test_physical_values_use_the_gain(tmp_path) -> None:
    mv = np.array([[0.5, -1.25], [2.0, 0.0]])
    with WfdbWriter(tmp_path, "p", 250, [WfdbSignal("I", "mV", 1000.0), WfdbSignal("II", "mV", 1000.0)]) as w:
        w.write_physical(mv)
    rec = wfdb.rdrecord(str(tmp_path / "p"))
    np.testing.assert_allclose(rec.p_signal, mv, atol=1e-3)


def test_header_is_valid_after_every_flush(tmp_path) -> None:
    """A power cut after a flush leaves a readable record (the header is rewritten atomically)."""
    w = WfdbWriter(tmp_path, "live", 100, [WfdbSignal("ax", "g", 16384.0)])
    w.write_digital(np.arange(10).reshape(-1, 1))
    w.flush()
    rec = wfdb.rdrecord(str(tmp_path / "live"), physical=False)
    assert rec.sig_len == 10
    w.close()


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="format"):
        WfdbSignal("I", "mV", 1.0, fmt=212)
    with pytest.raises(ValueError, match="share a storage format"):
        WfdbWriter(tmp_path, "x", 100, [WfdbSignal("a", "g", 1.0, 16), WfdbSignal("b", "g", 1.0, 24)])
    w = WfdbWriter(tmp_path, "y", 100, [WfdbSignal("a", "g", 1.0)])
    with pytest.raises(ValueError, match=r"expected \(n, 1\)"):
        w.write_digital(np.zeros((3, 2)))
    w.close()
