"""CPU package and DRAM energy from Linux RAPL through the powercap sysfs interface.

Each zone ``/sys/class/powercap/intel-rapl:N[:M]/`` has ``name`` (``package-N``, ``dram``,
``core``, ``uncore``, ``psys``), ``energy_uj`` (a µJ counter) and ``max_energy_range_uj``
(where it wraps). The kernel's intel_rapl driver computes ``max_energy_range_uj`` as
``ENERGY_STATUS_MASK`` (0xffffffff) times the domain's energy unit (``get_max_energy_counter``),
so the unit, the counter's true step, can be recovered from it. AMD CPUs expose the same
zones under the same names. ``energy_uj`` is usually readable by root only (it leaks a power
side channel); that case becomes a reason, not an error.

Boundaries: ``package-N`` -> ``cpu-package``; ``dram`` -> ``dram``. ``core`` and ``uncore``
are parts of their package's energy, so they are skipped (they would double count).
``psys`` is skipped too: it covers the SoC "platform" as the firmware defines it (package
plus some platform rails, on client parts), not the node's wall power, so calling it
``node`` would claim a boundary it does not have. ``intel-rapl-mmio:*`` zones repeat the
package counters through MMIO and are skipped for the same reason as core/uncore.

RAPL counters update about every 1 ms (nominal; ``engine.power.probe`` measures it).
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

from engine.power.base import PowerSource, SourceError, SourceInfo

DEFAULT_ROOT = Path("/sys/class/powercap")
NOMINAL_UPDATE_PERIOD_S = 1e-3
ENERGY_STATUS_MASK = 0xFFFFFFFF  # 32-bit RAPL energy status register
NOT_READABLE = "RAPL energy_uj not readable (run as root or chmod)"


def _boundary(zone_name: str) -> str | None:
    """The boundary a zone name measures, or None for zones we skip."""
    if zone_name.startswith("package-") or zone_name == "package":
        return "cpu-package"
    if zone_name == "dram":
        return "dram"
    return None


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class RaplSource(PowerSource):
    """One RAPL zone's energy counter, wrap-around undone, as cumulative J.

    Wrap-around: each read keeps the last raw value; a raw value below the last one means
    the counter wrapped, and ``max_energy_range_uj`` is added. This assumes at most one wrap
    between two reads: poll faster than the wrap time (for a 262 kJ range that is ~870 s at
    300 W; ``max_wrap_interval_s`` says it at a stated power). The true modulus is one energy
    unit above ``max_energy_range_uj`` (the kernel reports 0xffffffff units, the register
    holds 2**32), so each wrap undercounts by one unit (~61 µJ): negligible.
    """

    def __init__(self, zone_dir: Path, zone_name: str, boundary: str) -> None:
        self.zone_dir = Path(zone_dir)
        self._energy_path = self.zone_dir / "energy_uj"
        try:
            self.max_range_uj = _read_int(self.zone_dir / "max_energy_range_uj")
        except (OSError, ValueError) as exc:
            raise SourceError(
                f"RAPL {self.zone_dir.name} ({zone_name}): max_energy_range_uj unreadable: "
                f"{_os_text(exc)}"
            ) from None
        if self.max_range_uj <= 0:
            raise SourceError(
                f"RAPL {self.zone_dir.name} ({zone_name}): max_energy_range_uj is "
                f"{self.max_range_uj}, cannot undo wrap-around"
            )
        self._last_raw_uj: int | None = None
        self._wrapped_uj = 0
        self.n_wraps = 0
        unit_j = self.max_range_uj / ENERGY_STATUS_MASK * 1e-6
        # Only a unit in the range RAPL hardware uses (~0.06-1000 µJ) is trusted as derived.
        derived = 1e-8 <= unit_j <= 1e-3
        zone_id = self.zone_dir.name.removeprefix("intel-rapl:")
        self.info = SourceInfo(
            name=f"rapl:{zone_id}:{zone_name}",
            boundary=boundary,
            quantity="energy",
            update_period_s=NOMINAL_UPDATE_PERIOD_S,
            averaging_window_s=None,
            resolution=unit_j if derived else 1e-6,
            stamped_by="poll",
            device=f"{self.zone_dir.name} ({zone_name})",
            notes=(
                "powercap energy_uj; update_period_s nominal (~1 ms); resolution "
                + (
                    "= max_energy_range_uj / 0xffffffff (the RAPL energy unit)"
                    if derived
                    else "unknown via sysfs, given as the 1 µJ sysfs step"
                )
                + f"; wraps every {self.max_range_uj * 1e-6:.4g} J"
            ),
        )

    def max_wrap_interval_s(self, power_w: float) -> float:
        """Seconds between wraps at ``power_w`` W: reads must come more often than this."""
        return self.max_range_uj * 1e-6 / power_w

    def _raw(self) -> int:
        try:
            return _read_int(self._energy_path)
        except PermissionError:
            raise SourceError(f"{NOT_READABLE}: {self._energy_path}") from None
        except (OSError, ValueError) as exc:
            raise SourceError(f"RAPL {self._energy_path}: {_os_text(exc)}") from None

    def read(self) -> tuple[int, float]:
        """(host monotonic ns at the middle of the read, cumulative energy in J)."""
        t0 = time.monotonic_ns()
        raw_uj = self._raw()
        t1 = time.monotonic_ns()
        if self._last_raw_uj is not None and raw_uj < self._last_raw_uj:
            self._wrapped_uj += self.max_range_uj
            self.n_wraps += 1
        self._last_raw_uj = raw_uj
        return (t0 + t1) // 2, (raw_uj + self._wrapped_uj) * 1e-6


def _os_text(exc: BaseException) -> str:
    """An OSError/ValueError as one short line."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return " ".join(str(exc).split()) or type(exc).__name__


def discover(root: str | Path | None = None) -> tuple[list[PowerSource], list[str]]:
    """The readable RAPL package and DRAM zones under ``root`` (default DEFAULT_ROOT), and
    one line for each zone that is missing, unreadable or skipped. Never raises for absence."""
    root = Path(DEFAULT_ROOT if root is None else root)
    if not root.is_dir():
        return [], [f"RAPL: no powercap interface at {root} (not Linux, or no RAPL driver)"]
    zones = sorted(p for p in root.glob("intel-rapl:*") if p.is_dir())
    if not zones:
        return [], [f"RAPL: no intel-rapl zones under {root}"]
    sources: list[PowerSource] = []
    reasons: list[str] = []
    unreadable: list[str] = []
    for zone in zones:
        try:
            zone_name = (zone / "name").read_text().strip()
        except OSError as exc:
            reasons.append(f"RAPL {zone.name}: name unreadable: {_os_text(exc)}")
            continue
        boundary = _boundary(zone_name)
        if boundary is None:
            why = (
                "platform energy, not the node's wall power"
                if zone_name == "psys"
                else "part of its package's energy"
            )
            reasons.append(f"RAPL {zone.name} ({zone_name}): skipped, {why}")
            continue
        try:
            source = RaplSource(zone, zone_name, boundary)
            source.read()
        except SourceError as exc:
            if str(exc).startswith(NOT_READABLE):
                unreadable.append(f"{zone.name} ({zone_name})")
            else:
                reasons.append(str(exc))
            continue
        sources.append(source)
    if unreadable:
        # One line for the usual case (no root) instead of one per zone.
        reasons.insert(0, f"{NOT_READABLE}: {', '.join(unreadable)}")
    return sources, reasons
