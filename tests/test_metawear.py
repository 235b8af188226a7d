"""MetaWear protocol: byte-exact against facts from MbientLab's SDK tests (MetaWear-SDK-Cpp/test/*.py).

Each expected byte string / value below is copied from the SDK test named in the comment; none is
computed with the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from firmware_protocol import metawear as mw
from firmware_protocol.metawear import Chip, ImuConfig, MetaWearError, Module, NotificationDecoder

H = bytes.fromhex


# --- GATT / ids ---------------------------------------------------------------------------------
def test_gatt_uuids_match_sdk_metawearboard_cpp() -> None:
    assert mw.SERVICE_UUID == "326a9000-85cb-9195-d9dd-464cfbbae75a"
    assert mw.COMMAND_UUID == "326a9001-85cb-9195-d9dd-464cfbbae75a"
    assert mw.NOTIFY_UUID == "326a9006-85cb-9195-d9dd-464cfbbae75a"
    # SDK reads firmware, model, hardware, manufacturer, serial (BOARD_DEV_INFO_CHARS order).
    assert [u[4:8] for u in mw.DEVICE_INFO_READ_ORDER] == ["2a26", "2a24", "2a27", "2a29", "2a25"]


def test_discovery_reads_are_module_reads_in_sdk_order() -> None:
    reads = mw.discovery_reads()
    assert reads[0] == H("0180") and reads[2] == H("0380") and reads[-1] == H("fe80")
    assert H("1180") in reads and H("1380") in reads
    assert all(r[1] == 0x80 and len(r) == 2 for r in reads)
    assert len(reads) == len(set(reads)) == 25


# --- accelerometer config (SDK:test/test_accelerometer_bmi160.py, test_accelerometer_bmi270.py) ---
BMI160_ODR_ROWS = [  # TestAccBmi160Config.test_set_odr (default range ±2 g -> 0x03)
    (0.78125, "03038103"), (1.5625, "03038203"), (3.125, "03038303"), (6.25, "03038403"),
    (12.5, "03032503"), (25, "03032603"), (50, "03032703"), (100, "03032803"),
    (200, "03032903"), (400, "03032a03"), (800, "03032b03"), (1600, "03032c03"),
]
BMI270_ODR_ROWS = [  # TestAccBmi270Config.test_set_odr (default range ±8 g -> 0x02)
    (0.78125, "03032102"), (1.5625, "03032202"), (3.125, "03032302"), (6.25, "03032402"),
    (12.5, "0303a502"), (25, "0303a602"), (50, "0303a702"), (100, "0303a802"),
    (200, "0303a902"), (400, "0303aa02"), (800, "0303ab02"), (1600, "0303ac02"),
]


@pytest.mark.parametrize("odr,expected", BMI160_ODR_ROWS)
def test_bmi160_acc_odr_bytes(odr: float, expected: str) -> None:
    assert mw.acc_config_command(Chip.BMI160, odr, 2.0) == H(expected)


@pytest.mark.parametrize("odr,expected", BMI270_ODR_ROWS)
def test_bmi270_acc_odr_bytes(odr: float, expected: str) -> None:
    assert mw.acc_config_command(Chip.BMI270, odr, 8.0) == H(expected)


def test_acc_range_bytes_both_chips() -> None:
    assert mw.acc_config_command(Chip.BMI160, 100, 2.0) == H("03032803")  # brief / BMI160_DEFAULT_CONFIG
    assert mw.acc_config_command(Chip.BMI160, 100, 16.0) == H("0303280c")  # test_set_range
    assert mw.acc_config_command(Chip.BMI160, 200, 8.0) == H("03032908")  # test_set_odr_and_range
    assert mw.acc_config_command(Chip.BMI270, 100, 8.0) == H("0303a802")  # brief / BMI270 default
    assert mw.acc_config_command(Chip.BMI270, 100, 16.0) == H("0303a803")  # test_set_range
    assert mw.acc_config_command(Chip.BMI270, 200, 8.0) == H("0303a902")  # test_set_odr_and_range


@pytest.mark.parametrize("chip", list(Chip))
def test_acc_config_parse_inverts_command(chip: Chip) -> None:
    for odr in mw.ACC_ODRS_HZ:
        for rng in mw.ACC_RANGES_G:
            cmd = mw.acc_config_command(chip, odr, rng)
            assert mw.parse_acc_config(chip, cmd[2:]) == (odr, rng)


# --- gyro config (SDK:test/test_gyro_bmi160.py) ----------------------------------------------------
def test_gyro_config_bytes() -> None:
    assert mw.gyro_config_command(200, 2000) == H("13032900")  # test_mbl_mw_gyro_bmi160_set_odr
    assert mw.gyro_config_command(100, 250) == H("13032803")  # test_mbl_mw_gyro_bmi160_set_fsr
    assert mw.gyro_config_command(50, 125) == H("13032704")  # test_mbl_mw_gyro_bmi160_set_all_config
    for odr in mw.GYRO_ODRS_HZ:
        for rng in mw.GYRO_RANGES_DPS:
            assert mw.parse_gyro_config(mw.gyro_config_command(odr, rng)[2:]) == (odr, rng)


def test_configure_commands_are_acc_then_gyro() -> None:
    cfg = ImuConfig(Chip.BMI160, 200, 8.0, 2000.0)
    assert mw.configure_commands(cfg) == [H("03032908"), H("13032900")]
    cfg = ImuConfig(Chip.BMI270, 100, 16.0, 250.0)
    assert mw.configure_commands(cfg) == [H("0303a803"), H("13032803")]


# --- start / stop / subscribe -------------------------------------------------------------------
def test_start_stop_bmi160_normal() -> None:
    cfg = ImuConfig(Chip.BMI160, 100, 4.0, 500.0, packed=False)
    # subscribe acc [03 04 01] (TestBmi160AccelerationData), gyro [13 05 01] (TestGyroBmi160DataHandler),
    # enable_acceleration_sampling [03 02 01 00], acc start [03 01 01] (bosch start),
    # enable_rotation_sampling [13 02 01 00], gyro start [13 01 01] (test_gyro_active).
    assert mw.start_commands(cfg) == [H("030401"), H("130501"), H("03020100"), H("030101"),
                                      H("13020100"), H("130101")]
    # stop [03 01 00], disable [03 02 00 01], gyro standby [13 01 00], disable [13 02 00 01],
    # unsubscribe [03 04 00], [13 05 00].
    assert mw.stop_commands(cfg) == [H("030100"), H("03020001"), H("130100"), H("13020001"),
                                     H("030400"), H("130500")]


def test_start_stop_packed_registers_per_chip() -> None:
    r = ImuConfig(Chip.BMI160, 100, packed=True)
    s = ImuConfig(Chip.BMI270, 100, packed=True)
    assert mw.start_commands(r)[:2] == [H("031c01"), H("130701")]  # TestBmi160HighFreqAccData / gyro packed
    assert mw.stop_commands(r)[-2:] == [H("031c00"), H("130700")]
    assert mw.start_commands(s)[:2] == [H("030501"), H("130501")]  # TestBmi270HighFreqAccData; gyro_bosch_register.h
    assert mw.start_commands(ImuConfig(Chip.BMI270, 100))[:2] == [H("030401"), H("130401")]
    # BMI270 power mode: [03 01 01] when filter_perf is set (>= 12.5 Hz) — the same enable as BMI160.
    assert mw.start_commands(s)[2:4] == [H("03020100"), H("030101")]


# --- data decoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("chip", list(Chip))
def test_acc_notification_4g(chip: Chip) -> None:
    # TestBmi160AccelerationData / TestBmi270AccelerationData.test_get_acceleration_data_g
    (ev,) = NotificationDecoder(ImuConfig(chip, 100, 4.0)).feed(H("030416c494a22ad0"))
    assert isinstance(ev, mw.AccSamples) and not ev.packed
    assert ev.values_g.dtype == np.float32 and ev.values_g.shape == (1, 3)
    np.testing.assert_allclose(ev.values_g[0], [-1.872, -2.919, -1.495], atol=1e-3)
    np.testing.assert_allclose(ev.si[0], np.array([-1.872, -2.919, -1.495]) * 9.80665, atol=1e-2)


def test_bmi160_gyro_notification_500dps() -> None:
    # TestGyroBmi160DataHandler.test_rotation_data_handler
    (ev,) = NotificationDecoder(ImuConfig(Chip.BMI160, 100, 2.0, 500.0)).feed(H("13053e43ff7f0080"))
    assert isinstance(ev, mw.GyroSamples)
    np.testing.assert_allclose(ev.dps[0], [262.409, 499.497, -499.512], atol=1e-3)
    np.testing.assert_allclose(ev.rad_s[0], np.deg2rad([262.409, 499.497, -499.512]), atol=1e-5)


@pytest.mark.parametrize("chip,reg", [(Chip.BMI160, 0x1C), (Chip.BMI270, 0x05)])
def test_packed_acc_8g(chip: Chip, reg: int) -> None:
    # TestBmi160HighFreqAccData / TestBmi270HighFreqAccData.test_get_acceleration_data_g
    data = bytes((0x03, reg)) + H("62b7530de9fd16d04d0e57028affa1050a01")
    (ev,) = NotificationDecoder(ImuConfig(chip, 100, 8.0)).feed(data)
    assert isinstance(ev, mw.AccSamples) and ev.packed and ev.values_g.shape == (3, 3)
    np.testing.assert_allclose(ev.values_g, [[-4.539, 0.833, -0.131], [-2.995, 0.894, 0.146],
                                             [-0.029, 0.352, 0.065]], atol=1e-3)


def test_packed_gyro_bmi160_1000dps() -> None:
    # TestGyroBmi160HighFreqDataHandler.test_rotation_data_handler
    data = H("130709 15ad2608de8a1a0d2665e48d20ac2773ec".replace(" ", ""))
    (ev,) = NotificationDecoder(ImuConfig(Chip.BMI160, 100, 2.0, 1000.0)).feed(data)
    assert isinstance(ev, mw.GyroSamples) and ev.packed
    np.testing.assert_allclose(ev.dps, [[164.177, 301.860, -265.122], [207.134, 296.982, -215.457],
                                        [254.055, 309.634, -152.591]], atol=1e-3)


def test_bmi270_gyro_uses_register_4_not_5() -> None:
    dec = NotificationDecoder(ImuConfig(Chip.BMI270, 100, 2.0, 500.0))
    (ev,) = dec.feed(H("13043e43ff7f0080"))
    assert isinstance(ev, mw.GyroSamples)
    np.testing.assert_allclose(ev.dps[0], [262.409, 499.497, -499.512], atol=1e-3)
    # On the BMI270, 13 05 is *packed* gyro; an 8-byte 13 05 is malformed, not silently misread.
    (bad,) = dec.feed(H("13053e43ff7f0080"))
    assert isinstance(bad, mw.Unknown) and "20 bytes" in bad.reason


def test_scale_matches_range_tables() -> None:
    raw = np.array([[32767, -32768, 1]], dtype="<i2")
    for rng, lsb in zip(mw.ACC_RANGES_G, (16384, 8192, 4096, 2048)):
        (ev,) = NotificationDecoder(ImuConfig(Chip.BMI270, 100, rng)).feed(H("0304") + raw.tobytes())
        np.testing.assert_array_equal(ev.raw, raw)
        np.testing.assert_allclose(ev.values_g, raw / lsb, rtol=1e-6)
    for rng, lsb in zip(mw.GYRO_RANGES_DPS, (16.4, 32.8, 65.6, 131.2, 262.4)):
        (ev,) = NotificationDecoder(ImuConfig(Chip.BMI160, 100, 2.0, rng)).feed(H("1305") + raw.tobytes())
        np.testing.assert_allclose(ev.dps, raw / lsb, rtol=1e-6)


# --- settings / debug / logging -----------------------------------------------------------------
def test_battery_read_and_answer() -> None:
    # TestSettingsRevision3: read [0x11, 0x8c]; answer 11 8c 63 34 10 -> charge 99, voltage 4148
    assert mw.battery_read() == H("118c")
    dec = NotificationDecoder(ImuConfig(Chip.BMI160))
    assert dec.feed(H("118c633410")) == [mw.Battery(percent=99, voltage_mv=4148)]
    assert dec.feed(H("11cc633410")) == [mw.Battery(percent=99, voltage_mv=4148)]  # silent-read echo
    (bad,) = dec.feed(H("118c63"))
    assert isinstance(bad, mw.Unknown) and "5 bytes" in bad.reason


def test_connection_parameters_bytes() -> None:
    # TestSettings.test_set_conn_params: (750, 1000, 128, 16384)
    assert mw.connection_parameters(750.0, 1000.0, 128, 16384) == H("11095802200380006606")
    # SDK example stream_acc_gyro_bmi270.py uses (7.5, 7.5, 0, 6000): 6, 6, 0, 600
    assert mw.connection_parameters(7.5, 7.5, 0, 6000) == H("1109060006000000" "5802")
    with pytest.raises(MetaWearError, match="7.5"):
        mw.connection_parameters(5.0, 10.0, 0, 6000)
    with pytest.raises(MetaWearError, match="latency"):
        mw.connection_parameters(7.5, 10.0, 500, 6000)
    with pytest.raises(MetaWearError, match="timeout"):
        mw.connection_parameters(7.5, 10.0, 0, 50)


def test_debug_disconnect_and_logging_time() -> None:
    assert mw.disconnect() == H("fe06")  # TestDebug.test_mbl_mw_debug_disconnect
    assert mw.logging_time_read() == H("0b84")
    # SDK:test/common.py answers 0b 84 with 0b 84 15 04 00 00 05
    assert NotificationDecoder(ImuConfig(Chip.BMI160)).feed(H("0b8415040000" "05")) == [
        mw.LoggingTime(tick=0x415, reset_uid=5)]


# --- discovery / identification (answers from SDK:test/common.py) -------------------------------
MMR = {0x03: "03800101", 0x13: "13800001", 0x14: "14800000", 0x11: "11800003", 0x0E: "0e80"}
MMS = {0x03: "03800400", 0x13: "13800100", 0x14: "14800000", 0x11: "118000090700"}


def _infos(answers: dict[int, str]) -> dict[int, mw.ModuleInfo]:
    return {k: mw.parse_module_info(H(v)) for k, v in answers.items()}


def test_parse_module_info() -> None:
    info = mw.parse_module_info(H("118000090700"))
    assert info == mw.ModuleInfo(0x11, True, 0, 9, H("0700"))
    assert mw.parse_module_info(H("0e80")) == mw.ModuleInfo(0x0E, False)
    with pytest.raises(MetaWearError):
        mw.parse_module_info(H("0301"))


def test_identify_r_rl_s() -> None:
    r = mw.identify(_infos(MMR), model_number="5")
    assert (r.name, r.chip, r.packed_acc, r.packed_gyro) == ("MetaMotion R", Chip.BMI160, True, True)
    rl = _infos(MMR)
    rl[0x14] = mw.parse_module_info(H("1480"))
    assert mw.identify(rl).name == "MetaMotion RL"
    s = mw.identify(_infos(MMS), model_number="8")
    assert (s.name, s.chip) == ("MetaMotion S", Chip.BMI270)
    old = _infos(MMR)
    old[0x03] = mw.parse_module_info(H("03800100"))  # BMI160 revision 0: no packed acc
    assert mw.identify(old).packed_acc is False


def test_identify_rejects_other_boards() -> None:
    with pytest.raises(mw.UnsupportedBoardError, match="accelerometer"):
        mw.identify({})
    mma = _infos(MMR)
    mma[0x03] = mw.parse_module_info(H("03800000"))  # MetaWear R: MMA8452Q (impl 0)
    with pytest.raises(mw.UnsupportedBoardError, match="BMI160"):
        mw.identify(mma)
    with pytest.raises(mw.UnsupportedBoardError, match="model number"):
        mw.identify(_infos(MMS), model_number="5")


# --- configuration validation -------------------------------------------------------------------
def test_imu_config_validation_messages() -> None:
    with pytest.raises(MetaWearError, match="choose one of: 25, 50, 100, 200, 400, 800"):
        ImuConfig(Chip.BMI160, odr_hz=90)
    with pytest.raises(MetaWearError, match="accelerometer range"):
        ImuConfig(Chip.BMI160, acc_range_g=3)
    with pytest.raises(MetaWearError, match="gyroscope range"):
        ImuConfig(Chip.BMI270, gyro_range_dps=300)
    with pytest.raises(MetaWearError, match="chip"):
        ImuConfig("BMI160")  # type: ignore[arg-type]
    assert ImuConfig(Chip.BMI160, 100, packed=True).notifications_per_second == pytest.approx(100 / 3)


def test_nearest_odr() -> None:
    assert mw.nearest_odr(90) == 100.0
    assert mw.nearest_odr(1e4) == 800.0
    assert mw.nearest_odr(1.0) == 25.0
    assert mw.nearest_odr(12.5, mw.ACC_ODRS_HZ) == 12.5
    with pytest.raises(MetaWearError):
        mw.nearest_odr(0)


def test_decoder_keeps_unknown_and_malformed() -> None:
    dec = NotificationDecoder(ImuConfig(Chip.BMI160))
    (u,) = dec.feed(H("0a02ff"))
    assert isinstance(u, mw.Unknown) and u.data == H("0a02ff")
    (short,) = dec.feed(H("03"))
    assert isinstance(short, mw.Unknown) and "header" in short.reason
    (trunc,) = dec.feed(H("030416c494a22a"))
    assert isinstance(trunc, mw.Unknown) and "8 bytes" in trunc.reason
    (cfg,) = dec.feed(H("03832803"))
    assert cfg == mw.ConfigReadback(Module.ACCELEROMETER, H("2803"))
