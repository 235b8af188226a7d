"""CRC-16/CCITT-FALSE, the frame check of the biod ECG serial protocol.

Parameters (Rocksoft model): width 16, poly 0x1021, init 0xFFFF, refin false, refout false,
xorout 0x0000, check value 0x29B1 for the ASCII bytes "123456789".

Why this CRC: it is the one every MCU vendor library and most UART/USB stacks already ship
(STM32 HAL, Zephyr ``crc16_itu_t``, nRF SDK ``crc16_compute``), so a device maker does not have
to write it. Why ``binascii.crc_hqx``: it is the same polynomial with a caller-chosen initial
value, implemented in C in the standard library, so checking every candidate frame at 1000 Hz
costs microseconds on a Raspberry Pi instead of a per-byte Python loop.
"""

from __future__ import annotations

import binascii

__all__ = ["CRC16_CHECK", "CRC16_INIT", "CRC16_POLY", "CRC16_XOROUT", "crc16_ccitt"]

CRC16_POLY = 0x1021
CRC16_INIT = 0xFFFF
CRC16_XOROUT = 0x0000
#: CRC of b"123456789"; a device implementation must reproduce it before anything else.
CRC16_CHECK = 0x29B1


def crc16_ccitt(data: bytes | bytearray | memoryview, init: int = CRC16_INIT) -> int:
    """Return the CRC-16/CCITT-FALSE of ``data``.

    ``init`` lets a caller continue a CRC over data that arrives in pieces:
    ``crc16_ccitt(b, crc16_ccitt(a)) == crc16_ccitt(a + b)`` (xorout is 0, so no undo is needed).
    """
    if not 0 <= init <= 0xFFFF:
        raise ValueError(f"CRC init must be a 16-bit value, got {init!r}")
    return binascii.crc_hqx(data, init) ^ CRC16_XOROUT
