"""``python -m engine.selftest``: the one-command GPU check.

On one CUDA device it loads (or NVRTC-compiles) the kernels, checks every kernel against its
NumPy contract on fresh random inputs with poisoned outputs, measures the device's copy
bandwidth and cuBLASLt matmul rate per precision, times decode-sized kernels against those
ceilings, checks whole decode steps of the tiny models against the float64 reference, times real decode steps (memory-bound B=1 and compute-bound B=256 of
Llama-3.1-8B, scaled from the layers that fit), and runs a short sweep of one dense and one
MoE model with power sampling. It prints a compact table and writes everything as JSON.
Stages that fail are recorded and the rest go on; the exit status is 1 when any check failed,
2 when no GPU is usable. Sized to finish in under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

#: Relative error of whole-step logits allowed per activation precision (bf16 activations are
#: rounded to bf16 on the GPU; the float64 reference does not round them).
STEP_TOL = {"bf16": 2e-2, "fp8_e4m3": 8e-2, "fp8_e5m2": 8e-2}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class SelfTest:
    """The stages of the check; each appends rows to ``self.results``."""

    def __init__(self, out: Path, seed: int, sweep: bool, quick: bool) -> None:
        self.out, self.seed, self.do_sweep, self.quick = out, seed, sweep, quick
        self.results: dict = {"stages": {}, "kernels": [], "steps": [], "perf": [], "sweep": []}
        self.t0 = time.monotonic()
        self.failed = False

    def stage(self, name: str, fn) -> None:
        t = time.monotonic()
        _log(f"== {name} ({t - self.t0:.0f} s elapsed)")
        try:
            fn()
            status = "ok"
        except Exception as exc:  # a stage's failure must not stop the others
            status = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if name == "device":
                _log(status)
            else:
                _log(traceback.format_exc(limit=4))
            self.failed = True
        self.results["stages"][name] = {"status": status, "seconds": time.monotonic() - t}

    # -- stages ---------------------------------------------------------------------------

    def device(self) -> None:
        from engine.backends.cuda import CudaBackend

        self.backend = CudaBackend()
        t = time.monotonic()
        self.kernels = self.backend.kernels
        self.results["kernel_load_s"] = time.monotonic() - t
        self.results["device"] = self.backend.device_info()
        _log(f"device: {json.dumps(self.results['device'])}")

    def kernel_checks(self) -> None:
        from engine.backends.cuda_check import Harness, correctness_cases

        harness = Harness(self.kernels, self.backend.lt)
        for case in correctness_cases(self.seed, self.backend.caps.cc, self.backend.caps.sm_count):
            try:
                row = harness.run(case, self.seed)
            except Exception as exc:
                row = {
                    "case": case.name,
                    "kernel": case.kernel,
                    "ok": False,
                    "error": str(exc)[:200],
                }
            self.results["kernels"].append(row)
            if not row["ok"]:
                self.failed = True
                _log(f"FAIL {case.name}: {row.get('error') or row['outputs']}")

    def peaks(self) -> None:
        peaks = self.backend.measure_peaks()
        self.peaks_ = peaks
        self.results["peaks"] = peaks.to_dict()
        _log(f"copy {peaks.copy_bw_gbps:.0f} GB/s, matmul {peaks.matmul_tflops} TFLOP/s")

    def kernel_perf(self) -> None:
        from engine.backends.cuda_check import Harness, performance_cases

        harness = Harness(self.kernels, self.backend.lt)
        peaks = getattr(self, "peaks_", None)
        for case in performance_cases(self.seed, self.backend.caps.cc, self.backend.caps.sm_count):
            row = harness.run(case, self.seed, timed=True, check=False)
            if peaks is not None:
                row["bw_fraction"] = row["gbps"] / peaks.copy_bw_gbps if row.get("gbps") else None
                kind = "bf16"
                if case.lt is not None:
                    kind = case.lt.kind
                rate = peaks.rate_tflops(kind)
                row["rate_fraction"] = row["tflops"] / rate if row.get("tflops") and rate else None
            self.results["perf"].append(row)

    def steps(self) -> None:
        from engine.backends.cuda_layout import step_variants
        from engine.models import load_spec
        from engine.plan import build_plan
        from engine.point import Point
        from engine.precision import parse_precision
        from engine.reference import ReferenceStep
        from engine.weights import EMBED_LAYER, kv_cache, layer_weights

        cc = self.backend.caps.cc
        precisions = ["bf16", "w4a16", "nvfp4-w4a16"] + (["fp8"] if cc >= (8, 9) else [])
        precisions += ["fp4"] if cc >= (10, 0) else []
        for model in ("tiny", "tiny-moe", "tiny-mla"):
            for prec in precisions:
                for batch in (1, 12):
                    spec = load_spec(model)
                    point = Point(model, batch, 48, parse_precision(prec))
                    plan = build_plan(spec, point)
                    layers = list(range(spec.num_layers))
                    row = {"model": model, "precision": prec, "batch": batch}
                    try:
                        runner = self.backend.prepare(plan, layers, self.seed)
                    except Exception as exc:
                        row.update(ok=None, error=str(exc)[:200])
                        self.results["steps"].append(row)
                        continue
                    tokens, assign = step_variants(plan, layers, self.seed)
                    a0 = assign[0] if assign else None
                    got = runner.forward(tokens[0], a0)
                    runner.close()
                    head = layer_weights(plan, EMBED_LAYER, self.seed)
                    weights = {x: layer_weights(plan, x, self.seed) for x in layers}
                    caches = {x: kv_cache(plan, x, self.seed) for x in layers}
                    want = ReferenceStep(spec, point, head, weights, caches).forward(tokens[0], a0)
                    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    tol = STEP_TOL.get(point.precision.activation, 8e-2)
                    ok = bool(np.isfinite(got).all() and err < tol)
                    row.update(rel_err=err, tol=tol, ok=ok)
                    self.failed |= not ok
                    self.results["steps"].append(row)

    def step_perf(self) -> None:
        from engine.measure import scaled_step_ns
        from engine.models import load_spec
        from engine.plan import build_plan
        from engine.point import Point
        from engine.precision import parse_precision
        from engine.weights import select_layers

        peaks = self.peaks_
        spec = load_spec("llama-3.1-8b")
        budget = 6e9 if self.quick else 12e9
        for batch, prec in ((1, "bf16"), (1, "w4a16"), (256, "bf16")):
            plan = build_plan(spec, Point(spec.name, batch, 1024, parse_precision(prec)))
            layers = select_layers(plan, budget)
            runner = self.backend.prepare(plan, layers, self.seed)
            try:
                runner.run_steps(5)
                win = runner.run_steps(30)
                overhead = self._launch_overhead(runner)
            finally:
                runner.close()
            step_s = float(np.median(scaled_step_ns(plan, layers, win))) / 1e9
            row = {
                "case": f"decode step llama-3.1-8b {prec} B={batch} L=1024 ({len(layers)}/{spec.num_layers} layers, scaled)",
                "time_s": step_s,
                "gbps": plan.bytes / step_s / 1e9,
                "tflops": plan.flops / step_s / 1e12,
                "bw_fraction": plan.bytes / step_s / 1e9 / peaks.copy_bw_gbps,
                "rate_fraction": plan.flops
                / step_s
                / 1e12
                / peaks.rate_tflops(plan.point.precision.gemm_compute),
                "launch_overhead_fraction_est": overhead["per_node_s"]
                * overhead["nodes"]
                / (float(np.median(win.end_ns - win.start_ns)) / 1e9),
                "nodes": overhead["nodes"],
            }
            self.results["perf"].append(row)

    def _launch_overhead(self, runner) -> dict:
        """Per-node cost of a graph of tiny kernels, times the step graph's node count: an
        estimate of what launching the step's kernels costs beyond their work."""
        cp = self.backend.cp
        stream = runner.stream
        timer = cp.cuda.Memory(64)
        n = 400
        stream.begin_capture()
        for _ in range(n):
            self.kernels.launch("tpj_read_globaltimer", (1,), 32, [timer.ptr, 0], stream)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        per = cp.cuda.get_elapsed_time(start, stop) * 1e-3 / n
        return {"per_node_s": per, "nodes": len(runner.layout.programs[0])}

    def sweep(self) -> None:
        from engine import sweep

        out = self.out / "sweep"
        models = "llama-3.1-8b,qwen3-30b-a3b"
        args = [
            "--backend", "cuda", "--model", models, "--batch", "1,64", "--context", "1024",
            "--precision", "bf16,w4a16", "--warmup", "0.5", "--duration", "2",
            "--memory-gb", "8" if self.quick else "12", "--out", str(out), "--seed", str(self.seed),
            "--power", "auto", "--repetitions", "1",
        ]  # fmt: skip
        code = sweep.main(args)
        self.results["sweep_exit"] = code
        path = out / "records.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                m = rec.get("metrics") or {}
                e = rec.get("energy") or {}
                self.results["sweep"].append(
                    {
                        "point": rec.get("key"),
                        "status": rec.get("status"),
                        "error": rec.get("error"),
                        "tok_s": m.get("throughput_tok_s"),
                        "roofline_fraction": m.get("roofline_fraction"),
                        "tokens_per_joule": e.get("tokens_per_joule"),
                        "energy_reason": e.get("reason"),
                    }
                )

    # -- report ---------------------------------------------------------------------------

    def table(self) -> str:
        lines = [
            f"{'check':<64} {'err':>9} {'ok':>4} {'us':>9} {'GB/s':>7} {'TF/s':>7} {'frac':>6}"
        ]

        def fmt(v, f):
            if isinstance(v, (int, float)):
                return f"{v:{f}}"
            width = "".join(ch for ch in f.split(".")[0] if ch.isdigit())
            return "-".rjust(int(width) if width else 1)

        for row in self.results["kernels"]:
            if not row["ok"]:
                lines.append(f"{row['case'][:64]:<64} {fmt(row.get('rel_err'), '9.1e')} FAIL")
        n_ok = sum(r["ok"] for r in self.results["kernels"])
        lines.append(f"{'kernel checks passed':<64} {n_ok}/{len(self.results['kernels'])}")
        for row in self.results["steps"]:
            name = f"step {row['model']} {row['precision']} B={row['batch']}"
            ok = {True: "ok", False: "FAIL", None: "n/a"}[row.get("ok")]
            lines.append(f"{name[:64]:<64} {fmt(row.get('rel_err'), '9.1e')} {ok:>4}")
        for row in self.results["perf"]:
            frac = row.get("bw_fraction") if row.get("bw_fraction") else row.get("rate_fraction")
            if row.get("rate_fraction") and (row.get("tflops") or 0) > 50:
                frac = row["rate_fraction"]
            lines.append(
                f"{row['case'][:64]:<64} {'':>9} {'':>4} {fmt(row.get('time_s', 0) * 1e6, '9.1f')} "
                f"{fmt(row.get('gbps'), '7.0f')} {fmt(row.get('tflops'), '7.1f')} {fmt(frac, '6.2f')}"
            )
        for row in self.results["sweep"]:
            tpj = row.get("tokens_per_joule")
            lines.append(
                f"sweep {str(row['point'])[:58]:<58} {row['status']:>10} tok/s={fmt(row.get('tok_s'), '.3g')} "
                f"roofline={fmt(row.get('roofline_fraction'), '.2f')} tok/J={fmt(tpj, '.3g')}"
            )
        peaks = self.results.get("peaks")
        if peaks:
            lines.append(
                f"ceilings: copy {peaks['copy_bw_gbps']:.0f} GB/s, matmul {peaks['matmul_tflops']}"
            )
        for name, st in self.results["stages"].items():
            lines.append(f"stage {name:<20} {st['status'][:80]} ({st['seconds']:.0f} s)")
        return "\n".join(lines)

    def run(self) -> int:
        self.stage("device", self.device)
        if "device" not in self.results:
            return 2
        self.stage("kernel checks", self.kernel_checks)
        self.stage("peaks", self.peaks)
        self.stage("kernel timing", self.kernel_perf)
        self.stage("decode steps", self.steps)
        if hasattr(self, "peaks_"):
            self.stage("step timing", self.step_perf)
        if self.do_sweep:
            self.stage("sweep", self.sweep)
        self.results["total_s"] = time.monotonic() - self.t0
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "selftest.json").write_text(json.dumps(self.results, indent=1, default=str))
        print(self.table())
        print(f"total {self.results['total_s']:.0f} s; JSON in {self.out / 'selftest.json'}")
        return 1 if self.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the GPU check; returns the exit status (0 all passed, 1 a check failed, 2 no GPU)."""
    p = argparse.ArgumentParser(
        prog="python -m engine.selftest", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out", default="selftest_out", help="directory for selftest.json and the sweep"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the random inputs (default: fresh)"
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the short sweep with power")
    p.add_argument("--quick", action="store_true", help="smaller timing runs")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(np.random.default_rng().integers(2**31))
    _log(f"seed {seed}")
    return SelfTest(Path(args.out), seed, not args.no_sweep, args.quick).run()


if __name__ == "__main__":
    raise SystemExit(main())
