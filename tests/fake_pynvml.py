"""A stand-in for the ``pynvml`` module: the names ``engine.power.nvml`` uses, driven by state
a test sets (counters in mJ it advances, stamps it controls, fields a GPU lacks, errors).

Use: ``fake = FakeNvml([FakeGpu(...)]); monkeypatch.setitem(sys.modules, "pynvml", fake)``.
It mirrors nvidia-ml-py's shapes: ``NVMLError(code)`` with ``.value``; field values with
``fieldId, scopeId, timestamp (µs since 1970), valueType, nvmlReturn, value.<member>``;
``nvmlDeviceGetSamples`` returning ``(valueType, [sample(timeStamp, sampleValue)])`` and
raising NVML_ERROR_NOT_FOUND when nothing is newer than the given stamp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12

_ERROR_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: carries the code in ``.value``; ``str`` is the code's text."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_TEXT.get(self.value, f"NVML Error with code {self.value}")


def _union(value_type: int, number) -> SimpleNamespace:
    """An nvmlValue_t with only the member ``value_type`` names holding ``number``; the others
    hold garbage, as a C union read through the wrong member would."""
    members = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
    union = SimpleNamespace(**{m: -987654321 for m in members})
    setattr(union, members[value_type], number)
    return union


@dataclass
class FakeGpu:
    """One GPU's state. Powers in mW, energy in mJ, stamps in µs since 1970."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    architecture: int = 9  # Hopper
    pci_bus_id: str = "00000000:00:00.0"
    energy_mj: int = 0
    average_mw: int = 0
    # scope id -> (mW, stamp µs); a scope absent here answers NOT_SUPPORTED in its field value
    instant: dict = field(default_factory=dict)
    instant_value_type: int = 1  # NVML_VALUE_TYPE_UNSIGNED_INT
    samples: list = field(default_factory=list)  # [(stamp µs, mW)]
    samples_value_type: int = 1
    samples_inclusive: bool = False  # also return the sample stamped exactly last_seen_us
    power_limit_mw: int = 700_000
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    temperature_c: int = 40
    reason_bits: int = 0
    errors: dict = field(default_factory=dict)  # function name -> NVML error code it raises
    calls: list = field(default_factory=list)  # (function name, args) in call order


class FakeNvml(ModuleType):
    """The fake module. ``init_error`` makes nvmlInit fail with that code."""

    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_POWER_SCOPE_GPU = 0
    NVML_POWER_SCOPE_MODULE = 1
    NVML_POWER_SCOPE_MEMORY = 2
    NVML_TOTAL_POWER_SAMPLES = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0
    NVML_DEVICE_ARCH_AMPERE = 7
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0
        self.live = 0

    def _gpu(self, handle, fn: str, *args) -> FakeGpu:
        if self.live <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle]
        gpu.calls.append((fn, args))
        if fn in gpu.errors:
            raise NVMLError(gpu.errors[fn])
        return gpu

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.live += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.live -= 1

    def nvmlDeviceGetCount(self) -> int:
        if self.live <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.gpus):
            raise NVMLError(2)
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: bytes) -> int:
        want = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
        for index, gpu in enumerate(self.gpus):
            if gpu.pci_bus_id.lower() == want.lower():
                self._gpu(index, "nvmlDeviceGetHandleByPciBusId")
                return index
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, handle) -> int:
        self._gpu(handle, "nvmlDeviceGetIndex")
        return handle

    def nvmlDeviceGetName(self, handle) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetArchitecture(self, handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetArchitecture").architecture

    def nvmlDeviceGetTotalEnergyConsumption(self, handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").average_mw

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues", list(field_ids))
        out = []
        for item in field_ids:
            field_id, scope_id = item if isinstance(item, tuple) else (item, 0)
            if field_id != 186 or scope_id not in gpu.instant:
                out.append(
                    SimpleNamespace(
                        fieldId=field_id,
                        scopeId=scope_id,
                        timestamp=0,
                        latencyUsec=0,
                        valueType=0,
                        nvmlReturn=NVML_ERROR_NOT_SUPPORTED,
                        value=_union(0, 0.0),
                    )
                )
                continue
            power_mw, stamp_us = gpu.instant[scope_id]
            out.append(
                SimpleNamespace(
                    fieldId=field_id,
                    scopeId=scope_id,
                    timestamp=stamp_us,
                    latencyUsec=0,
                    valueType=gpu.instant_value_type,
                    nvmlReturn=NVML_SUCCESS,
                    value=_union(gpu.instant_value_type, power_mw),
                )
            )
        return out

    def nvmlDeviceGetSamples(self, handle, sampling_type: int, last_seen_us: int):
        gpu = self._gpu(handle, "nvmlDeviceGetSamples", sampling_type, last_seen_us)
        newer = [
            (t, p)
            for t, p in gpu.samples
            if t > last_seen_us or (gpu.samples_inclusive and t == last_seen_us)
        ]
        if not newer:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return (
            gpu.samples_value_type,
            [
                SimpleNamespace(timeStamp=t, sampleValue=_union(gpu.samples_value_type, p))
                for t, p in newer
            ],
        )

    def nvmlDeviceGetEnforcedPowerLimit(self, handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetClockInfo(self, handle, clock_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo", clock_type)
        return {1: gpu.sm_clock_mhz, 2: gpu.mem_clock_mhz}[clock_type]

    def nvmlDeviceGetTemperature(self, handle, sensor: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperature", sensor).temperature_c

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").reason_bits

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle) -> int:
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksThrottleReasons").reason_bits
