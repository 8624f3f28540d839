"""The backend interface: what executes a plan's decode step on a device.

A backend says what it is and what it supports, measures its device's peaks, and
prepares a runner for one plan. The runner runs decode steps and returns their windows
stamped on the host's monotonic clock (a GPU backend maps its device stamps there through
the timebase), plus the time spent in each class of layer so that a step of a model too
large to hold can be scaled from the distinct layers that were run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from engine.plan import Plan
from engine.precision import Precision
from engine.roofline import Peaks


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (no device, missing library)."""


class UnsupportedPoint(RuntimeError):
    """This point cannot run on this device (a precision it lacks, say); recorded, not fatal."""


class DoesNotFit(RuntimeError):
    """Not even one layer of each class fits the memory budget; recorded, not fatal."""


@dataclass
class StepWindows:
    """Windows of ``n`` consecutive decode steps, host monotonic clock, in ns.

    ``class_ns[c][i]`` is the time step ``i`` spent in the run layers of class ``c``;
    ``other_ns[i]`` the time outside layers (embedding, final norm, LM head).
    """

    start_ns: np.ndarray
    end_ns: np.ndarray
    class_ns: dict[str, np.ndarray]
    other_ns: np.ndarray


class Runner(ABC):
    """A plan made ready on a device: weights, KV caches and buffers allocated."""

    layers_run: list[int]
    layers_total: int

    @abstractmethod
    def run_steps(self, n: int) -> StepWindows:
        """Run ``n`` decode steps back to back and return their windows."""

    @abstractmethod
    def close(self) -> None:
        """Free what the runner holds."""


class Backend(ABC):
    """One way of executing plans; one module per implementation."""

    name: str = ""

    @abstractmethod
    def device_info(self) -> dict:
        """The device for provenance: name, memory, clocks, driver, as known."""

    @abstractmethod
    def precision_unsupported(self, precision: Precision) -> str | None:
        """Why this backend can never run ``precision`` (None when it can)."""

    @abstractmethod
    def measure_peaks(self) -> Peaks:
        """Measure copy bandwidth and matmul rates on the device, now."""

    @abstractmethod
    def memory_budget_bytes(self) -> int:
        """Bytes of device memory a plan's weights and caches may use."""

    @abstractmethod
    def prepare(self, plan: Plan, layers: list[int], seed: int) -> Runner:
        """Allocate the listed layers of ``plan`` and return a runner."""
