"""Shared benchmark fixtures: this machine's copy bandwidth, measured once per run."""

from __future__ import annotations

import pytest

from engine.backends import cpu_kernels as K

#: Bytes per copy buffer: far past the last-level cache (480 MiB L3 on the dev machine).
COPY_BYTES = 1 << 30


@pytest.fixture(scope="session")
def copy_bw() -> dict:
    """``cpu_kernels.copy_bandwidth_gbps`` on 1 GiB buffers, best of 5 (bytes read + written)."""
    res = K.copy_bandwidth_gbps(nbytes=COPY_BYTES, repeats=5)
    print(
        f"\ncopy bandwidth (read + write, 2 x {COPY_BYTES / 2**30:.0f} GiB per copy): "
        f"np.copyto {res['numpy_gbps']:.1f} GB/s, numba {res['threads']} threads "
        f"{res['numba_gbps']:.1f} GB/s -> ceiling {res['max_gbps']:.1f} GB/s"
    )
    return res
