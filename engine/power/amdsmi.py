"""AMD GPUs through the AMD SMI Python library (``amdsmi``, shipped with ROCm).

UNTESTED ON HARDWARE: written against the documented Python API and checked only with a
stand-in module. Verify on an AMD GPU before trusting its numbers.

Channels per GPU, each kept only when a probing read at discovery succeeds:

- ``energy``: ``amdsmi_get_energy_count(handle)`` -> dict with the accumulator
  (``energy_accumulator``; ``power`` before amdsmi 6.2.1, where the same counter was
  mislabelled, ROCm/amdsmi#22) and ``counter_resolution`` (µJ per count); energy in J =
  accumulator x counter_resolution x 1e-6. The driver caches it at most every 1 ms
  (nominal update period). The dict's ``timestamp`` is on an undocumented clock, so reads
  are stamped by the poll. Zeus found the counter inaccurate on some GPUs: cross-check it
  against power.
- ``power``: ``amdsmi_get_power_info(handle)`` -> dict in W: ``socket_power`` (ROCm 7+),
  else ``current_socket_power`` (MI300+), else ``average_socket_power``; "N/A" marks a
  field the GPU does not have. Which key answers is fixed at discovery and named in notes.

The library is initialised once per process (``amdsmi_init``) and reference-counted; the
last source closed calls ``amdsmi_shut_down``.
"""

from __future__ import annotations

import importlib
import time
from types import ModuleType

from engine.power.base import PowerSource, SourceError, SourceInfo
from engine.power.library import SharedLibrary, open_channel

NOMINAL_UPDATE_PERIOD_S = 1e-3  # "cached by the driver at most every 1 ms"
POWER_KEYS = ("socket_power", "current_socket_power", "average_socket_power")

_library = SharedLibrary(
    "AMD SMI: amdsmi_init",
    lambda lib: lib.amdsmi_init(),
    lambda lib: lib.amdsmi_shut_down(),
    lambda e: _message(e),
)


def _message(exc: BaseException) -> str:
    """A vendor exception as one line (AmdSmiLibraryException carries err_code/err_info)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    code = getattr(exc, "err_code", None)
    return f"{text} (amdsmi error {code})" if code is not None and str(code) not in text else text


def init() -> ModuleType:
    """Initialise AMD SMI (once per process; reference-counted) and return the module.

    Raises SourceError (one line) when amdsmi is missing or amdsmi_init fails.
    """
    try:
        lib = importlib.import_module("amdsmi")
    except ImportError:
        raise SourceError(
            "AMD SMI: the amdsmi Python library is not installed (it ships with ROCm)"
        ) from None
    return _library.acquire(lib)


def shutdown() -> None:
    """Drop one reference taken by ``init``; the last one shuts AMD SMI down."""
    _library.release()


def _number(value) -> float | None:
    """A numeric field value, or None for "N/A" and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class _AmdSmiSource(PowerSource):
    """Common part: the library reference and the processor handle."""

    def __init__(self, index: int, handle) -> None:
        self._lib = init()
        self._closed = False
        self.index = index
        self._handle = handle

    def _call(self, name: str):
        try:
            return getattr(self._lib, name)(self._handle)
        except Exception as exc:
            raise SourceError(f"AMD SMI GPU {self.index}: {name}: {_message(exc)}") from None

    def close(self) -> None:
        """Drop this source's library reference (once)."""
        if not self._closed:
            self._closed = True
            shutdown()


class AmdSmiEnergySource(_AmdSmiSource):
    """The GPU's energy accumulator as cumulative J, polled."""

    def __init__(self, index: int, handle) -> None:
        super().__init__(index, handle)
        self.info = SourceInfo(
            name=f"amdsmi:{index}:energy",
            boundary="gpu-board",
            quantity="energy",
            update_period_s=NOMINAL_UPDATE_PERIOD_S,
            averaging_window_s=None,
            resolution=None,
            stamped_by="poll",
            device=f"AMD GPU {index}",
            notes=(
                "amdsmi_get_energy_count (counts x counter_resolution µJ); update_period_s "
                "nominal (driver cache <= 1 ms); untested on hardware"
            ),
        )

    def read(self) -> tuple[int, float]:
        """(host monotonic ns at the middle of the call, energy in J)."""
        t0 = time.monotonic_ns()
        counts = self._call("amdsmi_get_energy_count")
        t1 = time.monotonic_ns()
        accumulator = counts.get("energy_accumulator", counts.get("power"))
        resolution_uj = counts.get("counter_resolution")
        if _number(accumulator) is None or _number(resolution_uj) is None:
            raise SourceError(
                f"AMD SMI GPU {self.index}: amdsmi_get_energy_count gave no numeric "
                f"accumulator/counter_resolution (keys: {', '.join(sorted(counts))})"
            )
        if self.info.resolution is None:
            # The resolution is only known once the library has reported it.
            self.info = SourceInfo(**{**self.info.to_dict(), "resolution": resolution_uj * 1e-6})
        return (t0 + t1) // 2, float(accumulator) * float(resolution_uj) * 1e-6


class AmdSmiPowerSource(_AmdSmiSource):
    """The GPU's socket power (W), polled; the first numeric key of POWER_KEYS is used."""

    def __init__(self, index: int, handle) -> None:
        super().__init__(index, handle)
        try:
            info = self._call("amdsmi_get_power_info")
        except SourceError:
            self.close()
            raise
        self.key = next((k for k in POWER_KEYS if _number(info.get(k)) is not None), None)
        if self.key is None:
            self.close()
            raise SourceError(
                f"AMD SMI GPU {index}: amdsmi_get_power_info has no numeric {'/'.join(POWER_KEYS)}"
            )
        self.info = SourceInfo(
            name=f"amdsmi:{index}:power",
            boundary="gpu-board",
            quantity="power",
            update_period_s=None,
            averaging_window_s=None,
            resolution=1.0,
            stamped_by="poll",
            device=f"AMD GPU {index}",
            notes=f"amdsmi_get_power_info['{self.key}'] (W); untested on hardware",
        )

    def read(self) -> tuple[int, float]:
        """(host monotonic ns at the middle of the call, power in W)."""
        t0 = time.monotonic_ns()
        info = self._call("amdsmi_get_power_info")
        t1 = time.monotonic_ns()
        power_w = _number(info.get(self.key))
        if power_w is None:
            raise SourceError(
                f"AMD SMI GPU {self.index}: {self.key} is {info.get(self.key)!r}, not a number"
            )
        return (t0 + t1) // 2, power_w


def discover() -> tuple[list[PowerSource], list[str]]:
    """Every AMD SMI channel each AMD GPU here offers, and one line for each missing one.

    Never raises for absence: no library, no driver, no GPU, an unsupported call all become
    reasons.
    """
    try:
        lib = init()
    except SourceError as exc:
        return [], [str(exc)]
    sources: list[PowerSource] = []
    reasons: list[str] = []
    try:
        try:
            handles = list(lib.amdsmi_get_processor_handles())
        except Exception as exc:
            return [], [f"AMD SMI: amdsmi_get_processor_handles failed: {_message(exc)}"]
        if not handles:
            return [], ["AMD SMI: no AMD GPU found"]
        for index, handle in enumerate(handles):
            for label, cls in (("energy", AmdSmiEnergySource), ("power", AmdSmiPowerSource)):
                source, reason = open_channel(
                    lambda cls=cls, index=index, handle=handle: cls(index, handle),
                    lambda s: s.read(),
                    f"AMD SMI GPU {index}: ",
                    label,
                )
                if source is None:
                    reasons.append(reason)
                else:
                    sources.append(source)
        return sources, reasons
    finally:
        shutdown()
