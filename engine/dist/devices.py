"""Which device a rank uses: the local rank picks the GPU; CPU ranks share the cores.

A GPU rank must choose its device before CUDA starts in the process, so the choice goes
into the environment: ``CUDA_VISIBLE_DEVICES`` names the one GPU the rank sees (the CUDA
backend then uses its device 0) and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes the indices
count GPUs in bus order on every node (the power session finds the GPU's sensors from its
PCI bus id, whatever the numbering). When the launcher has
already given each rank its GPUs (Slurm's ``--gpus-per-task``, or a ``CUDA_VISIBLE_DEVICES``
the user set), the rank takes the entry at its local rank from that list.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass


class DeviceError(ValueError):
    """No device can be given to this rank (one-line message)."""


@dataclass(frozen=True)
class GpuChoice:
    """The GPU of one rank.

    ``visible``: the value for ``CUDA_VISIBLE_DEVICES`` (one entry: an index or a UUID);
    ``note``: how it was chosen, for the record.
    """

    visible: str
    note: str


def choose_gpu(
    local_rank: int,
    local_size: int,
    visible: str | None,
    gpu_count: int | None,
) -> GpuChoice:
    """The GPU for the rank at ``local_rank`` of ``local_size`` ranks on its node.

    ``visible`` is the inherited ``CUDA_VISIBLE_DEVICES`` (None: unset) and ``gpu_count``
    the GPUs NVML sees (None: unknown). Raises DeviceError when the node has fewer GPUs than
    ranks: two ranks on one GPU would each count its whole power.
    """
    if visible is not None and visible.strip():
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if local_size > len(entries) and len(entries) > 1:
            raise DeviceError(
                f"{local_size} ranks on this node but CUDA_VISIBLE_DEVICES lists "
                f"{len(entries)} GPUs ({visible})"
            )
        entry = entries[0] if len(entries) == 1 else entries[local_rank]
        how = "the launcher's one GPU" if len(entries) == 1 else f"entry {local_rank} of"
        return GpuChoice(visible=entry, note=f"{how} CUDA_VISIBLE_DEVICES={visible}")
    if gpu_count is not None and local_rank >= gpu_count:
        raise DeviceError(
            f"local rank {local_rank} has no GPU: this node has {gpu_count} and runs "
            f"{local_size} ranks"
        )
    return GpuChoice(
        visible=str(local_rank),
        note=f"local rank {local_rank} of {local_size} -> GPU {local_rank} (PCI bus order)",
    )


def apply_gpu_choice(choice: GpuChoice, env: MutableMapping[str, str] | None = None) -> None:
    """Make ``choice`` the only GPU CUDA shows this process (call before CUDA starts)."""
    env = os.environ if env is None else env
    env["CUDA_VISIBLE_DEVICES"] = choice.visible
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"


def nvml_gpu_count() -> int | None:
    """How many GPUs NVML sees on this node (None when NVML cannot tell)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: the count is unknown, not zero
        return None


def cpu_threads(local_size: int, cores: int | None = None, allowed: int | None = None) -> int:
    """Compute threads for one of ``local_size`` CPU ranks on a node.

    When the launcher bound the rank to some cores (``allowed``, from the process's CPU
    affinity, is below ``cores``), all of them; otherwise an equal share of the node's cores
    (at least one), so that the ranks do not oversubscribe them.
    """
    cores = cores if cores is not None else (os.cpu_count() or 1)
    if allowed is None:
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if allowed < cores:
        return max(1, allowed)
    return max(1, cores // max(1, local_size))
