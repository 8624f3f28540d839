"""Shared fixtures: a fast sweep environment for end-to-end tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def small_peaks(monkeypatch):
    """Measure the CPU's peaks on smaller buffers so end-to-end tests stay fast."""
    import engine.backends.cpu as cpu

    monkeypatch.setattr(cpu, "PEAK_COPY_BYTES", 16 << 20)
    monkeypatch.setattr(cpu, "PEAK_MATMUL_N", 256)
