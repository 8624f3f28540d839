"""The power session: from sampled sources to a point's energy block, against ground truth.

A known true power waveform (idle, then phase-shifted busy windows of decode steps) is read
through models of an H100's sensors; the session must report the windows' energy and the
per-token figures within the uncertainty it states.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.power import sensor_model as sm
from engine.power.base import Samples
from engine.power.session import PowerSession, null_energy, observed_update_period_s

GPU = "GPU 0"


class RecordedSampler:
    """Stands in for the live sampler: serves samples observed beforehand."""

    def __init__(self, samples: list[Samples]) -> None:
        self._samples = samples

    def samples(self, t0_ns: int | None = None, t1_ns: int | None = None) -> list[Samples]:
        return [s.between(t0_ns, t1_ns) for s in self._samples]

    def stop(self) -> None:
        pass

    def stats(self) -> dict:
        return {"mode": "recorded", "sources": len(self._samples)}


class NamedSource:
    def __init__(self, info) -> None:
        self.info = info

    def close(self) -> None:
        pass


def _session(truth, models, rng, t_end_ns) -> PowerSession:
    samples = []
    for model in models:
        model = dataclasses.replace(model, boundary="gpu-board")
        s = sm.observe(truth, model, 0.005, rng, truth.t0_ns, t_end_ns)
        info = dataclasses.replace(s.info, device=GPU)
        samples.append(Samples(info, s.t_ns, s.value))
    return PowerSession(
        sources=[NamedSource(s.info) for s in samples], sampler=RecordedSampler(samples)
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_point_energy_matches_truth_under_h100_sensors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = sm.workload(rng, n_windows=4, window_s=1.5, gap_s=(0.3, 0.4), lead_s=3.0, tail_s=3.0)
    t_end = w.truth.t1_ns
    session = _session(w.truth, [sm.H100_ENERGY, sm.H100_INSTANT], rng, t_end)
    # Idle from the lead-in, as the sweep does before its first point.
    session.update_period_s = {
        s.info.name: observed_update_period_s(s)
        for s in session.sampler.samples(w.truth.t0_ns, int(w.start_ns[0]))
    }
    from engine.energy import idle_power

    for s in session.sampler.samples(w.truth.t0_ns, int(w.start_ns[0])):
        p, u = idle_power(s, w.truth.t0_ns + int(0.5e9), int(w.start_ns[0]) - int(0.2e9))
        session.idle[s.info.name] = {"power_w": p, "uncertainty_w": u}

    batch, step_s = 8, 0.004
    block, trace = session.energy_for_point(
        w.start_ns, w.end_ns, tokens_per_step=batch, step_s=step_s, scaled_from_layers=False
    )
    truth_j = float(np.sum(w.true_energy_j()))
    window_s = float(np.sum(w.end_ns - w.start_ns)) / 1e9
    assert block["valid"] and block["boundary"] == "gpu-board" and block["reason"] is None
    assert abs(block["energy_j"] - truth_j) <= block["energy_uncertainty_j"]
    assert block["energy_uncertainty_j"] < 0.05 * truth_j  # not absurdly wide
    true_power_w = truth_j / window_s
    assert block["avg_power_w"] == pytest.approx(block["energy_j"] / window_s)
    # Per-token figures from the definitions (docs/methodology.md section 7).
    true_jpt = true_power_w * step_s / batch
    assert abs(block["joules_per_token"] - true_jpt) <= (
        block["avg_power_uncertainty_w"] * step_s / batch
    )
    assert block["tokens_per_joule"] == pytest.approx(1 / block["joules_per_token"])
    # Idle: the workload idles at about 90 W (plus noise); above-idle removes it.
    assert block["idle_power_w"] == pytest.approx(90.0, rel=0.05)
    assert block["energy_above_idle_j"] == pytest.approx(
        block["energy_j"] - block["idle_power_w"] * window_s
    )
    # Both sources were attributed; the counter and the instant reading agree.
    assert {e["quantity"] for e in block["sources"] if e["valid"]} == {"energy", "power"}
    assert block["cross_check"] and block["cross_check"][0]["agree"] is True
    assert not [f for f in block["flags"] if "disagree" in f]
    assert 0.2 < block["coverage"] <= 1.0
    assert block["sampler"] == {"mode": "recorded", "sources": 2}
    assert trace["windows_s"][0][0] == pytest.approx(0.0)
    assert len(trace["t_s"]) == len(trace["power_w"]) > 10


def test_gain_error_between_sources_is_flagged() -> None:
    rng = np.random.default_rng(7)
    w = sm.workload(rng, n_windows=4, window_s=2.0, gap_s=(0.3, 0.4))
    off = dataclasses.replace(sm.H100_INSTANT, gain=1.08)
    session = _session(w.truth, [sm.H100_ENERGY, off], rng, w.truth.t1_ns)
    block, _ = session.energy_for_point(
        w.start_ns, w.end_ns, tokens_per_step=1, step_s=0.004, scaled_from_layers=False
    )
    assert any("disagree" in f for f in block["flags"])


def test_a_long_sensor_gap_voids_the_point_with_its_reason() -> None:
    rng = np.random.default_rng(3)
    # A hole of about 4.5 s: longer than the 3 s bound (as InferenceX's).
    w = sm.workload(rng, n_windows=2, window_s=2.0, gap_s=(0.3, 0.4))
    s = sm.observe(w.truth, sm.H100_ENERGY, 0.005, rng, w.truth.t0_ns, w.truth.t1_ns)
    keep = (s.t_ns < w.start_ns[0] - int(0.1e9)) | (s.t_ns > w.end_ns[-1] + int(0.1e9))
    holed = Samples(dataclasses.replace(s.info, boundary="gpu-board"), s.t_ns[keep], s.value[keep])
    session = PowerSession(sources=[NamedSource(holed.info)], sampler=RecordedSampler([holed]))
    block, _ = session.energy_for_point(
        w.start_ns, w.end_ns, tokens_per_step=1, step_s=0.004, scaled_from_layers=False
    )
    assert block["valid"] is False and block["tokens_per_joule"] is None
    assert "gap" in block["reason"]


def test_null_energy_names_every_figure() -> None:
    block = null_energy("no power source on this machine")
    assert block["tokens_per_joule"] is None and block["energy_j"] is None
    assert block["reason"] == "no power source on this machine"


def test_observed_update_period_from_polled_changes() -> None:
    rng = np.random.default_rng(5)
    truth = sm.with_noise(sm.steps([100.0], [2.0]), rng, 5.0)
    s = sm.observe(truth, sm.H100_INSTANT, 0.005, rng, truth.t0_ns, truth.t1_ns)
    assert observed_update_period_s(s) == pytest.approx(0.1, rel=0.1)


def test_a_throttle_inside_the_point_is_seen_not_only_at_its_ends() -> None:
    import time

    calls = {"n": 0}

    def state() -> dict:
        calls["n"] += 1
        # Only the middle polls see the power cap and a lower clock.
        throttled = 3 <= calls["n"] <= 5
        return {
            "sm_clock_mhz": 1500 if throttled else 1980 - calls["n"] % 2 * 15,
            "temperature_c": 60 + calls["n"],
            "clock_event_reasons": ["sw_power_cap"] if throttled else ["gpu_idle"],
        }

    session = PowerSession(sources=[], sampler=None, device_state=state)
    before = session.device_state_now()
    session.start_state_watch(interval_s=0.01)
    time.sleep(0.3)
    after = session.device_state_now()
    session.close()
    summary = session.summarize_state(before, after)
    assert before["clock_event_reasons"] == ["gpu_idle"] and after["sm_clock_mhz"] in (1965, 1980)
    assert summary["throttled"] and summary["reasons_seen"] == ["sw_power_cap"]
    assert summary["clock_changed"] and summary["sm_clock_mhz_range"][0] == 1500
    # Boost bins (15 MHz) are one operating point; 1500 vs 1980 MHz is not.
    assert session.clocks_agree(1965, 1980) and not session.clocks_agree(1500, 1980)
    assert summary["polled_states"] >= 5


def test_the_protocol_follows_each_boundarys_fastest_source() -> None:
    from engine.power.base import SourceInfo

    counter = SourceInfo("nvml:0:energy", "gpu-board", "energy", 0.1)
    average = SourceInfo("nvml:0:power-average", "gpu-board", "power", 1.0, 1.0)
    session = PowerSession(
        sources=[NamedSource(counter), NamedSource(average)], sampler=RecordedSampler([])
    )
    assert session.slowest_update_period_s() == 1.0
    assert session.protocol_update_period_s() == 0.1  # the 1 s average does not set it
    session.update_period_s["nvml:0:energy"] = 0.02  # measured while idle
    assert session.protocol_update_period_s() == 0.02
    session.seen_sources["replay:meter.csv"] = ("node", 1.0)  # a 1 Hz wall meter
    assert session.protocol_update_period_s() == 1.0
