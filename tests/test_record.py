"""biod record writes WFDB that the reference implementation (PhysioNet's wfdb) reads back exactly."""
from __future__ import annotations

import re
import stat
from pathlib import Path

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


def test_labels_are_on_disk_after_every_flush(tmp_path) -> None:
    """A recording killed between flushes keeps its label up to the last flushed sample."""
    w = WfdbWriter(tmp_path, "killed", 100, [WfdbSignal("ax", "g", 4096.0)])
    w.label("activity", "walking")
    w.write_digital(np.zeros((50, 1)))
    w.flush()
    assert (tmp_path / "killed.labels.csv").read_text().splitlines()[1:] == ["0,50,activity,walking"]
    w.close()


def test_record_refuses_an_unknown_label_before_recording(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "daemon.cli", "record", "--out", str(tmp_path / "r"),
                          "--label", "jogging"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "'jogging' is not an activity" in res.stderr and "running" in res.stderr
    assert not (tmp_path / "r").exists()


def test_sigterm_ends_a_recording_with_its_files_complete(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(f"hub:\n  id: r\nstate_dir: {tmp_path / 'state'}\n"
                   "ecg:\n  source: emulator\n  emulator:\n    recording: ludb-16\n    speed: 1\n")
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "record", "--config", str(cfg), "--out",
                             str(tmp_path / "r"), "--seconds", "60", "--label", "sitting"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def counted() -> int:  # samples the header says are on disk (it is rewritten at every flush)
        heads = list((tmp_path / "r").glob("ecg_*.hea"))
        return int(heads[0].read_text().split()[3]) if heads and heads[0].read_text() else 0

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (list((tmp_path / "r").glob("ecg_*.labels.csv")) and counted() >= 500):
        time.sleep(0.2)  # a second of ECG flushed, labels included
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "stopped; keeping what was recorded" in err and "of ECG" in out
    (hea,) = (tmp_path / "r").glob("ecg_*.hea")
    rec = wfdb.rdrecord(str(hea.with_suffix("")))
    labels = hea.with_name(hea.stem + ".labels.csv").read_text().splitlines()[1:]
    assert labels == [f"0,{rec.sig_len},activity,sitting"] and rec.sig_len >= 500


def test_training_splits_a_recording_at_the_gaps_it_notes(tmp_path) -> None:
    """`biod record` notes where the IMU lost samples; the fine-tuning loader never lets a
    window span one (the samples before and after are not contiguous in time)."""
    from training.data.imu import load_biod_imu

    sigs = [WfdbSignal(n, "g" if n.startswith("acc") else "deg/s", 4096.0 if n.startswith("acc") else 32.768)
            for n in ("acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z")]
    w = WfdbWriter(tmp_path, "imu_1", 100, sigs, ["placement thigh", "person ann"])
    w.label("activity", "walking")
    x = np.zeros((300, 6))
    x[:, 2] = 1.0  # 1 g on z
    w.write_physical(x)
    w.comments.append("gap before sample 300 (~40 samples lost)")
    w.write_physical(x[:200])
    w.close()
    a, b = load_biod_imu(tmp_path)
    assert (len(a.si), len(b.si)) == (300, 200) and a.file == "imu_1#0" and b.subject == "ann"
    assert np.allclose(a.si[:, 2], 9.80665, atol=0.01) and set(b.labels.tolist()) == {1}


@pytest.mark.parametrize("fmt", [16, 24])
def test_read_wfdb_reads_back_what_biod_record_writes(tmp_path, fmt) -> None:
    from daemon.record import read_wfdb

    rng = np.random.default_rng(3)
    mv = rng.normal(scale=1.5, size=(777, 3))
    with WfdbWriter(tmp_path, "ecg_x", 500, [WfdbSignal(n, "mV", 1000.0, fmt) for n in ("I", "II", "III")],
                    comments=["person ann", "placement waist"]) as w:
        w.write_physical(mv[:300])
        w.write_physical(mv[300:])
    rec = read_wfdb(tmp_path / "ecg_x.hea")
    assert rec.fs_hz == 500 and rec.names == ("I", "II", "III") and rec.signals[0].fmt == fmt
    ref = wfdb.rdrecord(str(tmp_path / "ecg_x")).p_signal  # the reference reader agrees
    np.testing.assert_allclose(rec.physical, ref, atol=1e-12)
    top = (2 ** (fmt - 1) - 1) / 1000.0  # within the format's range the values are exact to 1 LSB
    np.testing.assert_allclose(rec.physical, np.clip(np.rint(mv * 1000) / 1000, -top, top), atol=1e-12)
    assert rec.comment_fields() == {"person": "ann", "placement": "waist"}


def test_read_wfdb_handles_baselines_and_refuses_what_it_cannot_read(tmp_path) -> None:
    from daemon.record import WfdbError, read_wfdb

    x = np.random.default_rng(0).normal(size=(400, 2))
    wfdb.wrsamp("b", fs=250, units=["mV", "uV"], sig_name=["I", "II"], p_signal=x, fmt=["16", "16"],
                adc_gain=[200, 400], baseline=[10, -5], write_dir=str(tmp_path))
    rec = read_wfdb(tmp_path / "b")  # the .hea suffix may be left out
    np.testing.assert_allclose(rec.physical, wfdb.rdrecord(str(tmp_path / "b")).p_signal, atol=1e-12)
    assert [s.unit for s in rec.signals] == ["mV", "uV"]
    wfdb.wrsamp("c", fs=250, units=["mV", "mV"], sig_name=["I", "II"], p_signal=x, fmt=["212", "212"],
                write_dir=str(tmp_path))
    with pytest.raises(WfdbError, match="format 212.*formats 16 and 24"):
        read_wfdb(tmp_path / "c.hea")
    (tmp_path / "b.dat").write_bytes((tmp_path / "b.dat").read_bytes()[:100])
    with pytest.raises(WfdbError, match="holds 25 samples, the header says 400"):
        read_wfdb(tmp_path / "b.hea")
    with pytest.raises(WfdbError, match="cannot read the WFDB header"):
        read_wfdb(tmp_path / "missing.hea")


def test_invalid_samples_are_stored_as_wfdb_no_sample(tmp_path) -> None:
    """A lead marked invalid (its electrode was off) and a stretch of lost time are stored as
    WFDB's "no sample" value, which the reference reader and read_wfdb read as NaN; what was
    measured reads back exactly, and records without invalid samples read as before."""
    from daemon.record import read_wfdb

    mv = np.random.default_rng(5).normal(size=(40, 3))
    with WfdbWriter(tmp_path, "ecg_v", 500, [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")]) as w:
        w.write_physical(mv[:10])
        w.write_physical(mv[10:20], np.array([True, False, False]))  # LL off: only lead I measured
        w.write_no_samples(5)  # frames lost on the link
        w.write_physical(mv[20:40])
    expected = np.ones((45, 3), bool)
    expected[10:20, 1:] = False
    expected[20:25] = False
    ref = wfdb.rdrecord(str(tmp_path / "ecg_v"))
    np.testing.assert_array_equal(~np.isnan(ref.p_signal), expected)  # PhysioNet's reader agrees
    assert (wfdb.rdrecord(str(tmp_path / "ecg_v"), physical=False).d_signal[~expected] == -(1 << 23)).all()
    rec = read_wfdb(tmp_path / "ecg_v.hea")
    np.testing.assert_array_equal(rec.valid, expected)
    measured = np.concatenate([mv[:20], np.zeros((5, 3)), mv[20:]])
    np.testing.assert_allclose(rec.physical[expected], np.rint(measured[expected] * 1000) / 1000, atol=1e-12)


def test_read_wfdb_refuses_a_damaged_header_naming_the_file_and_the_problem(tmp_path) -> None:
    """A header that does not describe its .dat is a WfdbError naming the file and what is wrong,
    never a numpy traceback (a missing signal line was a broadcasting error) nor a record that
    reads (a rate of 0 failed later in the resampler; a negative count read the whole file)."""
    from daemon.record import WfdbError, read_wfdb

    with WfdbWriter(tmp_path, "ecg_h", 500, [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")],
                    comments=["person ann"]) as w:
        w.write_physical(np.zeros((600, 3)))
    good = (tmp_path / "ecg_h.hea").read_text().splitlines()
    head = good[0].split()

    def damaged(lines: list[str]) -> Path:
        (tmp_path / "bad.hea").write_text("\n".join(lines) + "\n")
        return tmp_path / "bad.hea"

    cases = [
        (good[:3] + good[4:], r"announces 3 signal\(s\) but 2 signal line\(s\) follow"),
        ([" ".join([head[0], "3", "0", *head[3:]]), *good[1:]], "sampling frequency 0 .* above 0"),
        ([" ".join([head[0], "3", "500", "-5"]), *good[1:]], "says -5 samples; the count cannot be negative"),
        ([" ".join([head[0], "0", "500", "600"])], "says 0 signals"),
        ([" ".join([head[0], "3", "500", "6x0"]), *good[1:]], "number of samples .* '6x0', not an integer"),
        ([" ".join([head[0], "3", "500", "601"]), *good[1:]], "holds 600 samples, the header says 601"),
        ([], "the header is empty"),
        ([good[0], good[1].replace("1000/mV", "lots/mV"), *good[2:]], "ADC gain on signal line 1 is 'lots'"),
    ]
    for lines, problem in cases:
        with pytest.raises(WfdbError, match=rf"^{re.escape(str(tmp_path))}/(bad\.hea:|ecg_h\.dat) .*{problem}"):
            read_wfdb(damaged(lines))
    # comment lines may stand anywhere in a WFDB header, and the tail of a recording cut off
    # before its header was rewritten (more .dat than the count) is not an error
    rec = read_wfdb(damaged([good[0], "# a note", *good[1:]]))
    assert rec.physical.shape == (600, 3) and "a note" in rec.comments and "person ann" in rec.comments
    with open(tmp_path / "ecg_h.dat", "ab") as f:
        f.write(bytes(9 * 7))
    assert read_wfdb(tmp_path / "ecg_h.hea").physical.shape == (600, 3)


def test_the_ecg_gain_is_stored_at_full_precision(tmp_path) -> None:
    """The box's gain is 1000 / 0.0476837158203125 = 20971.52 counts/mV. Written with 6 digits
    (20971.5) every reader scaled the exact samples 1e-6 off (0.38 uV at full scale); now the
    record reads back bit-exact, with biod's reader and with PhysioNet's."""
    from daemon.record import read_wfdb
    from firmware_protocol.ecg_serial import DEFAULT_UV_PER_LSB, DataFrame, Electrode

    gain = 1000.0 / DEFAULT_UV_PER_LSB
    counts = np.random.default_rng(3).integers(-(1 << 23) + 1, 1 << 23, (2000, 3)).astype(np.int32)
    counts[0] = [(1 << 23) - 1, -(1 << 23) + 1, 20971]
    mv = DataFrame(0, 0, Electrode.NONE, counts).millivolts()  # what the source hands on
    with WfdbWriter(tmp_path, "ecg_g", 500, [WfdbSignal(n, "mV", gain, 24) for n in ("I", "II", "III")]) as w:
        w.write_physical(mv)
    assert " 20971.52/mV " in (tmp_path / "ecg_g.hea").read_text()
    exact = counts.astype(np.float64) * (DEFAULT_UV_PER_LSB / 1000.0)
    own = read_wfdb(tmp_path / "ecg_g.hea")
    assert [s.gain for s in own.signals] == [gain] * 3
    np.testing.assert_array_equal(own.physical, exact)
    ref = wfdb.rdrecord(str(tmp_path / "ecg_g"))
    assert list(ref.adc_gain) == [gain] * 3
    np.testing.assert_array_equal(wfdb.rdrecord(str(tmp_path / "ecg_g"), physical=False).d_signal, counts)
    np.testing.assert_allclose(ref.p_signal, exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("person", ["Ann\nSmith", "Ann\tSmith", "unknown", "  "])
def test_record_refuses_a_person_it_cannot_store_before_recording(tmp_path, capsys, person) -> None:
    """--person goes into every header as a comment line: a newline in it made a record that
    neither biod nor wfdb can read, found out only at replay or training. Refused with biod's
    one name rule, before any device is opened or any file written."""
    from daemon.config import parse_config
    from daemon.record_cli import run_record

    cfg = parse_config(f"hub: {{id: r}}\nstate_dir: {tmp_path / 'state'}\n"
                       "ecg: {source: emulator, emulator: {recording: ludb-16, speed: 20}}\n")
    assert run_record(cfg, tmp_path / "r", 5.0, None, person) == 2
    err = capsys.readouterr().err
    assert err.startswith("biod record: --person: ") and ("control character" in err or "reserved" in err
                                                         or "empty" in err), err
    assert not (tmp_path / "r").exists()


def test_record_stores_a_pasted_person_stripped(tmp_path) -> None:
    """A name pasted with its line end is the name: stored stripped, and the record reads."""
    from daemon.config import parse_config
    from daemon.record import read_wfdb
    from daemon.record_cli import run_record

    cfg = parse_config(f"hub: {{id: r}}\nstate_dir: {tmp_path / 'state'}\n"
                       "ecg: {source: emulator, emulator: {recording: ludb-16, speed: 20}}\n")
    assert run_record(cfg, tmp_path / "r", 1.0, None, "Ann Smith\r\n") == 0
    (hea,) = (tmp_path / "r").glob("ecg_*.hea")
    assert read_wfdb(hea).comment_fields()["person"] == "Ann Smith"
    assert "person Ann Smith" in wfdb.rdheader(str(hea.with_suffix(""))).comments


def test_a_recording_killed_in_its_first_second_keeps_its_samples(tmp_path) -> None:
    """The header is written after the first chunk, not only after a whole second: a record
    killed (SIGKILL, power cut) before that said 0 samples, WFDB's "unknown": biod read nothing
    and wfdb.rdrecord raised."""
    from daemon.record import read_wfdb
    from daemon.record_cli import _Stream

    stream = _Stream(tmp_path, "ecg", "x", [], "sitting")
    sigs = [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")]
    stream.write(500, sigs, np.full((10, 3), 0.5, np.float32), np.ones(3, bool))
    try:  # read as a power cut now would leave it: nothing closed
        assert read_wfdb(tmp_path / "ecg_x.hea").physical.shape == (10, 3)
        assert wfdb.rdrecord(str(tmp_path / "ecg_x")).sig_len == 10
        assert (tmp_path / "ecg_x.labels.csv").read_text().splitlines()[1:] == ["0,10,activity,sitting"]
    finally:
        stream.close()


def test_a_box_restart_is_noted_as_a_joint_not_as_a_gap(tmp_path) -> None:
    """A box that resets and streams on (its frame counter jumps back) lost no frames: the record
    notes the joint as for a reconnect (a replay marks it) and keeps recording, instead of
    filling ~21 minutes with 'no sample'."""
    from daemon.record import read_wfdb
    from daemon.record_cli import _ecg_discontinuity, _Stream
    from daemon.sources.serial_ecg import EcgChunk

    def chunk(seq: int, restarted: bool = False) -> EcgChunk:
        return EcgChunk(seq, seq * 0.02, np.full((10, 3), 0.25, np.float32), np.ones(3, bool), 500,
                        device_restarted=restarted)

    stream = _Stream(tmp_path, "ecg", "x", [], None)
    stream.write(500, [WfdbSignal(n, "mV", 1000.0, 24) for n in ("I", "II", "III")], chunk(1099).samples_mv)
    for c in (chunk(0, restarted=True), chunk(1)):
        _ecg_discontinuity(stream, c, False, 60.0)
        stream.write(c.rate_hz, None, c.samples_mv, c.lead_valid)
    stream.close()
    rec = read_wfdb(tmp_path / "ecg_x.hea")
    assert rec.physical.shape == (30, 3) and rec.valid.all()
    assert [c for c in rec.comments if c.startswith(("gap", "reconnected"))] == [
        "reconnected before sample 10 (the box restarted: its frame counter jumped back; the time between is "
        "unknown and the samples are joined there)"]


def test_a_box_that_goes_away_gives_a_short_record_kept_and_a_non_zero_exit(tmp_path, capsys, monkeypatch) -> None:
    """--seconds counts signal. A box unplugged for good after ~10 s of 60: the record keeps
    what came, the command waits --wait seconds for it to come back, says how short it is and exits 1
    (it had exited 0, and a box that appeared late was cut short by a deadline from the start)."""
    import threading

    from daemon import record_cli
    from daemon.config import parse_config
    from daemon.record import read_wfdb

    real_open = record_cli.open_ecg_source

    def open_and_unplug_later(cfg, put):
        sent = [0]
        box: list = []

        def put_then_unplug(chunk) -> None:  # unplugged after 5 s of signal, counted, not timed
            put(chunk)
            sent[0] += len(chunk.samples_mv)
            if sent[0] >= 5 * 500 and box:
                threading.Thread(target=box.pop().unplug).start()

        source, emulator = real_open(cfg, put_then_unplug)
        box.append(emulator)
        return source, emulator

    monkeypatch.setattr(record_cli, "open_ecg_source", open_and_unplug_later)
    cfg = parse_config(f"hub: {{id: r}}\nstate_dir: {tmp_path / 'state'}\n"
                       "ecg: {source: emulator, emulator: {recording: ludb-16, speed: 20}}\n")
    assert record_cli.run_record(cfg, tmp_path / "r", 60.0, None, None, wait_s=2.0) == 1
    err = capsys.readouterr().err
    assert "biod record: only " in err and "of ECG of the 60 s asked: nothing came for 2 s" in err, err
    (hea,) = (tmp_path / "r").glob("ecg_*.hea")
    kept = read_wfdb(hea).physical.shape[0] / 500.0
    assert 5.0 <= kept < 30.0


def test_record_waits_for_a_quiet_device_as_long_as_asked() -> None:
    """``--wait`` reaches run_record; by default the record outlasts the sources' 30 s reconnect
    back-off twice over, and a wait that is not positive is refused before anything opens."""
    from daemon import record_cli
    from daemon.cli import build_parser
    from daemon.sources.metawear_ble import MetaWearSource
    from daemon.sources.serial_ecg import EcgSource

    parser = build_parser()
    assert parser.parse_args(["record", "--out", "x", "--wait", "90"]).wait == 90.0
    assert parser.parse_args(["record", "--out", "x"]).wait is None
    assert record_cli.QUIET_S >= 2 * max(EcgSource.BACKOFF_S + MetaWearSource.BACKOFF_S)
    with pytest.raises(SystemExit):
        parser.parse_args(["record", "--out", "x", "--wait", "0"])
