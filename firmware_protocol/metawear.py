"""MbientLab MetaWear BLE protocol for MetaMotionR (BMI160) and MetaMotionS (BMI270), sans-I/O.

Why sans-I/O: the daemon's bleak source, the emulator and the tests all need the same bytes. This
module never touches a socket, a thread or bleak; it turns intentions into command ``bytes`` and
notification ``bytes`` into typed events (the h11 pattern). Every constant is taken from MbientLab's
C++ SDK (github.com/mbientlab/MetaWear-SDK-Cpp) and cited next to it as ``SDK:<path>``; the
byte-exact facts from the SDK's own Python tests (``SDK:test/...``) are re-checked in
``tests/test_metawear.py``. ``docs/metawear-protocol.md`` lists every sequence used.

Wire format (SDK:src/metawear/impl/cpp/metawearboard.cpp ``send_command``/``char_changed_handler``):
commands are ``[module, register, data...]`` written without response to :data:`COMMAND_UUID`;
the board answers and streams on :data:`NOTIFY_UUID` with the same ``[module, register, ...]``
header. A read sets bit 0x80 on the register (SDK:src/metawear/core/cpp/register.h ``READ_REGISTER``).
All multi-byte integers are little-endian.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Union

import numpy as np

__all__ = [
    "SERVICE_UUID", "COMMAND_UUID", "NOTIFY_UUID", "DEVICE_INFO_SERVICE_UUID",
    "FIRMWARE_REVISION_UUID", "MODEL_NUMBER_UUID", "HARDWARE_REVISION_UUID",
    "MANUFACTURER_UUID", "SERIAL_NUMBER_UUID", "DEVICE_INFO_READ_ORDER",
    "Module", "Chip", "ModuleInfo", "BoardModel", "ImuConfig", "MetaWearError",
    "UnsupportedBoardError", "READ_BIT", "STANDARD_GRAVITY_MS2",
    "ACC_ODRS_HZ", "GYRO_ODRS_HZ", "STREAM_ODRS_HZ", "ACC_RANGES_G", "GYRO_RANGES_DPS",
    "nearest_odr", "validate", "discovery_reads", "parse_module_info", "identify",
    "acc_config_command", "gyro_config_command", "parse_acc_config", "parse_gyro_config",
    "acc_scale_lsb_per_g", "gyro_scale_lsb_per_dps", "acc_data_register", "gyro_data_register",
    "configure_commands", "start_commands", "stop_commands", "subscribe", "unsubscribe",
    "battery_read", "disconnect", "connection_parameters", "logging_time_read",
    "AccSamples", "GyroSamples", "Battery", "LoggingTime", "ConfigReadback", "Unknown",
    "ImuEvent", "NotificationDecoder",
]

# --- GATT --------------------------------------------------------------------------------------
# SDK:src/metawear/impl/cpp/metawearboard.cpp METAWEAR_SERVICE_NOTIFY_CHAR / METAWEAR_COMMAND_CHAR
SERVICE_UUID = "326a9000-85cb-9195-d9dd-464cfbbae75a"
COMMAND_UUID = "326a9001-85cb-9195-d9dd-464cfbbae75a"  # write without response
NOTIFY_UUID = "326a9006-85cb-9195-d9dd-464cfbbae75a"
# SDK:src/metawear/impl/cpp/metawearboard.cpp DEVICE_INFO_SERVICE_UUID_* / DEV_INFO_*_CHAR
DEVICE_INFO_SERVICE_UUID = "0000180a-0000-1000-8000-00805f9b34fb"
FIRMWARE_REVISION_UUID = "00002a26-0000-1000-8000-00805f9b34fb"
MODEL_NUMBER_UUID = "00002a24-0000-1000-8000-00805f9b34fb"
HARDWARE_REVISION_UUID = "00002a27-0000-1000-8000-00805f9b34fb"
MANUFACTURER_UUID = "00002a29-0000-1000-8000-00805f9b34fb"
SERIAL_NUMBER_UUID = "00002a25-0000-1000-8000-00805f9b34fb"
#: Order in which the SDK reads device information after enabling notifications
#: (SDK:src/metawear/impl/cpp/metawearboard.cpp BOARD_DEV_INFO_CHARS, ``queue_next_read``).
DEVICE_INFO_READ_ORDER: tuple[str, ...] = (
    FIRMWARE_REVISION_UUID, MODEL_NUMBER_UUID, HARDWARE_REVISION_UUID,
    MANUFACTURER_UUID, SERIAL_NUMBER_UUID,
)

READ_BIT = 0x80  # SDK:src/metawear/core/cpp/register.h READ_REGISTER(x) = 0x80 | x
STANDARD_GRAVITY_MS2 = 9.80665


class Module(IntEnum):
    """Module ids (SDK:src/metawear/core/module.h ``MblMwModule``)."""

    SWITCH = 0x01
    LED = 0x02
    ACCELEROMETER = 0x03
    TEMPERATURE = 0x04
    GPIO = 0x05
    NEO_PIXEL = 0x06
    IBEACON = 0x07
    HAPTIC = 0x08
    DATA_PROCESSOR = 0x09
    EVENT = 0x0A
    LOGGING = 0x0B
    TIMER = 0x0C
    I2C = 0x0D
    MACRO = 0x0F
    CONDUCTANCE = 0x10
    SETTINGS = 0x11
    BAROMETER = 0x12
    GYRO = 0x13
    AMBIENT_LIGHT = 0x14
    MAGNETOMETER = 0x15
    HUMIDITY = 0x16
    COLOR_DETECTOR = 0x17
    PROXIMITY = 0x18
    SENSOR_FUSION = 0x19
    DEBUG = 0xFE


#: Discovery order (SDK:src/metawear/impl/cpp/metawearboard.cpp MODULE_DISCOVERY_CMDS).
MODULE_DISCOVERY_ORDER: tuple[Module, ...] = (
    Module.SWITCH, Module.LED, Module.ACCELEROMETER, Module.TEMPERATURE, Module.GPIO,
    Module.NEO_PIXEL, Module.IBEACON, Module.HAPTIC, Module.DATA_PROCESSOR, Module.EVENT,
    Module.LOGGING, Module.TIMER, Module.I2C, Module.MACRO, Module.CONDUCTANCE, Module.SETTINGS,
    Module.BAROMETER, Module.GYRO, Module.AMBIENT_LIGHT, Module.MAGNETOMETER, Module.HUMIDITY,
    Module.COLOR_DETECTOR, Module.PROXIMITY, Module.SENSOR_FUSION, Module.DEBUG,
)

# --- registers ---------------------------------------------------------------------------------
# Accelerometer, both Bosch chips: SDK:src/metawear/sensor/cpp/accelerometer_bmi160_register.h and
# accelerometer_bosch_register.h (POWER_MODE=1, DATA_INTERRUPT_ENABLE=2, DATA_CONFIG=3, DATA_INTERRUPT=4).
ACC_POWER_MODE = 0x01
ACC_DATA_INTERRUPT_ENABLE = 0x02
ACC_DATA_CONFIG = 0x03
ACC_DATA_INTERRUPT = 0x04
# Packed (3 samples / notification): BMI160 PACKED_ACC_DATA=0x1c (SDK:.../accelerometer_bosch_register.h;
# SDK:test/test_accelerometer_bmi160.py subscribe [0x03,0x1c,0x01]); BMI270 0x05
# (SDK:test/test_accelerometer_bmi270.py TestBmi270HighFreqAccData subscribe [0x03,0x05,0x01]).
ACC_PACKED_BMI160 = 0x1C
ACC_PACKED_BMI270 = 0x05
# Gyro: SDK:src/metawear/sensor/cpp/gyro_bosch_register.h GyroBmi160Register / GyroBmi270Register.
GYRO_POWER_MODE = 0x01
GYRO_DATA_INTERRUPT_ENABLE = 0x02
GYRO_CONFIG = 0x03
GYRO_DATA_BMI160 = 0x05
GYRO_PACKED_BMI160 = 0x07
GYRO_DATA_BMI270 = 0x04
GYRO_PACKED_BMI270 = 0x05
# Settings: SDK:src/metawear/core/cpp/settings_register.h.
SETTINGS_CONNECTION_PARAMS = 0x09
SETTINGS_BATTERY_STATE = 0x0C
# Debug: SDK:src/metawear/core/cpp/debug.cpp DebugRegister::DISCONNECT = 6.
DEBUG_DISCONNECT = 0x06
# Logging: SDK:src/metawear/core/cpp/logging_register.h LoggingRegister::TIME = 4.
LOGGING_TIME = 0x04
#: Silent-read modifier the SDK sets when reading a signal nobody subscribed to
#: (SDK:test/test_settings.py ``test_read_battery_component``: [0x11, 0xcc] vs [0x11, 0x8c]).
SILENT_READ_BIT = 0x40


class MetaWearError(ValueError):
    """Invalid configuration or a byte sequence this protocol cannot produce/accept."""


class UnsupportedBoardError(MetaWearError):
    """The discovered board is not a MetaMotionR/RL (BMI160) or MetaMotionS (BMI270)."""


class Chip(Enum):
    BMI160 = "BMI160"
    BMI270 = "BMI270"


# Module implementation ids reported by discovery:
# accelerometer: MBL_MW_MODULE_ACC_TYPE_BMI160 = 1 (SDK:src/metawear/sensor/accelerometer_bosch.h),
# BMI270 = 4 (SDK:test/common.py metawear_motion_s_services 0x03: b'\x03\x80\x04\x00');
# gyro: MBL_MW_MODULE_GYRO_TYPE_BMI160 = 0, _BMI270 = 1 (SDK:src/metawear/sensor/gyro_bosch.h).
ACC_IMPLEMENTATION: Mapping[Chip, int] = {Chip.BMI160: 1, Chip.BMI270: 4}
GYRO_IMPLEMENTATION: Mapping[Chip, int] = {Chip.BMI160: 0, Chip.BMI270: 1}
# Packed data exists from module revision 1 on the BMI160 (SDK:.../accelerometer_bosch.cpp
# PACKED_ACC_REVISION = 1; SDK:.../gyro_bosch.cpp PACKED_ROT_REVISION = 1); always on the BMI270.
PACKED_MIN_REVISION_BMI160 = 1

# --- ranges, rates, scales ---------------------------------------------------------------------
#: MblMwAccBmi160Odr / MblMwAccBmi270Odr enums, index i -> register odr field i + 1
#: (SDK:src/metawear/sensor/accelerometer_bosch.h; ``set_output_data_rate``: acc.odr = odr + 1).
ACC_ODRS_HZ: tuple[float, ...] = (
    0.78125, 1.5625, 3.125, 6.25, 12.5, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0,
)
#: MblMwGyroBoschOdr: 25 Hz = 6 ... 3200 Hz = 13 (SDK:src/metawear/sensor/gyro_bosch.h).
GYRO_ODRS_HZ: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)
GYRO_ODR_CODE_FIRST = 6
#: One rate drives both sensors in :class:`ImuConfig`: the rates both chips share, capped at 800 Hz
#: because two 1600 Hz streams do not fit through BLE (packed data is the SDK's high-rate path).
STREAM_ODRS_HZ: tuple[float, ...] = tuple(r for r in ACC_ODRS_HZ if r in GYRO_ODRS_HZ and r <= 800.0)
#: MblMwAccBoschRange 2/4/8/16 g (SDK:src/metawear/sensor/accelerometer_bosch.h).
ACC_RANGES_G: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
# Range field values: BMI160 FSR_BITMASKS {0x3,0x5,0x8,0xc}; BMI270 BMI270_FSR_BITMASKS {0,1,2,3}
# (SDK:src/metawear/sensor/cpp/accelerometer_bosch.cpp).
_ACC_RANGE_BITS: Mapping[Chip, tuple[int, ...]] = {
    Chip.BMI160: (0x3, 0x5, 0x8, 0xC),
    Chip.BMI270: (0x0, 0x1, 0x2, 0x3),
}
# BMI160_FSR_SCALE / BMI270_FSR_SCALE: 16384, 8192, 4096, 2048 LSB/g (SDK:.../accelerometer_bosch.cpp).
_ACC_LSB_PER_G: tuple[float, ...] = (16384.0, 8192.0, 4096.0, 2048.0)
#: MblMwGyroBoschRange: 2000 = 0, 1000, 500, 250, 125 = 4 (SDK:src/metawear/sensor/gyro_bosch.h).
GYRO_RANGES_DPS: tuple[float, ...] = (2000.0, 1000.0, 500.0, 250.0, 125.0)
# FSR_SCALE[range code] LSB per °/s (SDK:src/metawear/sensor/cpp/gyro_bosch.cpp).
_GYRO_LSB_PER_DPS: tuple[float, ...] = (16.4, 32.8, 65.6, 131.2, 262.4)
# GyroBoschConfig gyr_bwp = 2 (normal filter), set by init_gyro_module (SDK:.../gyro_bosch.cpp).
_GYRO_BWP = 2


@dataclass(frozen=True)
class ModuleInfo:
    """One module-discovery answer ``[id, 0x80, implementation, revision, extra...]``.

    Mirrors SDK:src/metawear/core/cpp/moduleinfo.cpp: present iff the answer is longer than 2.
    """

    module: int
    present: bool
    implementation: int = -1
    revision: int = -1
    extra: bytes = b""


@dataclass(frozen=True)
class BoardModel:
    """What :func:`identify` concluded about a board, and what it can stream."""

    name: str
    chip: Chip
    packed_acc: bool
    packed_gyro: bool


def _index(value: float, table: tuple[float, ...], what: str, unit: str) -> int:
    for i, v in enumerate(table):
        if math.isclose(float(value), v, rel_tol=1e-9, abs_tol=1e-9):
            return i
    choices = ", ".join(f"{v:g}" for v in table)
    raise MetaWearError(f"unsupported {what} {value!r} {unit}; choose one of: {choices} {unit}")


def nearest_odr(hz: float, choices: tuple[float, ...] = STREAM_ODRS_HZ) -> float:
    """The supported output data rate closest to ``hz`` (ties go to the faster rate).

    Why: users configure "about 100 Hz"; the chips only run at their enum rates.
    """
    if not (hz > 0 and math.isfinite(hz)):
        raise MetaWearError(f"output data rate must be a positive number of Hz, got {hz!r}")
    return min(choices, key=lambda c: (abs(math.log(c / hz)), -c))


@dataclass(frozen=True)
class ImuConfig:
    """Streaming configuration for accelerometer + gyroscope (same rate for both)."""

    chip: Chip
    odr_hz: float = 100.0
    acc_range_g: float = 4.0
    gyro_range_dps: float = 500.0
    packed: bool = False

    def __post_init__(self) -> None:
        validate(self)

    @property
    def notifications_per_second(self) -> float:
        """Per sensor: packed streams carry 3 samples per notification."""
        return self.odr_hz / 3.0 if self.packed else self.odr_hz


def validate(cfg: ImuConfig) -> ImuConfig:
    """Raise :class:`MetaWearError` naming the bad field and the valid values."""
    if not isinstance(cfg.chip, Chip):
        raise MetaWearError(f"chip must be Chip.BMI160 or Chip.BMI270, got {cfg.chip!r}")
    _index(cfg.odr_hz, STREAM_ODRS_HZ, "output data rate (use nearest_odr())", "Hz")
    _index(cfg.acc_range_g, ACC_RANGES_G, "accelerometer range", "g")
    _index(cfg.gyro_range_dps, GYRO_RANGES_DPS, "gyroscope range", "deg/s")
    if not isinstance(cfg.packed, bool):
        raise MetaWearError(f"packed must be True or False, got {cfg.packed!r}")
    return cfg


# --- discovery / identification ----------------------------------------------------------------
def discovery_reads(modules: Iterable[int] = MODULE_DISCOVERY_ORDER) -> list[bytes]:
    """Module-info reads ``[module, 0x80]`` in SDK order (SDK:.../metawearboard.cpp MODULE_DISCOVERY_CMDS).

    The SDK sends them one at a time, each after the previous answer arrived (``queue_next_query``).
    """
    return [bytes((int(m), READ_BIT)) for m in modules]


def parse_module_info(data: bytes) -> ModuleInfo:
    """Parse ``[id, 0x80, impl, rev, extra...]`` (or ``[id, 0x80]`` when absent)."""
    if len(data) < 2 or data[1] != READ_BIT:
        raise MetaWearError(f"not a module-info answer (want [id, 0x80, ...]): {bytes(data).hex(' ')}")
    if len(data) == 3:
        raise MetaWearError(f"truncated module-info answer (3 bytes): {bytes(data).hex(' ')}")
    if len(data) == 2:
        return ModuleInfo(module=data[0], present=False)
    return ModuleInfo(module=data[0], present=True, implementation=data[2], revision=data[3],
                      extra=bytes(data[4:]))


def identify(infos: Mapping[int, ModuleInfo], model_number: str | None = None) -> BoardModel:
    """Name the board and its IMU chip from discovery answers (and the 2a24 model number if read).

    Model-number rules follow SDK:.../metawearboard.cpp ``mbl_mw_metawearboard_get_model``
    ("5" + ambient light → MetaMotion R, "5" without → MetaMotion RL, "8" → MetaMotion S);
    the chip follows the accelerometer/gyro implementation ids.
    """
    acc = infos.get(Module.ACCELEROMETER)
    gyro = infos.get(Module.GYRO)
    if acc is None or not acc.present:
        raise UnsupportedBoardError(
            "no accelerometer reported by module discovery; is this a MetaWear board? "
            "Run discovery_reads() after enabling notifications on NOTIFY_UUID"
        )
    chips = {v: k for k, v in ACC_IMPLEMENTATION.items()}
    if acc.implementation not in chips:
        raise UnsupportedBoardError(
            f"accelerometer implementation {acc.implementation} is not a BMI160 (1) or BMI270 (4); "
            "only MetaMotionR/RL/S are supported"
        )
    chip = chips[acc.implementation]
    if gyro is None or not gyro.present or gyro.implementation != GYRO_IMPLEMENTATION[chip]:
        raise UnsupportedBoardError(
            f"{chip.value} board without the matching gyroscope (got {gyro}); "
            "only MetaMotionR/RL/S with a gyro are supported"
        )
    if chip is Chip.BMI160:
        light = infos.get(Module.AMBIENT_LIGHT)
        name = "MetaMotion R" if (light is not None and light.present) else "MetaMotion RL"
        if model_number not in (None, "5"):
            raise UnsupportedBoardError(f"model number {model_number!r} with a BMI160 is not a MetaMotion R/RL")
        packed_acc = acc.revision >= PACKED_MIN_REVISION_BMI160
        packed_gyro = gyro.revision >= PACKED_MIN_REVISION_BMI160
    else:
        name = "MetaMotion S"
        if model_number not in (None, "8"):
            raise UnsupportedBoardError(f"model number {model_number!r} with a BMI270 is not a MetaMotion S")
        packed_acc = packed_gyro = True
    return BoardModel(name=name, chip=chip, packed_acc=packed_acc, packed_gyro=packed_gyro)


# --- configuration bytes -----------------------------------------------------------------------
def acc_config_command(chip: Chip, odr_hz: float, range_g: float) -> bytes:
    """``03 03 <acc_conf> <acc_range>`` exactly as ``mbl_mw_acc_bosch_write_acceleration_config``.

    acc_conf bits: odr[3:0], bwp[6:4], us/filter_perf[7]. SDK:.../accelerometer_bosch.cpp
    ``mbl_mw_acc_bmi160_set_odr`` (below 12.5 Hz: us=1,bwp=0 else us=0,bwp=2) and
    ``mbl_mw_acc_bmi270_set_odr`` (us=1,bwp=2; below 12.5 Hz us=0).
    """
    i = _index(odr_hz, ACC_ODRS_HZ, "accelerometer output data rate", "Hz")
    r = _index(range_g, ACC_RANGES_G, "accelerometer range", "g")
    low = ACC_ODRS_HZ[i] < 12.5
    if chip is Chip.BMI160:
        us, bwp = (1, 0) if low else (0, 2)
    else:
        us, bwp = (0 if low else 1), 2
    conf = (i + 1) | (bwp << 4) | (us << 7)
    return bytes((Module.ACCELEROMETER, ACC_DATA_CONFIG, conf, _ACC_RANGE_BITS[chip][r]))


def parse_acc_config(chip: Chip, payload: bytes) -> tuple[float, float]:
    """Inverse of :func:`acc_config_command` for its 2 payload bytes → (odr_hz, range_g)."""
    if len(payload) != 2:
        raise MetaWearError(f"accelerometer config payload must be 2 bytes, got {bytes(payload).hex(' ')}")
    odr_field = payload[0] & 0x0F
    if not 1 <= odr_field <= len(ACC_ODRS_HZ):
        raise MetaWearError(f"accelerometer odr field {odr_field} out of range 1..12")
    bits = _ACC_RANGE_BITS[chip]
    rng = payload[1] & (0x0F if chip is Chip.BMI160 else 0x07)
    if rng not in bits:
        raise MetaWearError(f"accelerometer range bits {rng:#x} invalid for {chip.value}; valid {bits}")
    return ACC_ODRS_HZ[odr_field - 1], ACC_RANGES_G[bits.index(rng)]


def gyro_config_command(odr_hz: float, range_dps: float) -> bytes:
    """``13 03 <gyr_odr|bwp<<4> <gyr_range>`` (SDK:.../gyro_bosch.cpp GyroBoschConfig, same on both chips)."""
    i = _index(odr_hz, GYRO_ODRS_HZ, "gyroscope output data rate", "Hz")
    r = _index(range_dps, GYRO_RANGES_DPS, "gyroscope range", "deg/s")
    return bytes((Module.GYRO, GYRO_CONFIG, (GYRO_ODR_CODE_FIRST + i) | (_GYRO_BWP << 4), r))


def parse_gyro_config(payload: bytes) -> tuple[float, float]:
    """Inverse of :func:`gyro_config_command` for its 2 payload bytes → (odr_hz, range_dps)."""
    if len(payload) != 2:
        raise MetaWearError(f"gyroscope config payload must be 2 bytes, got {bytes(payload).hex(' ')}")
    code = payload[0] & 0x0F
    rng = payload[1] & 0x07
    if not GYRO_ODR_CODE_FIRST <= code < GYRO_ODR_CODE_FIRST + len(GYRO_ODRS_HZ):
        raise MetaWearError(f"gyroscope odr code {code} out of range 6..13")
    if rng >= len(GYRO_RANGES_DPS):
        raise MetaWearError(f"gyroscope range code {rng} out of range 0..4")
    return GYRO_ODRS_HZ[code - GYRO_ODR_CODE_FIRST], GYRO_RANGES_DPS[rng]


def acc_scale_lsb_per_g(range_g: float) -> float:
    return _ACC_LSB_PER_G[_index(range_g, ACC_RANGES_G, "accelerometer range", "g")]


def gyro_scale_lsb_per_dps(range_dps: float) -> float:
    return _GYRO_LSB_PER_DPS[_index(range_dps, GYRO_RANGES_DPS, "gyroscope range", "deg/s")]


def acc_data_register(chip: Chip, packed: bool) -> int:
    if not packed:
        return ACC_DATA_INTERRUPT
    return ACC_PACKED_BMI160 if chip is Chip.BMI160 else ACC_PACKED_BMI270


def gyro_data_register(chip: Chip, packed: bool) -> int:
    if chip is Chip.BMI160:
        return GYRO_PACKED_BMI160 if packed else GYRO_DATA_BMI160
    return GYRO_PACKED_BMI270 if packed else GYRO_DATA_BMI270


def subscribe(module: int, register: int) -> bytes:
    """``[module, register, 1]`` (SDK:test/test_accelerometer_bmi160.py: subscribe → [0x03,0x04,0x01])."""
    return bytes((module, register, 1))


def unsubscribe(module: int, register: int) -> bytes:
    """``[module, register, 0]`` (SDK:test/test_accelerometer_bmi160.py: unsubscribe → [0x03,0x04,0x00])."""
    return bytes((module, register, 0))


def configure_commands(cfg: ImuConfig) -> list[bytes]:
    """Accelerometer config then gyro config (order of SDK example stream_acc_gyro_bmi270.py)."""
    validate(cfg)
    return [
        acc_config_command(cfg.chip, cfg.odr_hz, cfg.acc_range_g),
        gyro_config_command(cfg.odr_hz, cfg.gyro_range_dps),
    ]


def _acc_power_on(cfg: ImuConfig) -> int:
    # mbl_mw_acc_bosch_start: 1, except BMI270 with filter_perf (us) = 0, i.e. < 12.5 Hz → 2
    # (SDK:.../accelerometer_bosch.cpp). Streaming rates are >= 25 Hz, so 1; kept for fidelity.
    if cfg.chip is Chip.BMI270 and cfg.odr_hz < 12.5:
        return 2
    return 1


def start_commands(cfg: ImuConfig) -> list[bytes]:
    """Subscribe both, then enable interrupt + power on, acc then gyro.

    Order of MetaWear-SDK-Python examples/stream_acc_gyro_bmi270.py (subscribe acc, subscribe gyro,
    acc enable_acceleration_sampling, acc start, gyro enable_rotation_sampling, gyro start); bytes from
    SDK:.../accelerometer_bosch.cpp ``mbl_mw_acc_bosch_enable_acceleration_sampling`` [03 02 01 00],
    ``mbl_mw_acc_bosch_start`` [03 01 01] and SDK:.../gyro_bosch.cpp [13 02 01 00], [13 01 01].
    """
    validate(cfg)
    acc_reg = acc_data_register(cfg.chip, cfg.packed)
    gyro_reg = gyro_data_register(cfg.chip, cfg.packed)
    return [
        subscribe(Module.ACCELEROMETER, acc_reg),
        subscribe(Module.GYRO, gyro_reg),
        bytes((Module.ACCELEROMETER, ACC_DATA_INTERRUPT_ENABLE, 0x01, 0x00)),
        bytes((Module.ACCELEROMETER, ACC_POWER_MODE, _acc_power_on(cfg))),
        bytes((Module.GYRO, GYRO_DATA_INTERRUPT_ENABLE, 0x01, 0x00)),
        bytes((Module.GYRO, GYRO_POWER_MODE, 0x01)),
    ]


def stop_commands(cfg: ImuConfig) -> list[bytes]:
    """Reverse of :func:`start_commands`, in the SDK example's order (stop, disable, unsubscribe)."""
    validate(cfg)
    return [
        bytes((Module.ACCELEROMETER, ACC_POWER_MODE, 0x00)),
        bytes((Module.ACCELEROMETER, ACC_DATA_INTERRUPT_ENABLE, 0x00, 0x01)),
        bytes((Module.GYRO, GYRO_POWER_MODE, 0x00)),
        bytes((Module.GYRO, GYRO_DATA_INTERRUPT_ENABLE, 0x00, 0x01)),
        unsubscribe(Module.ACCELEROMETER, acc_data_register(cfg.chip, cfg.packed)),
        unsubscribe(Module.GYRO, gyro_data_register(cfg.chip, cfg.packed)),
    ]


def battery_read() -> bytes:
    """``11 8c``: read BATTERY_STATE (SDK:test/test_settings.py TestSettingsRevision3); answer ``11 8c <pct> <mV u16>``."""
    return bytes((Module.SETTINGS, READ_BIT | SETTINGS_BATTERY_STATE))


def disconnect() -> bytes:
    """``fe 06``: ask the board to drop the link (SDK:test/test_debug.py test_mbl_mw_debug_disconnect)."""
    return bytes((Module.DEBUG, DEBUG_DISCONNECT))


def logging_time_read() -> bytes:
    """``0b 84``: the SDK's last initialisation step when logging exists (metawearboard.cpp
    ``service_discovery_completed``); answer ``0b 84 <tick u32> <reset_uid>`` (SDK:test/common.py)."""
    return bytes((Module.LOGGING, READ_BIT | LOGGING_TIME))


# SDK:src/metawear/core/cpp/settings.cpp CONN_INTERVAL_STEP = 1.25 ms, TIMEOUT_STEP = 10 ms.
_CONN_INTERVAL_STEP_MS = 1.25
_TIMEOUT_STEP_MS = 10.0


def connection_parameters(min_ms: float, max_ms: float, latency: int, timeout_ms: float) -> bytes:
    """``11 09 <min/1.25 u16> <max/1.25 u16> <latency u16> <timeout/10 u16>``.

    SDK:src/metawear/core/cpp/settings.cpp ``mbl_mw_settings_set_connection_parameters`` (integer
    truncation as its static_cast). Limits are the Bluetooth Core spec's: interval 7.5–4000 ms,
    latency 0–499, supervision timeout 100–32000 ms.
    """
    if not 7.5 <= min_ms <= max_ms <= 4000.0:
        raise MetaWearError(
            f"connection interval must satisfy 7.5 <= min ({min_ms}) <= max ({max_ms}) <= 4000 ms"
        )
    if not (isinstance(latency, int) and 0 <= latency <= 499):
        raise MetaWearError(f"slave latency must be an integer 0..499, got {latency!r}")
    if not 100.0 <= timeout_ms <= 32000.0:
        raise MetaWearError(f"supervision timeout must be 100..32000 ms, got {timeout_ms}")
    values = (int(min_ms / _CONN_INTERVAL_STEP_MS), int(max_ms / _CONN_INTERVAL_STEP_MS),
              latency, int(timeout_ms / _TIMEOUT_STEP_MS))
    return bytes((Module.SETTINGS, SETTINGS_CONNECTION_PARAMS)) + np.asarray(values, "<u2").tobytes()


# --- notifications -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AccSamples:
    """1 (normal) or 3 (packed) accelerometer samples from one notification."""

    raw: np.ndarray = field(repr=False)  # int16 (n, 3), chip LSB
    values_g: np.ndarray  # float32 (n, 3)
    range_g: float
    packed: bool

    @property
    def si(self) -> np.ndarray:
        """m/s²."""
        return (self.values_g * np.float32(STANDARD_GRAVITY_MS2)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class GyroSamples:
    """1 (normal) or 3 (packed) gyroscope samples from one notification."""

    raw: np.ndarray = field(repr=False)  # int16 (n, 3)
    dps: np.ndarray  # float32 (n, 3)
    range_dps: float
    packed: bool

    @property
    def rad_s(self) -> np.ndarray:
        return np.deg2rad(self.dps).astype(np.float32)


@dataclass(frozen=True)
class Battery:
    """Settings BATTERY_STATE: charge % and voltage (SDK:.../settings.cpp battery signal: u8 + u16)."""

    percent: int
    voltage_mv: int


@dataclass(frozen=True)
class LoggingTime:
    """Answer to ``0b 84``: logger tick (48/32768 ms steps, SDK:.../logging.cpp TICK_TIME_STEP) and reset uid."""

    tick: int
    reset_uid: int


@dataclass(frozen=True)
class ConfigReadback:
    """Answer to a config read (``03 83`` / ``13 83``): the 2 config bytes as the chip holds them."""

    module: int
    payload: bytes


@dataclass(frozen=True)
class Unknown:
    """A notification the decoder does not interpret (kept, never dropped silently)."""

    data: bytes
    reason: str = "unhandled header"


ImuEvent = Union[AccSamples, GyroSamples, Battery, ModuleInfo, LoggingTime, ConfigReadback, Unknown]


class NotificationDecoder:
    """Bytes from :data:`NOTIFY_UUID` → events, scaled by the configured ranges.

    Why the config is needed: samples are raw int16; only the range set by the host gives them
    units (SDK ``bosch_get_data_scale`` / ``bosch_gyro_get_data_scale``). Create a new decoder after
    every reconfiguration. The decoder accepts normal and packed data regardless of ``cfg.packed``
    (the header says which) so a late notification from a previous mode is still decoded right.
    """

    def __init__(self, cfg: ImuConfig) -> None:
        self.cfg = validate(cfg)
        self._acc_scale = np.float32(acc_scale_lsb_per_g(cfg.acc_range_g))
        self._gyro_scale = np.float32(gyro_scale_lsb_per_dps(cfg.gyro_range_dps))
        acc_packed = acc_data_register(cfg.chip, True)
        gyro_packed = gyro_data_register(cfg.chip, True)
        self._samples: dict[tuple[int, int], tuple[str, bool]] = {
            (Module.ACCELEROMETER, ACC_DATA_INTERRUPT): ("acc", False),
            (Module.ACCELEROMETER, acc_packed): ("acc", True),
            (Module.GYRO, gyro_data_register(cfg.chip, False)): ("gyro", False),
            (Module.GYRO, gyro_packed): ("gyro", True),
        }

    def feed(self, data: bytes | bytearray | memoryview) -> list[ImuEvent]:
        data = bytes(data)
        if len(data) < 2:
            return [Unknown(data, "shorter than the 2-byte [module, register] header")]
        header = (data[0], data[1])
        kind = self._samples.get(header)
        if kind is not None:
            return [self._decode_samples(data, *kind)]
        if data[1] == READ_BIT:
            try:
                return [parse_module_info(data)]
            except MetaWearError as exc:
                return [Unknown(data, str(exc))]
        if data[0] == Module.SETTINGS and data[1] & 0x3F == SETTINGS_BATTERY_STATE and data[1] & READ_BIT:
            if len(data) != 5:
                return [Unknown(data, "battery answer must be 5 bytes: 11 8c <pct> <mV lo> <mV hi>")]
            return [Battery(percent=data[2], voltage_mv=int.from_bytes(data[3:5], "little"))]
        if header == (Module.LOGGING, READ_BIT | LOGGING_TIME):
            if len(data) != 7:
                return [Unknown(data, "logging time answer must be 7 bytes")]
            return [LoggingTime(tick=int.from_bytes(data[2:6], "little"), reset_uid=data[6])]
        if header in ((Module.ACCELEROMETER, READ_BIT | ACC_DATA_CONFIG), (Module.GYRO, READ_BIT | GYRO_CONFIG)):
            return [ConfigReadback(module=data[0], payload=data[2:4])]
        return [Unknown(data)]

    def _decode_samples(self, data: bytes, kind: str, packed: bool) -> ImuEvent:
        n = 3 if packed else 1
        if len(data) != 2 + 6 * n:
            return Unknown(data, f"{kind} {'packed ' if packed else ''}data must be {2 + 6 * n} bytes, got {len(data)}")
        raw = np.frombuffer(data, dtype="<i2", offset=2).reshape(n, 3).astype(np.int16)
        if kind == "acc":
            return AccSamples(raw=raw, values_g=raw.astype(np.float32) / self._acc_scale,
                              range_g=self.cfg.acc_range_g, packed=packed)
        return GyroSamples(raw=raw, dps=raw.astype(np.float32) / self._gyro_scale,
                           range_dps=self.cfg.gyro_range_dps, packed=packed)
