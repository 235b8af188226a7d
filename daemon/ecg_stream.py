"""ECG chunks of one source -> one DSP pipeline, with the sample clock kept honest.

``biod run`` and ``biod calibrate`` both read a serial box frame by frame; both must treat a
hole in the frame sequence, a reconnect and a box restart alike, or a template is enrolled
from windows the daemon would never identify from. This is that one rule:

* frames lost (on the wire, or dropped by a hand-off that keeps the newest) for up to
  ``MAX_SPLICE_S`` go into the pipeline as missing samples (``EcgPipeline.push_gap``): the
  clock goes on, and the windows holding the hole are rejected as ``signal_lost``;
* a longer hole, a reconnect (it may bring another box, or another person), a box restart or a
  new rate or lead count starts a fresh pipeline: its windows and beat times assume one
  unbroken sample clock.
"""
from __future__ import annotations

from typing import Any

from daemon.dsp.ecg_pipeline import EcgPipeline, EcgUpdate
from daemon.sources.serial_ecg import EcgChunk
from firmware_protocol.ecg_serial import frames_missing

__all__ = ["EcgStream", "gap_s"]


def gap_s(last_seq: int | None, chunk: EcgChunk) -> float:
    """Seconds of signal missing between the frame ``last_seq`` and ``chunk``'s first frame:
    frames lost on the wire, or dropped when a consumer fell behind (the hand-off keeps the
    newest). The device's sequence number counts both; the source's ``lost_frames_before`` sees
    only the first. Frames, not seconds, would let a box with long frames splice 10 s unnoticed."""
    if last_seq is None:
        return 0.0
    frame_len = len(chunk.samples_mv) / max(chunk.frames, 1)
    return frames_missing(last_seq, chunk.first_seq) * frame_len / chunk.rate_hz


class EcgStream:
    """Feeds one source's chunks to an :class:`EcgPipeline` (see the module docstring)."""

    #: Frames missing for up to this long keep the pipeline (the hole is marked, one odd RR at
    #: most, which the quality gate's RR check rejects); a longer hole restarts it.
    MAX_SPLICE_S = 1.0

    def __init__(self, mains_hz: float | None, pipeline_kwargs: dict[str, Any] | None = None) -> None:
        self.mains_hz = mains_hz
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.pipeline: EcgPipeline | None = None
        self.restarts = 0          # fresh pipelines after the first
        self.lost_samples = 0      # samples pushed as missing
        self.lost_s = 0.0          # the same in seconds (a box may change its rate on a reconnect)
        self._last_seq: int | None = None
        self._connects: int | None = None

    def push(self, chunk: EcgChunk, connects: int | None = None) -> EcgUpdate:
        """One chunk (one frame, or several joined: ``chunk.frames``). ``connects``: the
        source's count of device opens (``EcgHealth.connects``); a change since the last chunk
        means it opened the device again."""
        missing = gap_s(self._last_seq, chunk)
        self._last_seq = chunk.seq
        reconnected, self._connects = connects != self._connects, connects
        n_leads = chunk.samples_mv.shape[1]
        p = self.pipeline
        if (p is None or reconnected or chunk.device_restarted or p.fs != chunk.rate_hz
                or p.n_leads != n_leads or missing > self.MAX_SPLICE_S):
            self.restarts += p is not None
            p = self.pipeline = EcgPipeline(fs=chunk.rate_hz, n_leads=n_leads, mains_hz=self.mains_hz,
                                            **self.pipeline_kwargs)
        elif missing > 0:
            n = round(missing * chunk.rate_hz)
            self.lost_samples += n
            self.lost_s += n / chunk.rate_hz
            p.push_gap(n)
        return p.push(chunk.samples_mv, chunk.lead_valid)
