"""Find the power sources a run asked for: every available one, none, or a named few."""

from __future__ import annotations

import importlib
from pathlib import Path

from engine.power.base import PowerSource

MODULES = ("nvml", "rapl", "amdsmi")
CHOICES = ("auto", "none", *MODULES)


def parse_spec(spec: str) -> tuple[str, ...]:
    """The source modules a spec names: "auto" (all), "none", or a comma list of MODULES.

    Raises ValueError with a one-line message naming the choices for anything else.
    """
    names = [n.strip().lower() for n in str(spec).split(",") if n.strip()]
    if not names:
        raise ValueError(f"empty power source spec; choose from {', '.join(CHOICES)}")
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise ValueError(
            f"unknown power source {', '.join(repr(n) for n in unknown)}; "
            f"choose from {', '.join(CHOICES)} (or a comma list of {', '.join(MODULES)})"
        )
    if ("auto" in names or "none" in names) and len(names) > 1:
        raise ValueError("'auto' and 'none' stand alone; do not mix them with module names")
    if names == ["auto"]:
        return MODULES
    if names == ["none"]:
        return ()
    return tuple(dict.fromkeys(names))


def discover_sources(
    spec: str = "auto", power_log: str | Path | None = None
) -> tuple[list[PowerSource], list[str]]:
    """Open the sources ``spec`` names (see ``parse_spec``) plus, when ``power_log`` is given,
    a meter log replayed as a ``node`` source. Returns the usable sources and one line per
    missing or unreadable one, each line once.

    Raises ValueError for a bad spec and ``replay.ReplayError`` (a ValueError) for a
    ``power_log`` that cannot be loaded; absence of hardware is never an exception.
    """
    modules = parse_spec(spec)
    sources: list[PowerSource] = []
    reasons: list[str] = []
    for name in modules:
        module = importlib.import_module(f"engine.power.{name}")
        found, why = module.discover()
        sources.extend(found)
        reasons.extend(why)
    if power_log is not None:
        from engine.power import replay

        try:
            found, why = replay.discover(power_log)
        except Exception:
            for source in sources:
                source.close()
            raise
        sources.extend(found)
        reasons.extend(why)
    return sources, list(dict.fromkeys(reasons))
