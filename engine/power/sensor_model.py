"""Ground truth and a model of a power sensor, to prove energy attribution on a CPU.

``TruePower`` is a known power waveform (piecewise constant on a fine grid) whose energy over
any span is exact. ``SensorModel`` describes how a sensor sees it: what it reports (power or
a cumulative energy counter), how often it updates, over which window it averages, with what
jitter, dropped updates, resolution, counter wrap and gain error. ``observe`` turns a truth
and a sensor into the ``Samples`` a poller (or the sensor's own buffer) would deliver, so
``engine.energy`` can be checked against the exact energy.

Units: times in host-monotonic ns (float64 where fractions of a ns matter, int64 stamps),
power in W, energy in J.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine.power.base import Samples, SourceInfo

NS_PER_S = 1e9
DEFAULT_DT_S = 1e-4


@dataclass(frozen=True)
class TruePower:
    """A known power waveform: ``power_w[i]`` holds on [t0_ns + i*dt_ns, t0_ns + (i+1)*dt_ns).

    Outside the grid the first (before) or last (after) cell's power holds, so any span has a
    defined, exact energy.
    """

    t0_ns: int
    dt_ns: int
    power_w: np.ndarray

    def __post_init__(self) -> None:
        p = np.ascontiguousarray(self.power_w, dtype=np.float64)
        if p.ndim != 1 or p.size == 0:
            raise ValueError("power_w must be a non-empty 1-D array")
        if self.dt_ns <= 0:
            raise ValueError("dt_ns must be positive")
        object.__setattr__(self, "power_w", p)
        cum = np.empty(p.size + 1)
        cum[0] = 0.0
        np.cumsum(p * (self.dt_ns / NS_PER_S), out=cum[1:])
        object.__setattr__(self, "_cum_j", cum)

    @property
    def t1_ns(self) -> int:
        """End of the grid (ns)."""
        return self.t0_ns + self.dt_ns * self.power_w.size

    @property
    def duration_s(self) -> float:
        """Length of the grid (s)."""
        return self.dt_ns * self.power_w.size / NS_PER_S

    def cumulative_j(self, t_ns: np.ndarray | float) -> np.ndarray:
        """Exact energy (J) from ``t0_ns`` to ``t_ns`` (negative before ``t0_ns``)."""
        t = np.asarray(t_ns, dtype=np.float64)
        x = (t - self.t0_ns) / self.dt_ns
        n = self.power_w.size
        i = np.clip(np.floor(x), 0, n - 1).astype(np.int64)
        # The partial cell (or the held edge cell outside the grid) at its own power.
        frac_ns = (t - self.t0_ns) - i * float(self.dt_ns)
        return self._cum_j[i] + self.power_w[i] * frac_ns / NS_PER_S

    def energy_j(self, t0_ns: np.ndarray | float, t1_ns: np.ndarray | float) -> np.ndarray:
        """Exact energy (J) over [t0_ns, t1_ns], element-wise over arrays of edges."""
        return self.cumulative_j(t1_ns) - self.cumulative_j(t0_ns)

    def mean_power_w(self, t0_ns: np.ndarray | float, t1_ns: np.ndarray | float) -> np.ndarray:
        """Exact mean power (W) over [t0_ns, t1_ns]; the instantaneous power where t1 == t0."""
        t0 = np.asarray(t0_ns, dtype=np.float64)
        t1 = np.asarray(t1_ns, dtype=np.float64)
        span_s = (t1 - t0) / NS_PER_S
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.energy_j(t0, t1) / span_s
        return np.where(span_s > 0, mean, self.power_at_w(t1))

    def power_at_w(self, t_ns: np.ndarray | float) -> np.ndarray:
        """The power (W) at instant ``t_ns``."""
        t = np.asarray(t_ns, dtype=np.float64)
        i = np.clip(np.floor((t - self.t0_ns) / self.dt_ns), 0, self.power_w.size - 1)
        return self.power_w[i.astype(np.int64)]


# -- builders ---------------------------------------------------------------------------------


def _cells(duration_s: float, dt_s: float) -> int:
    return max(1, int(round(duration_s / dt_s)))


def from_array(power_w: np.ndarray, dt_s: float = DEFAULT_DT_S, t0_ns: int = 0) -> TruePower:
    """A waveform from per-cell powers (W) on a ``dt_s`` grid starting at ``t0_ns``."""
    return TruePower(int(t0_ns), int(round(dt_s * NS_PER_S)), np.asarray(power_w, np.float64))


def steps(
    levels_w: Sequence[float],
    durations_s: Sequence[float],
    dt_s: float = DEFAULT_DT_S,
    t0_ns: int = 0,
) -> TruePower:
    """Constant levels (W) held for the given durations (s), one after another."""
    if len(levels_w) != len(durations_s):
        raise ValueError("levels_w and durations_s must have the same length")
    parts = [np.full(_cells(d, dt_s), float(p)) for p, d in zip(levels_w, durations_s)]
    return from_array(np.concatenate(parts), dt_s, t0_ns)


def ramp(
    p0_w: float, p1_w: float, duration_s: float, dt_s: float = DEFAULT_DT_S, t0_ns: int = 0
) -> TruePower:
    """A linear ramp from ``p0_w`` to ``p1_w`` over ``duration_s`` (cell-centre values)."""
    n = _cells(duration_s, dt_s)
    return from_array(p0_w + (p1_w - p0_w) * (np.arange(n) + 0.5) / n, dt_s, t0_ns)


def decode_steps(
    rng: np.random.Generator,
    duration_s: float,
    step_s: float,
    phases: Sequence[tuple[float, float]],
    step_jitter: float = 0.1,
    dt_s: float = DEFAULT_DT_S,
    t0_ns: int = 0,
) -> TruePower:
    """Periodic kernels: decode steps of about ``step_s`` (each one's length scaled by
    1 + uniform(-step_jitter, step_jitter)), each made of ``phases`` = (fraction of the
    step, power W), e.g. ((0.6, 700), (0.3, 450), (0.1, 300)) for busy/less-busy parts.

    The jitter matters: real steps are not phase-locked to a sensor's updates.
    """
    frac = np.array([f for f, _ in phases], dtype=np.float64)
    level = np.array([p for _, p in phases], dtype=np.float64)
    frac = frac / frac.sum()
    n = _cells(duration_s, dt_s)
    n_steps = int(np.ceil(duration_s / (step_s * (1 - step_jitter)))) + 2
    lengths_s = step_s * (1 + rng.uniform(-step_jitter, step_jitter, n_steps))
    starts_s = np.concatenate([[0.0], np.cumsum(lengths_s)])
    # Phase boundaries of every step, flattened; each cell takes the phase its centre is in.
    edges_s = (starts_s[:-1, None] + lengths_s[:, None] * np.cumsum(frac)[None, :]).ravel()
    centre_s = (np.arange(n) + 0.5) * dt_s
    phase_idx = np.searchsorted(edges_s, centre_s, side="right") % frac.size
    return from_array(level[phase_idx], dt_s, t0_ns)


def with_noise(
    truth: TruePower,
    rng: np.random.Generator,
    sigma_w: float,
    corr_s: float | None = None,
    floor_w: float = 0.0,
) -> TruePower:
    """``truth`` plus Gaussian noise of standard deviation ``sigma_w`` (W), white per cell or,
    with ``corr_s``, held constant for ``corr_s``-long blocks; clipped at ``floor_w``."""
    n = truth.power_w.size
    if corr_s is None:
        noise = rng.normal(0.0, sigma_w, n)
    else:
        block = max(1, int(round(corr_s * NS_PER_S / truth.dt_ns)))
        noise = np.repeat(rng.normal(0.0, sigma_w, n // block + 1), block)[:n]
    return replace(truth, power_w=np.maximum(truth.power_w + noise, floor_w))


def concat(parts: Sequence[TruePower]) -> TruePower:
    """Waveforms one after another (same ``dt_ns``), starting at the first one's ``t0_ns``."""
    if not parts:
        raise ValueError("nothing to concatenate")
    dt = parts[0].dt_ns
    if any(p.dt_ns != dt for p in parts):
        raise ValueError("all parts must share dt_ns")
    return TruePower(parts[0].t0_ns, dt, np.concatenate([p.power_w for p in parts]))


@dataclass(frozen=True)
class Workload:
    """A waveform with the windows a measurement would attribute energy to (ns edges)."""

    truth: TruePower
    start_ns: np.ndarray
    end_ns: np.ndarray

    def true_energy_j(self) -> np.ndarray:
        """Exact energy (J) of each window."""
        return self.truth.energy_j(self.start_ns, self.end_ns)


def workload(
    rng: np.random.Generator,
    *,
    n_windows: int,
    window_s: float,
    gap_s: tuple[float, float],
    idle_w: float = 90.0,
    busy: Sequence[tuple[float, float]] = ((0.6, 700.0), (0.3, 450.0), (0.1, 300.0)),
    step_s: float = 0.004,
    noise_w: float = 20.0,
    lead_s: float = 3.0,
    tail_s: float = 3.0,
    dt_s: float = DEFAULT_DT_S,
    t0_ns: int = 0,
) -> Workload:
    """Idle for ``lead_s``, then ``n_windows`` busy windows of ``window_s`` (decode steps of
    ``step_s`` with the ``busy`` phases) separated by idle gaps of uniform(*gap_s) s, then
    idle for ``tail_s``; white noise of ``noise_w`` on top. Window edges are cell edges."""
    parts = [np.full(_cells(lead_s, dt_s), idle_w)]
    starts, ends = [], []
    cursor = parts[0].size
    for i in range(n_windows):
        busy_part = decode_steps(rng, window_s, step_s, busy, dt_s=dt_s).power_w
        starts.append(cursor)
        cursor += busy_part.size
        ends.append(cursor)
        parts.append(busy_part)
        idle_s = rng.uniform(*gap_s) if i < n_windows - 1 else tail_s
        idle = np.full(_cells(idle_s, dt_s), idle_w)
        parts.append(idle)
        cursor += idle.size
    truth = from_array(np.concatenate(parts), dt_s, t0_ns)
    if noise_w > 0:
        truth = with_noise(truth, rng, noise_w, floor_w=0.0)
    step_ns = truth.dt_ns
    return Workload(
        truth,
        t0_ns + np.asarray(starts, np.int64) * step_ns,
        t0_ns + np.asarray(ends, np.int64) * step_ns,
    )


# -- the sensor -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensorModel:
    """How a sensor sees the true power.

    ``quantity``: "power" (W) or "energy" (a cumulative counter, J). ``update_period_s``: the
    nominal time between updates. ``averaging_window_s``: for power, each update reports the
    mean true power over this span just before the update instant (0: the instantaneous
    power); for energy, None means the counter integrates continuously (its value is the
    exact integral at each update instant), a value means a sampled counter that advances by
    (mean power over that window) x (time since the previous update). ``jitter_s``: each
    update instant moves by uniform(-jitter_s, jitter_s). ``drop_prob``: chance an update is
    lost (the published value stays; a counter keeps integrating inside). ``resolution``:
    quantum of the reported value (W, rounded; or J, counters truncate). ``wrap_j``: the raw
    counter wraps modulo this. ``gain``: multiplies the true power (a calibration error).
    ``stamped_by``: "poll" (a poller reads the latest value) or "sensor" (one sample per
    update, stamped at the update instant, like a driver's buffer or a meter's log).
    """

    quantity: str
    update_period_s: float
    averaging_window_s: float | None
    jitter_s: float = 0.0
    drop_prob: float = 0.0
    resolution: float = 0.0
    wrap_j: float | None = None
    gain: float = 1.0
    stamped_by: str = "poll"
    boundary: str = "gpu-board"
    name: str = "model"

    def __post_init__(self) -> None:
        if self.quantity not in ("power", "energy"):
            raise ValueError(f"quantity must be 'power' or 'energy', got {self.quantity!r}")
        if self.update_period_s <= 0:
            raise ValueError("update_period_s must be positive")
        if not 0 <= self.jitter_s < self.update_period_s / 2:
            raise ValueError("jitter_s must be in [0, update_period_s / 2)")
        if self.quantity == "power" and self.averaging_window_s is None:
            raise ValueError("a power sensor needs averaging_window_s (0 for instantaneous)")
        if self.wrap_j is not None and self.quantity != "energy":
            raise ValueError("only an energy counter wraps")

    def info(self, stamped_by: str | None = None) -> SourceInfo:
        """The ``SourceInfo`` a source for this sensor would declare."""
        return SourceInfo(
            name=self.name,
            boundary=self.boundary,
            quantity=self.quantity,
            update_period_s=self.update_period_s,
            averaging_window_s=self.averaging_window_s,
            resolution=self.resolution or None,
            stamped_by=stamped_by or self.stamped_by,
            notes="simulated by engine.power.sensor_model",
        )


#: NVML instant power on H100 (field 186): ~100 ms updates of a ~25 ms mean, mW steps.
H100_INSTANT = SensorModel(
    "power", 0.1, 0.025, jitter_s=0.002, resolution=1e-3, name="h100-instant"
)
#: NVML total energy (mJ since driver load), updated every ~100 ms, integrating.
H100_ENERGY = SensorModel("energy", 0.1, None, jitter_s=0.002, resolution=1e-3, name="h100-energy")
#: nvmlDeviceGetPowerUsage on Ampere and newer: a 1 s mean updated about every second.
AVERAGE_1S = SensorModel("power", 1.0, 1.0, jitter_s=0.01, resolution=1e-3, name="average-1s")
#: RAPL energy_uj: 1 ms updates, 2^-16 J (15.3 uJ) units, a 32-bit counter that wraps.
RAPL_LIKE = SensorModel(
    "energy",
    0.001,
    None,
    jitter_s=1e-5,
    resolution=2.0**-16,
    wrap_j=2.0**32 * 2.0**-16,
    boundary="cpu-package",
    name="rapl-like",
)
#: A wall meter's 1 Hz log: each line the mean power of the last second, stamped by the meter.
METER_1HZ = SensorModel(
    "power", 1.0, 1.0, resolution=0.01, stamped_by="sensor", boundary="node", name="meter-1hz"
)


@dataclass(frozen=True)
class Observation:
    """What ``observe_raw`` saw: the samples (counter unwrapped), the raw values (counter
    modulo ``wrap_j``, else equal to the samples'), and the sensor's published update
    instants (float ns, dropped updates excluded) over the observed span."""

    samples: Samples
    raw: np.ndarray
    update_ns: np.ndarray


def _update_instants_ns(
    model: SensorModel, rng: np.random.Generator, t_start_ns: float, t_end_ns: float
) -> np.ndarray:
    period_ns = model.update_period_s * NS_PER_S
    window_ns = (model.averaging_window_s or 0.0) * NS_PER_S
    # Start early enough that the first poll already sees a published value.
    first = t_start_ns - 2 * period_ns - window_ns + rng.uniform(0, period_ns)
    n = int(np.ceil((t_end_ns - first) / period_ns)) + 2
    u = first + np.arange(n) * period_ns
    if model.jitter_s > 0:
        u = u + rng.uniform(-model.jitter_s, model.jitter_s, n) * NS_PER_S
    return u


def _sensor_values(truth: TruePower, model: SensorModel, u_ns: np.ndarray, rng) -> np.ndarray:
    """The value the sensor computes at each update instant (before quantisation)."""
    window_ns = (model.averaging_window_s or 0.0) * NS_PER_S
    if model.quantity == "power":
        return model.gain * truth.mean_power_w(u_ns - window_ns, u_ns)
    offset_j = rng.uniform(0, model.wrap_j if model.wrap_j else 1e6)
    if model.averaging_window_s is None:
        return offset_j + model.gain * truth.cumulative_j(u_ns)
    # A sampled counter: the window's mean power times the time since the previous update.
    mean_w = model.gain * truth.mean_power_w(u_ns - window_ns, u_ns)
    step_j = mean_w * np.diff(u_ns, prepend=u_ns[0] - model.update_period_s * NS_PER_S) / NS_PER_S
    return offset_j + np.cumsum(step_j)


def _quantise(values: np.ndarray, model: SensorModel) -> np.ndarray:
    if not model.resolution:
        return values
    if model.quantity == "energy":
        return np.floor(values / model.resolution) * model.resolution
    return np.round(values / model.resolution) * model.resolution


def observe_raw(
    truth: TruePower,
    model: SensorModel,
    poll_period_s: float,
    rng: np.random.Generator,
    t_start_ns: int,
    t_end_ns: int,
    *,
    stamped_by: str | None = None,
    poll_jitter_s: float | None = None,
) -> Observation:
    """``observe``, also returning the raw (wrapped) values and the published update instants."""
    stamped = stamped_by or model.stamped_by
    u_ns = _update_instants_ns(model, rng, float(t_start_ns), float(t_end_ns))
    value = _quantise(_sensor_values(truth, model, u_ns, rng), model)
    kept = rng.random(u_ns.size) >= model.drop_prob
    kept[0] = True  # something was published before the observation starts
    u_pub, v_pub = u_ns[kept], value[kept]
    if stamped == "sensor":
        sel = (u_pub >= t_start_ns) & (u_pub <= t_end_ns)
        t_ns = np.round(u_pub[sel]).astype(np.int64)
        v = v_pub[sel]
    else:
        period_ns = poll_period_s * NS_PER_S
        jitter_ns = (0.2 * poll_period_s if poll_jitter_s is None else poll_jitter_s) * NS_PER_S
        if jitter_ns >= period_ns:
            raise ValueError("poll_jitter_s must be below poll_period_s")
        n = int((t_end_ns - t_start_ns) // period_ns) + 1
        polls = t_start_ns + np.arange(n) * period_ns + rng.uniform(0, jitter_ns, n)
        polls = polls[polls <= t_end_ns]
        t_ns = np.round(polls).astype(np.int64)
        # The value as of each poll: the last update published at or before it.
        v = v_pub[np.searchsorted(u_pub, t_ns, side="right") - 1]
    raw = np.mod(v, model.wrap_j) if model.wrap_j else v.copy()
    samples = Samples(model.info(stamped), t_ns, v)
    in_span = (u_pub >= t_start_ns) & (u_pub <= t_end_ns)
    return Observation(samples, raw, u_pub[in_span])


def observe(
    truth: TruePower,
    model: SensorModel,
    poll_period_s: float,
    rng: np.random.Generator,
    t_start_ns: int,
    t_end_ns: int,
    *,
    stamped_by: str | None = None,
    poll_jitter_s: float | None = None,
) -> Samples:
    """What reading ``model`` over [t_start_ns, t_end_ns] yields, as ``Samples``.

    Poll-stamped (the default unless the model says "sensor"): a poll every
    ``poll_period_s`` (each delayed by uniform(0, poll_jitter_s), default 20% of the
    period) returns the value of the sensor's last published update, stamped at the poll.
    Sensor-stamped: one sample per published update, stamped at the update instant. A
    counter's samples are unwrapped (see ``observe_raw`` for the raw values).
    """
    return observe_raw(
        truth,
        model,
        poll_period_s,
        rng,
        t_start_ns,
        t_end_ns,
        stamped_by=stamped_by,
        poll_jitter_s=poll_jitter_s,
    ).samples


def unwrap_counter_j(raw_j: np.ndarray, wrap_j: float) -> np.ndarray:
    """Undo a counter's wrap modulo ``wrap_j`` (J): a decrease means one wrap.

    Valid while the counter advances by less than ``wrap_j`` between two readings.
    """
    raw = np.asarray(raw_j, dtype=np.float64)
    wraps = np.concatenate([[0], np.cumsum(np.diff(raw) < 0)])
    return raw + wraps * wrap_j
