"""nvcc builds every kernel for every target, and the compiler's own reports check them.

Every ``kernels/*.cu`` is compiled for each architecture the engine ships (sm_80, sm_89,
sm_90a, sm_100a, sm_120), one nvcc process per (file, target), as many at once as there are
cores (about 2.5 minutes on 2 cores). sm_90a goes through PTX first, so the test also reads:

- the PTX parameter list of every entry point against the ABI table of
  ``engine/backends/cuda_abi.py`` (the launcher and the emulator read arguments from it);
- 16-byte ``ld.global.nc.v4`` loads in the weight-streaming and attention kernels, and the
  tensor-core ``mma`` in the weight-only GEMM.

ptxas's ``-v`` report of every target must show no spills and no stack frame (local memory)
for every kernel but the few named in ``cuda_abi.HOT_EXEMPT``. The CMake build is run on two
small sources for all targets (the full build takes minutes; gpu_check.sh runs it). Skips,
with the reason, where nvcc or cmake is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.backends import cuda_abi as abi

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
ARCHS = ("80", "89", "90a", "100a", "120")
PTX_ARCH = "90a"
# Slowest first so the pool stays busy to the end.
ORDER = ("wq_gemm", "attention", "gemv", "elementwise", "fp4quant", "moe", "stamp")

pytestmark = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA kernels cannot be built"
)


def _compile(src: str, arch: str, out_dir: Path) -> dict:
    """Compile one source for one target; returns its ptxas report (and PTX for sm_90a)."""
    cu = KERNELS / f"{src}.cu"
    gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
    base = ["nvcc", "-std=c++17", "-O3"]
    result = {"src": src, "arch": arch, "ptx": None}
    if arch == PTX_ARCH:
        ptx = out_dir / f"{src}.ptx"
        r1 = subprocess.run(
            [*base, f"-arch=compute_{arch}", "-ptx", "-o", str(ptx), str(cu)],
            capture_output=True,
            text=True,
        )
        if r1.returncode:
            return {**result, "rc": r1.returncode, "log": r1.stderr}
        r2 = subprocess.run(
            [
                "ptxas",
                "-v",
                "-O3",
                f"-arch=sm_{arch}",
                "-o",
                str(out_dir / f"{src}.cubin"),
                str(ptx),
            ],
            capture_output=True,
            text=True,
        )
        return {**result, "rc": r2.returncode, "log": r2.stderr + r2.stdout, "ptx": ptx.read_text()}
    r = subprocess.run(
        [
            *base,
            gencode,
            "-Xptxas",
            "-v",
            "-cubin",
            "-o",
            str(out_dir / f"{src}_{arch}.cubin"),
            str(cu),
        ],
        capture_output=True,
        text=True,
    )
    return {**result, "rc": r.returncode, "log": r.stderr + r.stdout}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> list[dict]:
    """Every (source, target) compiled, in parallel over the machine's cores."""
    out = tmp_path_factory.mktemp("kernels")
    sources = sorted(abi.sources(), key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    jobs = [(src, arch) for src in sources for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda job: _compile(*job, out), jobs))


def test_every_kernel_file_compiles_for_every_target(builds):
    failed = [f"{b['src']}.cu sm_{b['arch']}:\n{b['log'][-1500:]}" for b in builds if b["rc"]]
    assert not failed, "\n".join(failed)
    assert {(b["src"], b["arch"]) for b in builds} == {(s, a) for s in abi.sources() for a in ARCHS}


def _reports(log: str) -> dict[str, dict]:
    """Per entry point: stack frame, spill bytes and registers from a ptxas -v log."""
    out: dict[str, dict] = {}
    name = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m and name:
            out[name] = {"stack": int(m.group(1)), "spill": int(m.group(2)) + int(m.group(3))}
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name in out:
            out[name]["registers"] = int(m.group(1))
            lmem = re.search(r"(\d+) bytes lmem", line)
            out[name]["lmem"] = int(lmem.group(1)) if lmem else 0
    return out


def test_no_spills_and_no_local_memory_in_hot_kernels(builds):
    bad = []
    seen = set()
    for b in builds:
        for name, rep in _reports(b["log"]).items():
            if not name.startswith("tpj_"):
                continue
            seen.add(name)
            if name in abi.HOT_EXEMPT:
                continue
            if rep["stack"] or rep["spill"] or rep.get("lmem", 0):
                bad.append(f"{name} sm_{b['arch']}: {rep}")
    assert not bad, "\n".join(bad)
    assert seen == set(abi.SIGNATURES), sorted(set(abi.SIGNATURES) ^ seen)


def _ptx_entries(builds) -> dict[str, tuple[str, list[str], str]]:
    """Entry point -> (source, PTX parameter types, body) from the sm_90a PTX."""
    entries = {}
    for b in builds:
        if b["ptx"] is None:
            continue
        text = b["ptx"]
        heads = list(re.finditer(r"\.entry (\w+)\(\s*(.*?)\)", text, re.S))
        for i, m in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
            types = re.findall(r"\.param (\.\w+)", m.group(2))
            entries[m.group(1)] = (b["src"], types, text[m.end() : end])
    return entries


def test_abi_table_matches_every_ptx_entry(builds):
    entries = _ptx_entries(builds)
    assert set(entries) == set(abi.SIGNATURES), sorted(set(entries) ^ set(abi.SIGNATURES))
    for name, (src, codes) in abi.SIGNATURES.items():
        got_src, types, _ = entries[name]
        assert got_src == src, f"{name} is in {got_src}.cu, the table says {src}.cu"
        assert types == [abi.PTX_TYPES[c] for c in codes], f"{name}: PTX {types} vs {codes}"


def test_streaming_kernels_use_16_byte_loads_and_tensor_cores(builds):
    entries = _ptx_entries(builds)
    for name, (_, _, body) in entries.items():
        if name.startswith(("tpj_gemv_", "tpj_wq_gemm_")) or (
            name.startswith("tpj_gqa_decode_") and name.endswith("_bf16")
        ):
            assert "ld.global.nc.v4" in body, f"{name} has no 16-byte read-only loads"
        if name.startswith("tpj_wq_gemm_"):
            assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in body, name


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_fatbins_and_manifest(tmp_path):
    build = tmp_path / "build"
    cfg = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DTPJ_SOURCES=stamp;moe"],
        capture_output=True,
        text=True,
    )
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    res = subprocess.run(
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    manifest = json.loads((build / "kernels" / "manifest.json").read_text())
    assert manifest["archs"] == list(ARCHS)
    assert sorted(manifest["sources"]) == ["moe", "stamp"]
    for name in ("stamp", "moe"):
        fatbin = (build / "kernels" / f"{name}.fatbin").read_bytes()
        assert len(fatbin) > 1000
        # A fatbin holds one ELF image per target; each carries its SM number.
        assert fatbin.count(b"\x7fELF") >= len(ARCHS), f"{name}.fatbin lacks a target image"
    assert (build / "tpj_host_driver").exists()


def test_sources_compile_with_nvrtc_as_the_run_time_fallback():
    """The engine compiles kernels/ with NVRTC when no prebuilt fatbin fits the device: every
    source must compile there too (no C library headers; PTX for compute_90, no GPU needed)."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")
    try:
        nvrtc.nvrtcVersion()
    except Exception as exc:  # the library itself may be missing
        pytest.skip(f"libnvrtc is not loadable: {exc}")
    failures = []
    for src in abi.sources():
        path = KERNELS / f"{src}.cu"
        err, prog = nvrtc.nvrtcCreateProgram(path.read_bytes(), path.name.encode(), 0, [], [])
        opts = [b"-std=c++17", f"-I{KERNELS}".encode(), b"--gpu-architecture=compute_90"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            failures.append(f"{src}.cu: {log.decode(errors='replace')[-1500:]}")
        nvrtc.nvrtcDestroyProgram(prog)
    assert not failures, "\n".join(failures)
