"""Roofline: the step time a plan would take at the device's measured peaks.

Per op, time = max(bytes / copy bandwidth, FLOPs / matmul rate for the op's arithmetic),
plus collective bytes over the link bandwidth when one is known; the step's predicted
time is the sum over ops. Peaks are measured on the device in the same run, never taken
from a datasheet (a datasheet value may ride along, labelled as such).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.plan import Plan


@dataclass(frozen=True)
class Peaks:
    """Measured ceilings of one device.

    copy_bw_gbps: memory copy bandwidth, bytes read + written, in GB/s (1e9 B/s).
    matmul_tflops: measured matmul rate by arithmetic ("bf16", "fp8", "fp4", or "*" for
    a device that runs every precision in one arithmetic, as the CPU backend does in float32).
    link_bw_gbps: measured collective bandwidth between ranks, None when not measured.
    """

    copy_bw_gbps: float
    matmul_tflops: dict[str, float]
    link_bw_gbps: float | None = None
    method: str = ""
    datasheet: dict = field(default_factory=dict)

    def rate_tflops(self, compute: str) -> float | None:
        """Matmul rate for an arithmetic, or None when this device has no measured rate."""
        if compute in self.matmul_tflops:
            return self.matmul_tflops[compute]
        return self.matmul_tflops.get("*")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Roofline:
    """Predicted step time and how it splits between bytes and FLOPs."""

    step_time_s: float
    memory_time_s: float
    compute_time_s: float
    comm_time_s: float | None
    memory_bound_ops: int
    compute_bound_ops: int
    missing_rates: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(plan: Plan, peaks: Peaks) -> Roofline:
    """Price every op of ``plan`` at ``peaks``; sum the per-op maxima."""
    bw = peaks.copy_bw_gbps * 1e9
    total = memory = compute = 0.0
    comm: float | None = 0.0
    mem_ops = comp_ops = 0
    missing: set[str] = set()
    for op in plan.ops:
        t_bytes = op.bytes / bw
        t_flops = 0.0
        if op.flops:
            rate = peaks.rate_tflops(op.compute)
            if rate is None:
                missing.add(op.compute)
            else:
                t_flops = op.flops / (rate * 1e12)
        if op.comm_bytes:
            if peaks.link_bw_gbps:
                t_comm = op.comm_bytes / (peaks.link_bw_gbps * 1e9)
                total += t_comm
                comm = (comm or 0.0) + t_comm
            else:
                comm = None
        memory += t_bytes
        compute += t_flops
        if t_flops > t_bytes:
            comp_ops += 1
        else:
            mem_ops += 1
        total += max(t_bytes, t_flops)
    return Roofline(
        step_time_s=total,
        memory_time_s=memory,
        compute_time_s=compute,
        comm_time_s=comm,
        memory_bound_ops=mem_ops,
        compute_bound_ops=comp_ops,
        missing_rates=tuple(sorted(missing)),
    )
