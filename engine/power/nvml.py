"""NVIDIA GPUs through NVML (``pynvml``, from the nvidia-ml-py package).

Channels per GPU, each offered only when a probing read at discovery succeeds:

- ``energy``: ``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver loaded (Volta+),
  as J. Public reports put its update period near 100 ms (20-100 ms by other accounts): the
  SourceInfo carries that as a nominal figure; ``engine.power.probe`` measures the real one.
- ``power-instant``: field ``NVML_FI_DEV_POWER_INSTANT`` (186) via
  ``nvmlDeviceGetFieldValues`` with the scope GPU (0) as ``gpu-board``; the scopes MODULE
  (1, Grace+GPU module) and MEMORY (2) as ``gpu-module`` / ``gpu-memory`` where supported.
  Values are mW; each carries NVML's CPU timestamp (µs since 1970), mapped to host monotonic
  ns.
- ``power-average``: ``nvmlDeviceGetPowerUsage`` (mW), a 1 s average on Ampere (except GA100)
  and newer: useless for short windows, kept for cross-checks.
- ``power-samples``: ``nvmlDeviceGetSamples(h, NVML_TOTAL_POWER_SAMPLES, last_seen_us)``, the
  driver's own buffer of power samples (mW) with CPU µs timestamps, read incrementally by
  ``read_buffered``. Buffer depth and sample rate are undocumented: measure them.

API looked up in nvidia-ml-py 13.x (``pynvml.py``) and nvml.h: field values are requested
as ``(fieldId, scopeId)`` tuples and come back as ``c_nvmlFieldValue_t`` with ``timestamp``
(µs since 1970, CPU clock), ``nvmlReturn``, ``valueType`` and the ``value`` union;
``nvmlDeviceGetSamples`` returns ``(valueType, [c_nvmlSample_t(timeStamp, sampleValue)])``
and raises NVML_ERROR_NOT_FOUND when no sample is newer than the given timestamp.

NVML is initialised once per process and reference-counted: every source holds one
reference and ``close`` drops it; the last one shuts NVML down.
"""

from __future__ import annotations

import importlib
import time
from types import ModuleType

import numpy as np

from engine.power.base import PowerSource, SourceError, SourceInfo
from engine.power.library import SharedLibrary, open_channel
from engine.power.probe import wall_to_monotonic_offset_ns

FIELD_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT, for bindings too old to name it
SCOPES = {"gpu": 0, "module": 1, "memory": 2}  # NVML_POWER_SCOPE_GPU / _MODULE / _MEMORY
SCOPE_BOUNDARY = {"gpu": "gpu-board", "module": "gpu-module", "memory": "gpu-memory"}

ERROR_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED
ERROR_NO_PERMISSION = 4  # NVML_ERROR_NO_PERMISSION
ERROR_NOT_FOUND = 6  # NVML_ERROR_NOT_FOUND
ERROR_FUNCTION_NOT_FOUND = 13  # NVML_ERROR_FUNCTION_NOT_FOUND

# nvmlClocksEventReason* bits, from nvml.h / pynvml (same bits as the deprecated
# nvmlClocksThrottleReason* names).
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

NOMINAL_COUNTER_PERIOD_S = 0.1  # public reports: ~100 ms on A100/H100 (20-100 ms elsewhere)
NVML_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")

_library = SharedLibrary(
    "NVML: nvmlInit", lambda nv: nv.nvmlInit(), lambda nv: nv.nvmlShutdown(), lambda e: _message(e)
)


def _module() -> ModuleType:
    """The ``pynvml`` module (whatever ``sys.modules`` holds, so tests can substitute one)."""
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise SourceError(
            f"NVML: pynvml is not importable ({exc}); pip install nvidia-ml-py"
        ) from None


def _message(exc: BaseException) -> str:
    """A vendor exception as one line: its text and, for NVMLError, its code."""
    try:
        text = str(exc)
    except Exception:  # NVMLError.__str__ calls into the library, which may itself fail
        text = ""
    code = getattr(exc, "value", None)
    text = " ".join((text or type(exc).__name__).split())
    return f"{text} (NVML error {code})" if isinstance(code, int) else text


def _return_text(nv: ModuleType, ret: int) -> str:
    """An nvmlReturn_t code as text, the way pynvml words it where it can."""
    try:
        return _message(nv.NVMLError(ret))
    except Exception:
        return f"NVML error {ret}"


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "value", None)
    return code if isinstance(code, int) else None


def init() -> ModuleType:
    """Initialise NVML (once per process; reference-counted) and return the pynvml module.

    Raises SourceError (one line) when pynvml is missing or nvmlInit fails.
    """
    return _library.acquire(_module())


def shutdown() -> None:
    """Drop one reference taken by ``init``; the last one shuts NVML down."""
    _library.release()


def _call(what: str, index: int, fn, *args):
    """Call an NVML function, turning any vendor error into a one-line SourceError."""
    try:
        return fn(*args)
    except Exception as exc:
        err = SourceError(f"NVML GPU {index}: {what}: {_message(exc)}")
        err.nvml_code = _code(exc)  # type: ignore[attr-defined]
        raise err from None


def _value_of(value_union, value_type: int | None) -> float:
    """The number in an ``nvmlValue_t`` union, read through the member ``valueType`` names."""
    # NVML_VALUE_TYPE_DOUBLE=0, UNSIGNED_INT=1, UNSIGNED_LONG=2, UNSIGNED_LONG_LONG=3,
    # SIGNED_LONG_LONG=4, SIGNED_INT=5, UNSIGNED_SHORT=6
    if value_type is not None and 0 <= value_type < len(NVML_VALUE_MEMBERS):
        return float(getattr(value_union, NVML_VALUE_MEMBERS[value_type]))
    return float(value_union.uiVal)


def wall_us_to_monotonic_ns(wall_us: np.ndarray | int, offset_ns: int) -> np.ndarray:
    """NVML CPU timestamps (µs since 1970) as host monotonic ns, given the host's
    ``time_ns() - monotonic_ns()`` offset in ns."""
    return np.asarray(wall_us, dtype=np.int64) * 1000 - np.int64(offset_ns)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSource(PowerSource):
    """Common part: NVML reference, device handle, name."""

    def __init__(self, index: int) -> None:
        self._nv = init()
        self._closed = False
        try:
            self.index = index
            self._handle = _call(
                "nvmlDeviceGetHandleByIndex", index, self._nv.nvmlDeviceGetHandleByIndex, index
            )
            self.gpu_name = _text(
                _call("nvmlDeviceGetName", index, self._nv.nvmlDeviceGetName, self._handle)
            )
            try:
                self.uuid: str | None = _text(self._nv.nvmlDeviceGetUUID(self._handle))
            except Exception:  # the UUID only labels the record
                self.uuid = None
        except SourceError:
            self.close()
            raise

    @property
    def device(self) -> str:
        """How the record names this GPU."""
        uuid = f" {self.uuid}" if self.uuid else ""
        return f"GPU {self.index} {self.gpu_name}{uuid}"

    def close(self) -> None:
        """Drop this source's NVML reference (once)."""
        if not self._closed:
            self._closed = True
            shutdown()


class NvmlEnergySource(NvmlSource):
    """The board's cumulative energy counter (J), polled."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.info = SourceInfo(
            name=f"nvml:{index}:energy",
            boundary="gpu-board",
            quantity="energy",
            update_period_s=NOMINAL_COUNTER_PERIOD_S,
            averaging_window_s=None,
            resolution=1e-3,
            stamped_by="poll",
            device=self.device,
            notes=(
                "nvmlDeviceGetTotalEnergyConsumption (mJ since driver load); update_period_s "
                "is nominal (public reports ~100 ms, 20-100 ms elsewhere): measure it with "
                "engine.power.probe"
            ),
        )

    def read(self) -> tuple[int, float]:
        """(host monotonic ns at the middle of the call, energy in J since driver load)."""
        t0 = time.monotonic_ns()
        energy_mj = _call(
            "nvmlDeviceGetTotalEnergyConsumption",
            self.index,
            self._nv.nvmlDeviceGetTotalEnergyConsumption,
            self._handle,
        )
        t1 = time.monotonic_ns()
        return (t0 + t1) // 2, float(energy_mj) * 1e-3


class NvmlInstantPowerSource(NvmlSource):
    """Instant power (W) of one scope, stamped with NVML's CPU timestamp of the value."""

    def __init__(self, index: int, scope: str = "gpu") -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {tuple(SCOPES)}, got {scope!r}")
        super().__init__(index)
        self.scope = scope
        field_id = getattr(self._nv, "NVML_FI_DEV_POWER_INSTANT", FIELD_POWER_INSTANT)
        scope_id = getattr(self._nv, f"NVML_POWER_SCOPE_{scope.upper()}", SCOPES[scope])
        self._request = [(field_id, scope_id)]
        suffix = "" if scope == "gpu" else f"-{scope}"
        self.info = SourceInfo(
            name=f"nvml:{index}:power-instant{suffix}",
            boundary=SCOPE_BOUNDARY[scope],
            quantity="power",
            update_period_s=NOMINAL_COUNTER_PERIOD_S,
            averaging_window_s=None,
            resolution=1e-3,
            stamped_by="sensor",
            device=self.device,
            notes=(
                f"NVML_FI_DEV_POWER_INSTANT scope {scope} (mW); stamped with NVML's CPU "
                "timestamp of the value, mapped to host monotonic ns; update_period_s is "
                "nominal (H100 measured ~100 ms from a ~21-25 ms averaging window, SC24): "
                "measure it with engine.power.probe"
            ),
        )

    def read(self) -> tuple[int, float]:
        """(host monotonic ns of NVML's stamp on the value, power in W)."""
        values = _call(
            f"nvmlDeviceGetFieldValues(POWER_INSTANT, scope {self.scope})",
            self.index,
            self._nv.nvmlDeviceGetFieldValues,
            self._handle,
            self._request,
        )
        t_read_ns = time.monotonic_ns()
        offset_ns, _ = wall_to_monotonic_offset_ns()
        fv = values[0]
        ret = int(fv.nvmlReturn)
        if ret != 0:  # the call succeeded but this field did not: its own return code says why
            err = SourceError(
                f"NVML GPU {self.index}: nvmlDeviceGetFieldValues(POWER_INSTANT, scope "
                f"{self.scope}): {_return_text(self._nv, ret)}"
            )
            err.nvml_code = ret  # type: ignore[attr-defined]
            raise err
        power_w = _value_of(fv.value, int(fv.valueType)) * 1e-3
        stamp_us = int(fv.timestamp)
        if stamp_us <= 0:  # no stamp: the read itself is the best time we have
            return t_read_ns, power_w
        # A stamp after the read can only be clock noise (the value cannot come from the
        # future): hold it at the read time so samples stay causal.
        t_ns = min(int(wall_us_to_monotonic_ns(stamp_us, offset_ns)), t_read_ns)
        return t_ns, power_w


class NvmlAveragePowerSource(NvmlSource):
    """``nvmlDeviceGetPowerUsage`` (W): a 1 s average on Ampere (except GA100) and newer."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        window_s, window_note = self._window()
        self.info = SourceInfo(
            name=f"nvml:{index}:power-average",
            boundary="gpu-board",
            quantity="power",
            update_period_s=None,
            averaging_window_s=window_s,
            resolution=1e-3,
            stamped_by="poll",
            device=self.device,
            notes=f"nvmlDeviceGetPowerUsage (mW); {window_note}",
        )

    def _window(self) -> tuple[float | None, str]:
        """The averaging window NVIDIA documents for this GPU's architecture, if any."""
        ampere = getattr(self._nv, "NVML_DEVICE_ARCH_AMPERE", 7)
        try:
            arch = int(self._nv.nvmlDeviceGetArchitecture(self._handle))
        except Exception:
            return None, "averaging window unknown (architecture not readable)"
        # GA100 boards (A100, A30) are the documented exception among Ampere parts.
        ga100 = any(tag in self.gpu_name for tag in ("A100", "A30"))
        if arch >= ampere and not ga100:
            return 1.0, "1 s average (Ampere except GA100, and newer)"
        return None, "averaging window undocumented for this architecture"

    def read(self) -> tuple[int, float]:
        """(host monotonic ns at the middle of the call, power in W)."""
        t0 = time.monotonic_ns()
        power_mw = _call(
            "nvmlDeviceGetPowerUsage", self.index, self._nv.nvmlDeviceGetPowerUsage, self._handle
        )
        t1 = time.monotonic_ns()
        return (t0 + t1) // 2, float(power_mw) * 1e-3


class NvmlBufferedPowerSource(NvmlSource):
    """The driver's buffered power samples (W), each stamped by the driver (CPU µs)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self._sample_type = getattr(self._nv, "NVML_TOTAL_POWER_SAMPLES", 0)
        # 0 asks for the whole buffer: the first read_buffered drains what the driver holds.
        self.last_seen_us = 0
        self.info = SourceInfo(
            name=f"nvml:{index}:power-samples",
            boundary="gpu-board",
            quantity="power",
            update_period_s=None,
            averaging_window_s=None,
            resolution=1e-3,
            stamped_by="sensor",
            device=self.device,
            notes=(
                "nvmlDeviceGetSamples(NVML_TOTAL_POWER_SAMPLES) (mW, CPU µs stamps mapped to "
                "host monotonic ns); buffer depth and sample rate undocumented: measure them"
            ),
        )

    def _fetch(self, since_us: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples newer than ``since_us`` as (wall µs int64, W float64), oldest first."""
        try:
            value_type, samples = self._nv.nvmlDeviceGetSamples(
                self._handle, self._sample_type, since_us
            )
        except Exception as exc:
            if _code(exc) == getattr(self._nv, "NVML_ERROR_NOT_FOUND", ERROR_NOT_FOUND):
                return np.empty(0, np.int64), np.empty(0, np.float64)
            err = SourceError(f"NVML GPU {self.index}: nvmlDeviceGetSamples: {_message(exc)}")
            err.nvml_code = _code(exc)  # type: ignore[attr-defined]
            raise err from None
        stamps_us = np.array([int(s.timeStamp) for s in samples], dtype=np.int64)
        power_w = np.array(
            [_value_of(s.sampleValue, int(value_type)) * 1e-3 for s in samples], dtype=np.float64
        )
        # The driver answers with samples newer than since_us; keep only those, in time order,
        # and no stamp twice, whatever a given driver version does at the edges.
        keep = stamps_us > since_us
        stamps_us, power_w = stamps_us[keep], power_w[keep]
        order = np.argsort(stamps_us, kind="stable")
        stamps_us, power_w = stamps_us[order], power_w[order]
        if stamps_us.size > 1:
            first = np.concatenate(([True], np.diff(stamps_us) > 0))
            stamps_us, power_w = stamps_us[first], power_w[first]
        return stamps_us, power_w

    def read_buffered(self) -> tuple[np.ndarray, np.ndarray]:
        """The samples buffered since the last call: (host monotonic ns int64, W float64)."""
        stamps_us, power_w = self._fetch(self.last_seen_us)
        offset_ns, _ = wall_to_monotonic_offset_ns()
        t_ns = wall_us_to_monotonic_ns(stamps_us, offset_ns)
        if stamps_us.size:
            self.last_seen_us = int(stamps_us[-1])
            self._newest = (int(t_ns[-1]), float(power_w[-1]))
        return t_ns, power_w

    def read(self) -> tuple[int, float]:
        """The newest buffered sample: (host monotonic ns of its stamp, W); does not move the
        ``read_buffered`` position. Once ``read_buffered`` has run, this is the newest sample
        it saw (no driver call: fetching the whole buffer at every poll is costly and adds
        nothing the buffer drain does not). Raises SourceError when the buffer is empty."""
        newest = getattr(self, "_newest", None)
        if newest is not None:
            return newest
        stamps_us, power_w = self._fetch(0)
        if not stamps_us.size:
            raise SourceError(f"NVML GPU {self.index}: the power sample buffer is empty")
        offset_ns, _ = wall_to_monotonic_offset_ns()
        return int(wall_us_to_monotonic_ns(stamps_us[-1], offset_ns)), float(power_w[-1])


def decode_clock_event_reasons(bits: int) -> list[str]:
    """Names of the set bits of an nvmlClocksEventReason mask (unknown bits as hex)."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if bits & bit]
    unknown = bits & ~sum(CLOCK_EVENT_REASONS)
    bit = 1
    while unknown:
        if unknown & bit:
            names.append(f"unknown_0x{bit:x}")
            unknown &= ~bit
        bit <<= 1
    return names


def device_state(handle_or_index) -> dict:
    """A GPU's state for the record: ``power_limit_w`` (W), ``sm_clock_mhz``,
    ``mem_clock_mhz`` (MHz), ``temperature_c`` (°C), ``clock_event_reasons`` (names) and
    ``clock_event_reasons_bits`` (int); each None when unreadable, with the reason in
    ``unavailable`` (name -> one line). Accepts a GPU index or an NVML handle.

    Raises SourceError only when NVML itself cannot be initialised.
    """
    nv = init()
    try:
        state: dict = {
            "power_limit_w": None,
            "sm_clock_mhz": None,
            "mem_clock_mhz": None,
            "temperature_c": None,
            "clock_event_reasons": None,
            "clock_event_reasons_bits": None,
            "unavailable": {},
        }
        index = handle_or_index if isinstance(handle_or_index, int) else -1
        if isinstance(handle_or_index, int):
            try:
                handle = _call(
                    "nvmlDeviceGetHandleByIndex", index, nv.nvmlDeviceGetHandleByIndex, index
                )
            except SourceError as exc:
                state["unavailable"]["device"] = str(exc)
                return state
        else:
            handle = handle_or_index

        def get(key: str, name: str, *args, what: str | None = None):
            fn = getattr(nv, name, None)
            if fn is None:
                state["unavailable"][key] = f"{name} is not in this pynvml"
                return None
            try:
                return _call(what or name, index, fn, handle, *args)
            except SourceError as exc:
                state["unavailable"][key] = str(exc)
                return None

        limit_mw = get("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit")
        if limit_mw is not None:
            state["power_limit_w"] = float(limit_mw) * 1e-3
        clock = "nvmlDeviceGetClockInfo"
        sm_mhz = get("sm_clock_mhz", clock, getattr(nv, "NVML_CLOCK_SM", 1), what=f"{clock}(SM)")
        mem_mhz = get(
            "mem_clock_mhz", clock, getattr(nv, "NVML_CLOCK_MEM", 2), what=f"{clock}(MEM)"
        )
        temp_c = get(
            "temperature_c", "nvmlDeviceGetTemperature", getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        )
        state["sm_clock_mhz"] = None if sm_mhz is None else float(sm_mhz)
        state["mem_clock_mhz"] = None if mem_mhz is None else float(mem_mhz)
        state["temperature_c"] = None if temp_c is None else float(temp_c)

        bits = get("clock_event_reasons", "nvmlDeviceGetCurrentClocksEventReasons")
        if bits is None:
            # Older drivers and bindings only have the deprecated name for the same bits.
            old = get("clock_event_reasons_old", "nvmlDeviceGetCurrentClocksThrottleReasons")
            if old is not None:
                bits = old
                state["unavailable"].pop("clock_event_reasons", None)
            else:
                state["unavailable"].pop("clock_event_reasons_old", None)
        if bits is not None:
            state["clock_event_reasons_bits"] = int(bits)
            state["clock_event_reasons"] = decode_clock_event_reasons(int(bits))
        return state
    finally:
        shutdown()


SOURCE_KINDS = (
    ("energy", lambda i: NvmlEnergySource(i)),
    ("instant power (scope gpu)", lambda i: NvmlInstantPowerSource(i, "gpu")),
    ("instant power (scope module)", lambda i: NvmlInstantPowerSource(i, "module")),
    ("instant power (scope memory)", lambda i: NvmlInstantPowerSource(i, "memory")),
    ("average power", lambda i: NvmlAveragePowerSource(i)),
    ("buffered power samples", lambda i: NvmlBufferedPowerSource(i)),
)


def _probe(source: PowerSource) -> None:
    """One read of each kind the source offers, so discovery keeps only what works."""
    if source.read_buffered() is None:
        source.read()


def discover() -> tuple[list[PowerSource], list[str]]:
    """Every NVML channel every GPU here supports, and one line for each that is missing.

    Never raises for absence: no pynvml, no driver, no GPU, an unsupported field all become
    reasons.
    """
    try:
        nv = init()
    except SourceError as exc:
        return [], [str(exc)]
    sources: list[PowerSource] = []
    reasons: list[str] = []
    try:
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:
            return [], [f"NVML: nvmlDeviceGetCount failed: {_message(exc)}"]
        if count == 0:
            return [], ["NVML: no NVIDIA GPU found"]
        for index in range(count):
            for label, make in SOURCE_KINDS:
                source, reason = open_channel(
                    lambda make=make, index=index: make(index),
                    _probe,
                    f"NVML GPU {index}: ",
                    label,
                )
                if source is None:
                    reasons.append(reason)
                else:
                    sources.append(source)
        return sources, reasons
    finally:
        shutdown()


def index_of_pci_bus_id(pci_bus_id: str) -> int | None:
    """NVML's index of the GPU at ``pci_bus_id`` (e.g. "0000:1B:00.0", as CUDA reports it),
    or None where NVML cannot say. CUDA's device numbering follows CUDA_VISIBLE_DEVICES and
    may differ from NVML's, so a backend's GPU is matched to its sensors by bus id."""
    try:
        nv = init()
    except SourceError:
        return None
    try:
        handle = nv.nvmlDeviceGetHandleByPciBusId(pci_bus_id.encode())
        return int(nv.nvmlDeviceGetIndex(handle))
    except Exception:  # an unknown bus id or an old driver: the caller keeps every GPU
        return None
    finally:
        shutdown()
