"""The power-source interface: one small contract every source module implements.

A power source is one channel of one sensor: a cumulative energy counter (joules) or a
power reading (watts) at a stated boundary. A module (``nvml``, ``rapl``, ``amdsmi``,
``replay``) may offer several channels of one device as several sources. Vendor errors are
translated into ``SourceError`` once, inside the module, so nothing upstream sees them.

Every timestamp is the host monotonic clock (``time.monotonic_ns``), in ns. A source whose
sensor stamps its own samples (driver-buffered samples, a meter's log) maps those stamps to
the host monotonic clock itself and says so with ``stamped_by="sensor"``; otherwise a
sample's time is the moment it was read (``stamped_by="poll"``), and the instant the sensor
updated is somewhere between that read and the previous one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import numpy as np

QUANTITIES = ("energy", "power")
BOUNDARIES = ("gpu-board", "gpu-module", "gpu-memory", "cpu-package", "dram", "node")


class SourceError(RuntimeError):
    """A source cannot be opened or read; the message is one line saying why."""


@dataclass(frozen=True)
class SourceInfo:
    """What a source measures and how.

    ``quantity``: "energy" (cumulative joules, wrap-around already undone by the source) or
    "power" (watts). ``update_period_s``: how often the sensor's value changes, as the
    vendor states it or as measured (``engine.power.probe``); None when unknown.
    ``averaging_window_s``: for power, the span each value averages (0 for instantaneous;
    None when unknown); for an energy counter, None means it integrates all the time.
    ``resolution``: smallest step of the value (J for energy, W for power), None if unknown.
    """

    name: str
    boundary: str
    quantity: str
    update_period_s: float | None = None
    averaging_window_s: float | None = None
    resolution: float | None = None
    stamped_by: str = "poll"
    device: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITIES:
            raise ValueError(f"quantity must be one of {QUANTITIES}, got {self.quantity!r}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}")
        if self.stamped_by not in ("poll", "sensor"):
            raise ValueError(f"stamped_by must be 'poll' or 'sensor', got {self.stamped_by!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """A source's samples: ``t_ns`` (int64, host monotonic, non-decreasing) and ``value``
    (float64, J cumulative or W as ``info.quantity`` says)."""

    info: SourceInfo
    t_ns: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        self.t_ns = np.asarray(self.t_ns, dtype=np.int64)
        self.value = np.asarray(self.value, dtype=np.float64)
        if self.t_ns.shape != self.value.shape or self.t_ns.ndim != 1:
            raise ValueError("t_ns and value must be 1-D arrays of the same length")

    def between(self, t0_ns: int, t1_ns: int) -> Samples:
        """The samples with t0_ns <= t_ns <= t1_ns."""
        i0 = int(np.searchsorted(self.t_ns, t0_ns, side="left"))
        i1 = int(np.searchsorted(self.t_ns, t1_ns, side="right"))
        return Samples(self.info, self.t_ns[i0:i1], self.value[i0:i1])


class PowerSource(ABC):
    """One channel of a power or energy sensor, read on demand."""

    info: SourceInfo

    @abstractmethod
    def read(self) -> tuple[int, float]:
        """Read the sensor now: (host monotonic ns of the read, value in J or W).

        Raises SourceError when the sensor cannot be read.
        """

    def read_buffered(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Samples the sensor buffered itself since the last call, stamped by the sensor and
        mapped to host monotonic ns: (t_ns int64, value float64); None when the source has
        no buffer (then only ``read`` is polled)."""
        return None

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release what the source holds."""
