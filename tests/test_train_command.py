"""`python -m training.train` on folders that hold only some datasets: each part that lacks its
data is skipped with a line naming what is missing; nothing to train is an error, not a traceback."""
from __future__ import annotations

import shutil
from pathlib import Path

from training.train import main

MINI = Path(__file__).parent / "fixtures" / "minidata"  # ecgid, gudb_rpeaks, ludb, mitdb (no IMU data)


def test_a_folder_without_any_dataset_a_model_needs_is_an_error_that_names_them(tmp_path, capsys) -> None:
    (tmp_path / "unrelated").mkdir()
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ECG models: skipped" in err and "gait identity models: skipped" in err
    assert "nothing to train" in err and "sisfall" in err and "ecgid" in err
    assert not (tmp_path / "out").exists()


def test_ecg_without_gudb_is_skipped_not_trained_with_an_empty_activity_head(tmp_path, capsys) -> None:
    for name in ("ecgid", "ludb", "mitdb"):  # gudb_rpeaks missing
        shutil.copytree(MINI / name, tmp_path / name)
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--only", "ecg"]) == 2
    err = capsys.readouterr().err
    assert "ECG models: skipped" in err and "no gudb_rpeaks" in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_imu_parts_follow_the_datasets_present(tmp_path, capsys) -> None:
    """With the ECG datasets only, `--only imu` trains nothing and says which IMU data is missing."""
    for name in ("ecgid", "ludb", "mitdb", "gudb_rpeaks"):
        shutil.copytree(MINI / name, tmp_path / name)
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--only", "imu"]) == 2
    err = capsys.readouterr().err
    assert "IMU models activity, age, gender: skipped" in err and "hugadb, sisfall" in err


def test_a_broken_dataset_fails_its_part_with_one_line_and_a_non_zero_exit(tmp_path, capfd) -> None:
    """The IMU part runs as `python -m training.train_imu` in a child process (its own TensorFlow
    threads): its one-line error reaches the terminal, then the part's."""
    (tmp_path / "sisfall").mkdir()  # present but empty: gender and age try, and cannot
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--only", "imu"]) == 1
    err = capfd.readouterr().err
    assert "error: " in err and "sisfall/metadata.json not found" in err
    assert "imu: FAILED: training.train_imu exited with 2" in err
    assert "Traceback" not in err
