"""Energy attribution speed: 10 million samples, 1 million windows (target: under 2 s).

The samples come from ``engine.power.sensor_model``: a 10 ms sensor (an energy counter, or
a power reading averaging 2.5 ms) polled every 1 ms for 10,000 s of a load stepping between
random levels, with noise. The windows are 1 million decode steps of 5-13 ms, back to back,
with a pause of 50-300 ms after every 500: most windows share their sensor spans with their
neighbours.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import energy as en
from engine.power import sensor_model as sm

N_SAMPLES = 10_000_000
N_WINDOWS = 1_000_000
POLL_S = 0.001


def _samples(model: sm.SensorModel, seed: int):
    rng = np.random.default_rng(seed)
    total_s = N_SAMPLES * POLL_S
    n_levels = int(total_s / 2.0)
    levels = rng.uniform(100.0, 700.0, n_levels)
    truth = sm.with_noise(sm.steps(levels, [total_s / n_levels] * n_levels, dt_s=1e-3), rng, 30.0)
    s = sm.observe(truth, model, POLL_S, rng, 0, truth.t1_ns, poll_jitter_s=0.0002)
    # Back-to-back steps of 5-13 ms; after every 500 steps a pause of 50-300 ms.
    dur = rng.uniform(5e6, 13e6, N_WINDOWS)
    gap = np.zeros(N_WINDOWS)
    gap[499::500] = rng.uniform(50e6, 300e6, gap[499::500].size)
    start = 1e9 + np.cumsum(dur + gap) - dur - gap
    return s, start.astype(np.int64), (start + dur).astype(np.int64)


@pytest.mark.parametrize(
    "model",
    [
        sm.SensorModel("energy", 0.01, None, jitter_s=2e-4, resolution=1e-3, name="counter-10ms"),
        sm.SensorModel("power", 0.01, 0.0025, jitter_s=2e-4, resolution=1e-3, name="power-10ms"),
    ],
    ids=["counter", "power"],
)
def test_attribute_10m_samples_1m_windows(benchmark, model):
    samples, start_ns, end_ns = _samples(model, seed=1)
    assert samples.t_ns.size == N_SAMPLES and start_ns[-1] < samples.t_ns[-1]

    we = benchmark.pedantic(
        en.attribute, args=(samples, start_ns, end_ns), rounds=3, iterations=1, warmup_rounds=1
    )
    seconds = benchmark.stats.stats.mean
    valid = float(np.mean(we.valid))
    benchmark.extra_info.update(
        {"samples": N_SAMPLES, "windows": N_WINDOWS, "seconds": seconds, "valid": valid}
    )
    print(
        f"\n{model.name}: {N_SAMPLES / 1e6:.0f} M samples, {N_WINDOWS / 1e6:.0f} M windows in "
        f"{seconds:.2f} s ({N_SAMPLES / seconds / 1e6:.1f} M samples/s, "
        f"{N_WINDOWS / seconds / 1e6:.2f} M windows/s); {100 * valid:.1f}% of windows valid"
    )
