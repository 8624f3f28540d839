"""engine.power.nvml against a stand-in pynvml: unit conversions, clock mapping, discovery,
error translation, incremental buffered samples, reason-bit decoding."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import pytest
from fake_pynvml import (
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    FakeGpu,
    FakeNvml,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.power import nvml
from engine.power.base import SourceError

SETTINGS = settings(derandomize=True, deadline=None, max_examples=40)


def _install(monkeypatch, gpus, **kwargs) -> FakeNvml:
    fake = FakeNvml(gpus, **kwargs)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


@contextlib.contextmanager
def _fake(gpus, **kwargs):
    """The fake installed as pynvml for one hypothesis example (function-scoped fixtures
    are not reset between examples)."""
    with pytest.MonkeyPatch.context() as mp:
        yield _install(mp, gpus, **kwargs)


def _wall_offset_ns() -> int:
    """time_ns - monotonic_ns, measured independently of the code under test."""
    best = None
    for _ in range(20):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) // 2)
    return best[1]


@SETTINGS
@given(energy_mj=st.integers(0, 2**63 - 1))
def test_energy_counter_is_joules(energy_mj):
    gpu = FakeGpu(energy_mj=energy_mj)
    with _fake([gpu]):
        src = nvml.NvmlEnergySource(0)
        try:
            t_before = time.monotonic_ns()
            t_ns, energy_j = src.read()
            t_after = time.monotonic_ns()
            assert energy_j == pytest.approx(energy_mj / 1000.0, rel=1e-15)
            assert t_before <= t_ns <= t_after
            assert src.info.quantity == "energy" and src.info.boundary == "gpu-board"
            assert src.info.resolution == 1e-3
        finally:
            src.close()


@SETTINGS
@given(
    power_mw=st.integers(0, 2_000_000),
    age_us=st.integers(0, 5_000_000),
    value_type=st.sampled_from([1, 2, 3, 4, 5]),
    scope=st.sampled_from(["gpu", "module", "memory"]),
)
def test_instant_power_watts_and_stamp_mapping(power_mw, age_us, value_type, scope):
    scope_id = nvml.SCOPES[scope]
    stamp_us = time.time_ns() // 1000 - age_us
    gpu = FakeGpu(instant={scope_id: (power_mw, stamp_us)}, instant_value_type=value_type)
    with _fake([gpu]):
        src = nvml.NvmlInstantPowerSource(0, scope)
        try:
            t_ns, power_w = src.read()
            expected_t_ns = stamp_us * 1000 - _wall_offset_ns()
            assert power_w == pytest.approx(power_mw / 1000.0, rel=1e-15)
            # the two offset measurements can differ by the clock-read bracket (µs), not more
            assert abs(t_ns - expected_t_ns) < 200_000
            assert (
                src.info.boundary
                == {
                    "gpu": "gpu-board",
                    "module": "gpu-module",
                    "memory": "gpu-memory",
                }[scope]
            )
            assert src.info.stamped_by == "sensor"
            # the request carried the scope as a (fieldId, scopeId) tuple
            assert gpu.calls[-1] == ("nvmlDeviceGetFieldValues", ([(186, scope_id)],))
        finally:
            src.close()


def test_instant_power_stamp_from_the_future_is_held_at_the_read(monkeypatch):
    stamp_us = time.time_ns() // 1000 + 10_000_000
    _install(monkeypatch, [FakeGpu(instant={0: (123_456, stamp_us)})])
    src = nvml.NvmlInstantPowerSource(0)
    t_ns, power_w = src.read()
    assert t_ns <= time.monotonic_ns()
    assert power_w == pytest.approx(123.456)
    src.close()


def test_unsupported_field_value_is_one_line_source_error(monkeypatch):
    _install(monkeypatch, [FakeGpu(instant={})])
    src = nvml.NvmlInstantPowerSource(0, "module")
    with pytest.raises(SourceError) as info:
        src.read()
    message = str(info.value)
    assert "\n" not in message and "Not Supported" in message and "module" in message
    src.close()


@pytest.mark.parametrize(
    "code, text", [(NVML_ERROR_NO_PERMISSION, "Insufficient Permissions"), (999, "999")]
)
def test_vendor_error_becomes_one_line_source_error(monkeypatch, code, text):
    gpu = FakeGpu(energy_mj=5)
    _install(monkeypatch, [gpu])
    src = nvml.NvmlEnergySource(0)
    gpu.errors["nvmlDeviceGetTotalEnergyConsumption"] = code
    with pytest.raises(SourceError) as info:
        src.read()
    message = str(info.value)
    assert "\n" not in message and text in message and "GPU 0" in message
    assert not isinstance(info.value.__cause__, Exception)
    src.close()


def test_average_power_watts_and_window(monkeypatch):
    _install(monkeypatch, [FakeGpu(average_mw=312_345), FakeGpu(name="NVIDIA A100-SXM4-80GB")])
    hopper, a100 = nvml.NvmlAveragePowerSource(0), nvml.NvmlAveragePowerSource(1)
    assert hopper.read()[1] == pytest.approx(312.345)
    assert hopper.info.averaging_window_s == 1.0
    assert a100.info.averaging_window_s is None  # GA100 is the documented exception
    hopper.close()
    a100.close()


@SETTINGS
@given(
    batches=st.lists(
        st.lists(
            st.tuples(st.integers(1, 50_000), st.integers(0, 1_500_000)), min_size=0, max_size=8
        ),
        min_size=1,
        max_size=5,
    ),
    shuffle_seed=st.integers(0, 2**32 - 1),
)
def test_buffered_samples_are_incremental_and_mapped(batches, shuffle_seed):
    gpu = FakeGpu()
    with _fake([gpu]):
        src = nvml.NvmlBufferedPowerSource(0)
        rng = np.random.default_rng(shuffle_seed)
        stamp_us = time.time_ns() // 1000 - 60_000_000
        try:
            for batch in batches:
                new = []
                for gap_us, power_mw in batch:
                    stamp_us += gap_us
                    new.append((stamp_us, power_mw))
                # the driver's order is not promised: hand the batch over shuffled
                shuffled = [new[i] for i in rng.permutation(len(new))]
                gpu.samples.extend(shuffled)
                seen_before = src.last_seen_us
                t_ns, power_w = src.read_buffered()
                offset_ns = _wall_offset_ns()
                assert gpu.calls[-1][1][1] == seen_before  # asked only for what is newer
                assert t_ns.dtype == np.int64 and power_w.dtype == np.float64
                assert len(t_ns) == len(new)
                if new:
                    expected_t = np.array([s for s, _ in new], dtype=np.int64) * 1000 - offset_ns
                    assert np.all(np.abs(t_ns - expected_t) < 200_000)
                    assert np.all(np.diff(t_ns) > 0)
                    np.testing.assert_allclose(power_w, [p / 1000.0 for _, p in new], rtol=1e-15)
                    assert src.last_seen_us == new[-1][0]
                else:
                    assert src.last_seen_us == seen_before
        finally:
            src.close()


def test_buffered_samples_are_not_repeated_by_an_inclusive_driver(monkeypatch):
    # a driver that also hands back the sample stamped exactly last_seen must not make the
    # source report it twice
    now_us = time.time_ns() // 1000
    gpu = FakeGpu(samples=[(now_us - 200, 1000)], samples_inclusive=True)
    _install(monkeypatch, [gpu])
    src = nvml.NvmlBufferedPowerSource(0)
    assert src.read_buffered()[1].tolist() == [1.0]
    assert src.read_buffered()[1].tolist() == []
    gpu.samples.append((now_us - 100, 3000))
    assert src.read_buffered()[1].tolist() == [3.0]
    src.close()


def test_buffered_read_returns_newest_without_moving_position(monkeypatch):
    now_us = time.time_ns() // 1000
    gpu = FakeGpu(samples=[(now_us - 300, 100_000), (now_us - 100, 250_500)])
    _install(monkeypatch, [gpu])
    src = nvml.NvmlBufferedPowerSource(0)
    assert src.read()[1] == pytest.approx(250.5)
    assert src.last_seen_us == 0
    assert len(src.read_buffered()[0]) == 2
    # Once drained, a poll reads the newest drained sample without asking the driver again.
    calls = sum(fn == "nvmlDeviceGetSamples" for fn, _ in gpu.calls)
    t_ns, power_w = src.read()
    assert power_w == pytest.approx(250.5)
    assert abs(t_ns - (time.monotonic_ns() - 100_000)) < 50_000_000
    assert sum(fn == "nvmlDeviceGetSamples" for fn, _ in gpu.calls) == calls
    src.close()


def test_discovery_lists_supported_channels_and_reasons_for_the_rest(monkeypatch):
    now_us = time.time_ns() // 1000
    full = FakeGpu(
        energy_mj=1000,
        average_mw=5000,
        instant={0: (5000, now_us), 1: (6000, now_us), 2: (700, now_us)},
        samples=[(now_us, 5000)],
    )
    partial = FakeGpu(
        instant={0: (5000, now_us)},
        errors={
            "nvmlDeviceGetTotalEnergyConsumption": NVML_ERROR_NO_PERMISSION,
            "nvmlDeviceGetSamples": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetPowerUsage": NVML_ERROR_NOT_SUPPORTED,
        },
    )
    fake = _install(monkeypatch, [full, partial])
    sources, reasons = nvml.discover()
    names = {s.info.name for s in sources}
    assert names == {
        "nvml:0:energy",
        "nvml:0:power-instant",
        "nvml:0:power-instant-module",
        "nvml:0:power-instant-memory",
        "nvml:0:power-average",
        "nvml:0:power-samples",
        "nvml:1:power-instant",
    }
    assert len(reasons) == 5  # energy, module, memory, average, samples on GPU 1
    assert all(r.startswith("NVML GPU 1:") and "\n" not in r for r in reasons)
    assert any("energy" in r and "Insufficient Permissions" in r for r in reasons)
    assert sum("Not Supported" in r for r in reasons) == 4
    # one nvmlInit for the process; the last close shuts NVML down once
    assert fake.init_calls == 1 and fake.shutdown_calls == 0
    for s in sources:
        s.close()
        s.close()  # a second close must not drop another reference
    assert fake.shutdown_calls == 1 and fake.live == 0


def test_discovery_without_nvml_gives_reasons_not_exceptions(monkeypatch):
    _install(monkeypatch, [], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    sources, reasons = nvml.discover()
    assert sources == [] and len(reasons) == 1
    assert "nvmlInit" in reasons[0] and "Library Not Found" in reasons[0]

    _install(monkeypatch, [])
    sources, reasons = nvml.discover()
    assert sources == [] and reasons == ["NVML: no NVIDIA GPU found"]

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    sources, reasons = nvml.discover()
    assert sources == [] and "nvidia-ml-py" in reasons[0]


# The reason bits as nvml.h defines them: written out here, not taken from the code under test.
NVML_H_REASONS = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
]


@SETTINGS
@given(
    chosen=st.lists(st.sampled_from(NVML_H_REASONS), unique=True),
    unknown_bit=st.sampled_from([None, 0x200, 0x10000]),
    limit_mw=st.integers(1, 2_000_000),
)
def test_device_state_decodes_reason_bits_and_units(chosen, unknown_bit, limit_mw):
    bits = sum(b for b, _ in chosen) | (unknown_bit or 0)
    gpu = FakeGpu(reason_bits=bits, power_limit_mw=limit_mw, sm_clock_mhz=1755, temperature_c=61)
    with _fake([gpu]) as fake:
        state = nvml.device_state(0)
        expected = {name for _, name in chosen} | (
            {f"unknown_0x{unknown_bit:x}"} if unknown_bit else set()
        )
        assert set(state["clock_event_reasons"]) == expected
        assert state["clock_event_reasons_bits"] == bits
        assert state["power_limit_w"] == pytest.approx(limit_mw / 1000.0)
        assert state["sm_clock_mhz"] == 1755.0 and state["temperature_c"] == 61.0
        assert state["unavailable"] == {}
        assert fake.live == 0  # device_state leaves NVML as it found it


def test_device_state_falls_back_to_throttle_reasons_and_reports_unknowns(monkeypatch):
    gpu = FakeGpu(
        reason_bits=0x4 | 0x40,
        errors={
            "nvmlDeviceGetCurrentClocksEventReasons": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetTemperature": NVML_ERROR_NO_PERMISSION,
        },
    )
    _install(monkeypatch, [gpu])
    state = nvml.device_state(0)
    assert state["clock_event_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]
    assert state["temperature_c"] is None
    assert set(state["unavailable"]) == {"temperature_c"}
    assert "Insufficient Permissions" in state["unavailable"]["temperature_c"]


def test_device_state_without_any_reasons_call(monkeypatch):
    gpu = FakeGpu(
        errors={
            "nvmlDeviceGetCurrentClocksEventReasons": NVML_ERROR_NOT_SUPPORTED,
            "nvmlDeviceGetCurrentClocksThrottleReasons": NVML_ERROR_NOT_SUPPORTED,
        }
    )
    _install(monkeypatch, [gpu])
    state = nvml.device_state(0)
    assert state["clock_event_reasons"] is None and state["clock_event_reasons_bits"] is None
    assert set(state["unavailable"]) == {"clock_event_reasons"}


def test_session_keeps_only_the_sensors_of_the_backends_gpu(monkeypatch):
    # CUDA may number GPUs differently from NVML (CUDA_VISIBLE_DEVICES): match by bus id.
    from engine.power.session import open_session

    gpus = [
        FakeGpu(energy_mj=1000 * (i + 1), pci_bus_id=f"00000000:{0x1B + i:02X}:00.0")
        for i in range(3)
    ]
    _install(monkeypatch, gpus)
    assert nvml.index_of_pci_bus_id("00000000:1C:00.0") == 1
    assert nvml.index_of_pci_bus_id("00000000:99:00.0") is None
    session = open_session("nvml", gpu_pci_bus_id="00000000:1D:00.0", log=lambda m: None)
    try:
        assert session.sources and {s.info.name.split(":")[1] for s in session.sources} == {"2"}
    finally:
        session.close()
    unknown = open_session("nvml", gpu_pci_bus_id="00000000:99:00.0", log=lambda m: None)
    try:
        assert {s.info.name.split(":")[1] for s in unknown.sources} == {"0", "1", "2"}
        assert any("99:00.0" in r for r in unknown.reasons)
    finally:
        unknown.close()
