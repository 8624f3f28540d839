"""engine.power.rapl on a fake powercap tree: zones and boundaries, wrap-around, permissions,
missing files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.power import rapl
from engine.power.base import SourceError

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60)
REAL_RANGE_UJ = 262_143_328_850  # a real package zone's max_energy_range_uj (61.035 µJ unit)


def _zone(root: Path, zone: str, name: str, energy_uj: int | None = 0, max_uj: int | None = None):
    d = root / zone
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    if energy_uj is not None:
        (d / "energy_uj").write_text(f"{energy_uj}\n")
    if max_uj is not None:
        (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def _honour_modes(monkeypatch):
    """Make a mode-000 file unreadable even for root (tests may run as root, which the kernel
    would let read anything), as the kernel does for an unprivileged user."""
    real = rapl._read_int

    def read_int(path: Path) -> int:
        if os.stat(path).st_mode & 0o444 == 0:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(rapl, "_read_int", read_int)


def test_discovery_maps_boundaries_and_explains_the_rest(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 1000, REAL_RANGE_UJ)
    _zone(tmp_path, "intel-rapl:0:0", "core", 10, REAL_RANGE_UJ)
    _zone(tmp_path, "intel-rapl:0:1", "dram", 20, 65_535_999_984)
    _zone(tmp_path, "intel-rapl:1", "psys", 30, REAL_RANGE_UJ)
    _zone(tmp_path, "intel-rapl:2", "package-1", 40, None)  # no max_energy_range_uj
    _zone(tmp_path, "intel-rapl-mmio:0", "package-0", 50, REAL_RANGE_UJ)  # MMIO duplicate
    sources, reasons = rapl.discover(tmp_path)
    by_name = {s.info.name: s for s in sources}
    assert set(by_name) == {"rapl:0:package-0", "rapl:0:1:dram"}
    assert by_name["rapl:0:package-0"].info.boundary == "cpu-package"
    assert by_name["rapl:0:1:dram"].info.boundary == "dram"
    # the RAPL unit (2**-14 J, 2**-16 J) recovered from max_energy_range_uj = 0xffffffff
    # units; the kernel truncates the unit to 61.035 µJ, hence the tolerance
    assert by_name["rapl:0:package-0"].info.resolution == pytest.approx(2**-14, rel=1e-5)
    assert by_name["rapl:0:1:dram"].info.resolution == pytest.approx(2**-16, rel=1e-5)
    assert len(reasons) == 3 and all("\n" not in r for r in reasons)
    assert any("core" in r and "skipped" in r for r in reasons)
    assert any("psys" in r and "skipped" in r for r in reasons)
    assert any("intel-rapl:2" in r and "max_energy_range_uj" in r for r in reasons)


def test_no_powercap_is_a_reason(tmp_path):
    sources, reasons = rapl.discover(tmp_path / "absent")
    assert sources == [] and "no powercap interface" in reasons[0]
    sources, reasons = rapl.discover(tmp_path)
    assert sources == [] and "no intel-rapl zones" in reasons[0]


def test_unreadable_counters_give_one_reason(tmp_path, monkeypatch):
    _honour_modes(monkeypatch)
    for i in range(2):
        d = _zone(tmp_path, f"intel-rapl:{i}", f"package-{i}", 5, REAL_RANGE_UJ)
        (d / "energy_uj").chmod(0)
    sources, reasons = rapl.discover(tmp_path)
    assert sources == []
    assert reasons == [
        "RAPL energy_uj not readable (run as root or chmod): "
        "intel-rapl:0 (package-0), intel-rapl:1 (package-1)"
    ]


def test_a_counter_vanishing_after_discovery_is_one_line_source_error(tmp_path):
    d = _zone(tmp_path, "intel-rapl:0", "package-0", 5, REAL_RANGE_UJ)
    (sources, _) = rapl.discover(tmp_path)
    (d / "energy_uj").unlink()
    with pytest.raises(SourceError) as info:
        sources[0].read()
    assert "\n" not in str(info.value) and "ENOENT" in str(info.value)


@SETTINGS
@given(
    max_uj=st.integers(1_000, 10**12),
    start_fraction=st.floats(0, 1, exclude_max=True),
    step_fractions=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=40),
)
def test_wrap_around_is_undone(tmp_path_factory, max_uj, start_fraction, step_fractions):
    root = tmp_path_factory.mktemp("powercap")
    start_uj = int(start_fraction * max_uj)
    d = _zone(root, "intel-rapl:0", "package-0", start_uj, max_uj)
    src = rapl.RaplSource(d, "package-0", "cpu-package")
    _, first_j = src.read()
    assert first_j == pytest.approx(start_uj * 1e-6, rel=1e-12, abs=1e-12)
    total_uj = start_uj
    for fraction in step_fractions:
        # any increment below the range: at most one wrap between reads, as documented
        total_uj += int(fraction * max_uj)
        (d / "energy_uj").write_text(f"{total_uj % max_uj}\n")
        _, energy_j = src.read()
        assert energy_j == pytest.approx(total_uj * 1e-6, rel=1e-12, abs=1e-12)
    assert src.n_wraps == total_uj // max_uj - start_uj // max_uj
