"""engine.power.amdsmi: the absent-library path, and unit conversion through a small
stand-in module shaped like the documented Python API."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.power import amdsmi
from engine.power.base import SourceError


class AmdSmiLibraryException(Exception):
    def __init__(self, err_code: int, err_info: str) -> None:
        super().__init__(f"Error code:\n\t{err_code} | {err_info}")
        self.err_code = err_code
        self.err_info = err_info


def _fake(gpus: list[dict]) -> ModuleType:
    """A stand-in ``amdsmi``: each GPU is a dict of what its calls return (or raise)."""
    lib = ModuleType("amdsmi")
    lib.live = 0

    def init():
        lib.live += 1

    def shut_down():
        lib.live -= 1

    def answer(handle, name):
        value = gpus[handle][name]
        if isinstance(value, Exception):
            raise value
        return dict(value)

    lib.amdsmi_init = init
    lib.amdsmi_shut_down = shut_down
    lib.amdsmi_get_processor_handles = lambda: list(range(len(gpus)))
    lib.amdsmi_get_energy_count = lambda h: answer(h, "energy")
    lib.amdsmi_get_power_info = lambda h: answer(h, "power")
    return lib


def test_absent_library_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # makes `import amdsmi` fail
    sources, reasons = amdsmi.discover()
    assert sources == []
    assert len(reasons) == 1 and "amdsmi" in reasons[0] and "not installed" in reasons[0]


@settings(derandomize=True, deadline=None, max_examples=40)
@given(
    accumulator=st.integers(0, 2**63),
    resolution_uj=st.sampled_from([15.3, 15.259, 1.0, 0.5]),
    old_key=st.booleans(),
    power_w=st.integers(0, 1500),
)
def test_energy_and_power_units(accumulator, resolution_uj, old_key, power_w):
    key = "power" if old_key else "energy_accumulator"  # amdsmi before/after 6.2.1
    lib = _fake(
        [
            {
                "energy": {key: accumulator, "counter_resolution": resolution_uj, "timestamp": 1},
                "power": {"socket_power": "N/A", "current_socket_power": power_w},
            }
        ]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "amdsmi", lib)
        sources, reasons = amdsmi.discover()
        assert reasons == []
        energy, power = sources
        _, energy_j = energy.read()
        assert energy_j == pytest.approx(accumulator * resolution_uj / 1e6, rel=1e-12)
        assert energy.info.resolution == pytest.approx(resolution_uj * 1e-6)
        assert power.read()[1] == float(power_w)
        assert power.key == "current_socket_power"  # "N/A" socket_power is skipped
        for s in sources:
            s.close()
        assert lib.live == 0


def test_library_errors_become_reasons_and_one_line_source_errors(monkeypatch):
    failing = AmdSmiLibraryException(2, "AMDSMI_STATUS_NOT_SUPPORTED")
    lib = _fake(
        [
            {"energy": failing, "power": {"average_socket_power": 210}},
            {"energy": {"energy_accumulator": 10, "counter_resolution": 15.3}, "power": {}},
        ]
    )
    monkeypatch.setitem(sys.modules, "amdsmi", lib)
    sources, reasons = amdsmi.discover()
    assert [s.info.name for s in sources] == ["amdsmi:0:power", "amdsmi:1:energy"]
    assert len(reasons) == 2 and all("\n" not in r for r in reasons)
    assert reasons[0].startswith("AMD SMI GPU 0: energy unavailable:")
    assert "AMDSMI_STATUS_NOT_SUPPORTED" in reasons[0]
    assert reasons[1].startswith("AMD SMI GPU 1: power unavailable:")
    lib_gpu = sources[1]
    monkeypatch.setattr(lib, "amdsmi_get_energy_count", lambda h: (_ for _ in ()).throw(failing))
    with pytest.raises(SourceError) as info:
        lib_gpu.read()
    assert "\n" not in str(info.value)
    for s in sources:
        s.close()
    assert lib.live == 0
