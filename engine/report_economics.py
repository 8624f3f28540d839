"""Derived economics: tokens/s per MW and cost per million tokens, every factor shown.

Two ways to put a power figure beside a measured throughput ``T`` (output tokens/s per
device; a decode step yields output tokens only):

- measured: the point's average power at its stated boundary (GPU board, CPU package or
  node), plus an optional host share per device, times an optional PUE;
- assumed: an all-in kW per device from a named preset or ``--all-in-kw``.

``tokens/s per MW = T / kW * 1000``, and (DESIGN.md)
``cost per million tokens = 1e6 * ($/device-hr / 3600 + kW * $/kWh / 3600) / T``,
with kW the assumed all-in figure when one is given, else the measured one. Each term is
kept apart so the reader sees what the price is made of. Unknown inputs give None with the
reason, never a zero.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRESETS_PATH = Path(__file__).with_name("economics_presets.toml")
SECONDS_PER_HOUR = 3600.0


class EconomicsError(ValueError):
    """A preset or setting cannot be used (one-line message)."""


def tokens_per_s_per_mw(tokens_per_s: float, kw: float) -> float:
    """Tokens/s that one MW would yield at ``kw`` kilowatts per device and ``tokens_per_s``
    tokens/s per device."""
    return tokens_per_s / kw * 1000.0


def cost_per_million_tokens(
    tokens_per_s: float, usd_per_device_hour: float, kw: float, usd_per_kwh: float
) -> tuple[float, float, float]:
    """US$ per million tokens as (device-hour share, energy share, total) at ``tokens_per_s``
    tokens/s per device, ``usd_per_device_hour`` $/device-hour, ``kw`` kW per device and
    ``usd_per_kwh`` $/kWh."""
    device = 1e6 * (usd_per_device_hour / SECONDS_PER_HOUR) / tokens_per_s
    energy = 1e6 * (kw * usd_per_kwh / SECONDS_PER_HOUR) / tokens_per_s
    return device, energy, device + energy


@dataclass(frozen=True)
class Settings:
    """The economics inputs of a report, each with where it came from (``origin``)."""

    preset: str | None = None
    usd_per_kwh: float | None = None
    usd_per_device_hour: float | None = None
    host_w_per_device: float = 0.0
    pue: float = 1.0
    all_in_kw: float | None = None
    origin: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def describe(self) -> list[tuple[str, str, str]]:
        """(factor, value, origin) rows for the report."""
        rows = [
            ("$/device-hour", _fmt(self.usd_per_device_hour), "usd_per_device_hour"),
            ("$/kWh", _fmt(self.usd_per_kwh), "usd_per_kwh"),
            ("all-in kW per device", _fmt(self.all_in_kw), "all_in_kw"),
            ("host W per device (measured basis)", _fmt(self.host_w_per_device), "host_w"),
            ("PUE (measured basis)", _fmt(self.pue), "pue"),
        ]
        return [(name, value, self.origin.get(key, "not set")) for name, value, key in rows]


def _fmt(v: float | None) -> str:
    return "not set" if v is None else f"{v:g}"


def load_presets(path: str | Path = PRESETS_PATH) -> dict[str, dict]:
    """Every preset by name (``FAMILY:DEVICE`` and ``FAMILY:DEVICE:TIER``), each a dict of
    its figures and its source (title, url, as_of, notes)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise EconomicsError(
            f"economics presets file {path} is missing from this installation"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise EconomicsError(f"economics presets file {path}: {exc}") from None
    presets: dict[str, dict] = {}
    for family, table in data.items():
        source = {k: table.get(k) for k in ("title", "url", "as_of", "notes")}
        for device, spec in (table.get("devices") or {}).items():
            base = {
                "family": family,
                "device": spec.get("label", device),
                "all_in_kw": spec.get("all_in_kw"),
                "usd_per_kwh": table.get("usd_per_kwh"),
                "source": source,
            }
            presets[f"{family}:{device}"] = dict(base, tier=None, usd_per_device_hour=None)
            for tier, usd in (spec.get("usd_per_device_hour") or {}).items():
                presets[f"{family}:{device}:{tier}"] = dict(
                    base, tier=tier, usd_per_device_hour=usd
                )
    return presets


def resolve_settings(
    preset: str | None = None,
    usd_per_kwh: float | None = None,
    usd_per_device_hour: float | None = None,
    host_w_per_device: float | None = None,
    pue: float | None = None,
    all_in_kw: float | None = None,
    presets: dict[str, dict] | None = None,
) -> Settings:
    """Settings from a preset (if named) overridden by explicit values; checks ranges."""
    for name, v in (
        ("--usd-per-kwh", usd_per_kwh),
        ("--usd-per-device-hour", usd_per_device_hour),
        ("--host-w-per-device", host_w_per_device),
    ):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise EconomicsError(f"{name} must be a number >= 0, got {v:g}")
    if all_in_kw is not None and not (math.isfinite(all_in_kw) and all_in_kw > 0):
        raise EconomicsError(f"--all-in-kw must be a number > 0, got {all_in_kw:g}")
    if pue is not None and not (math.isfinite(pue) and pue >= 1):
        raise EconomicsError(f"--pue must be a number >= 1, got {pue:g}")
    values: dict[str, float | None] = {"host_w": 0.0, "pue": 1.0}
    origin = {"host_w": "default (none)", "pue": "default (1, no facility overhead)"}
    notes: list[str] = []
    if preset:
        presets = load_presets() if presets is None else presets
        if preset not in presets:
            raise EconomicsError(
                f"unknown economics preset '{preset}'; known: {', '.join(sorted(presets))}"
            )
        p = presets[preset]
        src = p["source"]
        where = f"preset {preset} (as of {src.get('as_of')})"
        for key in ("all_in_kw", "usd_per_device_hour", "usd_per_kwh"):
            if p.get(key) is not None:
                values[key] = float(p[key])
                origin[key] = where
    for key, v, flag in (
        ("usd_per_kwh", usd_per_kwh, "--usd-per-kwh"),
        ("usd_per_device_hour", usd_per_device_hour, "--usd-per-device-hour"),
        ("host_w", host_w_per_device, "--host-w-per-device"),
        ("pue", pue, "--pue"),
        ("all_in_kw", all_in_kw, "--all-in-kw"),
    ):
        if v is not None:
            values[key] = float(v)
            origin[key] = flag
    from_preset = origin.get("usd_per_device_hour", "").startswith("preset")
    if preset and usd_per_kwh and (values.get("usd_per_device_hour") or 0) > 0 and from_preset:
        notes.append(
            f"the preset's $/device-hour already includes power; --usd-per-kwh {usd_per_kwh:g} "
            "adds electricity a second time"
        )
    return Settings(
        preset=preset,
        usd_per_kwh=values.get("usd_per_kwh"),
        usd_per_device_hour=values.get("usd_per_device_hour"),
        host_w_per_device=float(values["host_w"] or 0.0),
        pue=float(values["pue"] or 1.0),
        all_in_kw=values.get("all_in_kw"),
        origin=origin,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class PointEconomics:
    """The economics of one measured point; every factor kept, None where unknown (the
    matching ``*_reason`` says why)."""

    tokens_per_s: float | None
    boundary: str | None
    measured_power_w: float | None
    host_w: float | None
    pue: float
    measured_kw: float | None
    measured_tokens_per_s_per_mw: float | None
    measured_reason: str | None
    assumed_kw: float | None
    assumed_tokens_per_s_per_mw: float | None
    cost_kw: float | None
    cost_kw_basis: str | None
    usd_per_device_hour: float | None
    usd_per_kwh: float | None
    usd_per_mtok_device: float | None
    usd_per_mtok_energy: float | None
    usd_per_mtok: float | None
    cost_reason: str | None


def point_economics(
    tokens_per_s: float | None,
    avg_power_w: float | None,
    boundary: str | None,
    settings: Settings,
    energy_reason: str | None = None,
) -> PointEconomics:
    """Economics of one point from its throughput (output tokens/s per device) and its
    measured average power (W at ``boundary``), under ``settings``."""
    host_w: float | None = settings.host_w_per_device
    measured_kw = measured_mw = None
    reason = None
    if not tokens_per_s or tokens_per_s <= 0:
        reason = "no throughput (point failed or not measured)"
    elif avg_power_w is None or not avg_power_w > 0:
        reason = f"no measured power: {energy_reason or 'energy not recorded'}"
    else:
        if boundary == "node" and host_w:
            # The node boundary already holds the host: adding a share would count it twice.
            host_w = None
        measured_kw = (avg_power_w + (host_w or 0.0)) * settings.pue / 1000.0
        measured_mw = tokens_per_s_per_mw(tokens_per_s, measured_kw)
    assumed_mw = None
    if settings.all_in_kw and tokens_per_s and tokens_per_s > 0:
        assumed_mw = tokens_per_s_per_mw(tokens_per_s, settings.all_in_kw)
    cost_kw, basis = (
        (settings.all_in_kw, "assumed all-in kW")
        if settings.all_in_kw
        else (measured_kw, f"measured {boundary} power" if measured_kw else None)
    )
    dev = en = total = None
    cost_reason = None
    if not tokens_per_s or tokens_per_s <= 0:
        cost_reason = "no throughput"
    elif settings.usd_per_device_hour is None:
        cost_reason = "no $/device-hour (--usd-per-device-hour or --economics)"
    elif settings.usd_per_kwh is None:
        cost_reason = "no $/kWh (--usd-per-kwh or --economics)"
    elif cost_kw is None and settings.usd_per_kwh > 0:
        cost_reason = f"no power for the energy term ({reason}) and no --all-in-kw"
    else:
        dev, en, total = cost_per_million_tokens(
            tokens_per_s, settings.usd_per_device_hour, cost_kw or 0.0, settings.usd_per_kwh
        )
    return PointEconomics(
        tokens_per_s=tokens_per_s,
        boundary=boundary,
        measured_power_w=avg_power_w if measured_kw else None,
        host_w=host_w if measured_kw else None,
        pue=settings.pue,
        measured_kw=measured_kw,
        measured_tokens_per_s_per_mw=measured_mw,
        measured_reason=reason,
        assumed_kw=settings.all_in_kw,
        assumed_tokens_per_s_per_mw=assumed_mw,
        cost_kw=cost_kw,
        cost_kw_basis=basis,
        usd_per_device_hour=settings.usd_per_device_hour,
        usd_per_kwh=settings.usd_per_kwh,
        usd_per_mtok_device=dev,
        usd_per_mtok_energy=en,
        usd_per_mtok=total,
        cost_reason=cost_reason,
    )
