"""One command for the whole picture on a GPU: ``python benches/report.py`` (under 6 minutes on an H100/H200).

In order, each section fail-soft (a failing provider becomes an error row and the rest goes on) and under its
share of a global time budget (rows that no longer fit are reported as skipped, never dropped silently):

1. the card's ceilings: a 1 GiB device-to-device copy (GB/s, read + write) and an 8192³ bf16 matmul (TFLOP/s);
2. correctness: each Triton kernel against the eager reference in bf16 (forward and every gradient, the tests'
   tolerance rule), and ``MAE(impl="triton")`` against ``MaskedAutoencoderViT`` with the same weights and mask;
3. each op (patch embedding, attention, masked MSE, decoder assembly), forward and forward+backward, for every
   provider at ViT-B/16, ViT-L/16 and ViT-H/14 (batch 256, mask 0.75, bf16);
4. the training step (forward under bf16 autocast, backward, AdamW) for every provider.

Times are ``triton.testing.do_bench`` medians after explicit warm-up calls (compilation and autotuning happen
there). The markdown tables are printed last (targets last of all) and everything is written as JSON.

``--dry-run`` runs the same code at a tiny size (on the CPU: Triton kernels under the interpreter, fp32); its
numbers measure nothing. Exit status 1 when a correctness check fails, 2 on bad usage, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("ceilings", "checks", "patch_embed", "attention", "masked_mse", "decoder_assembly", "step")
# Shares of the time budget; a section's budget is its share of what is left when it starts.
WEIGHTS = {
    "ceilings": 0.02,
    "checks": 0.10,
    "patch_embed": 0.10,
    "attention": 0.18,
    "masked_mse": 0.07,
    "decoder_assembly": 0.07,
    "step": 0.46,
}
# Seconds a row needs at least before it is started (compiles dominate); a started row may overrun its section by
# GRACE_S before it is interrupted.
MIN_ROW_S = {"op": 2.0, "op_compile": 15.0, "step": 10.0, "step_compile": 60.0}
GRACE_S = 20.0
# The model check's batch (its fp64 reference model must fit); the op checks run at the benchmarked shapes, so
# that the kernels are also autotuned there first.
MODEL_CHECK_BATCH = 4
# The step rows that matter most run first: the ViT-B/16 targets, then ViT-L/16's MFU, then the rest.
STEP_PRIORITY = (
    ("vit_b16", "eager"),
    ("vit_b16", "triton"),
    ("vit_b16", "compile"),
    ("vit_l16", "triton"),
    ("vit_l16", "eager"),
    ("vit_b16", "triton+compile"),
    ("vit_h14", "eager"),
    ("vit_h14", "triton"),
    ("vit_l16", "compile"),
    ("vit_l16", "triton+compile"),
    ("vit_h14", "compile"),
    ("vit_h14", "triton+compile"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU: Triton interpreter, fp32)")
    p.add_argument("--json", default="runs/bench-report.json", help="where to write the JSON report")
    p.add_argument("--markdown", default=None, help="also write the markdown tables to this file")
    p.add_argument("--models", default=None, help="comma-separated subset of vit_b16,vit_l16,vit_h14")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=None, help="total time budget (default 300 s; dry run 900 s)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    return p.parse_args(argv)


class Clock:
    """The global deadline and the current section's deadline."""

    def __init__(self, budget_s: float, sections: list[str]):
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.pending = list(sections)
        self.section_deadline = self.deadline
        self.used: dict[str, dict] = {}

    def begin(self, section: str) -> None:
        now = time.monotonic()
        weight = sum(WEIGHTS[s] for s in self.pending)
        share = WEIGHTS[section] / weight if weight else 1.0
        self.section_deadline = now + max(0.0, self.deadline - now) * share
        self.pending.remove(section)
        self.used[section] = {"budget_s": round(self.section_deadline - now, 1), "t0": now}

    def end(self, section: str) -> None:
        info = self.used[section]
        info["used_s"] = round(time.monotonic() - info.pop("t0"), 1)

    def remaining(self) -> float:
        return self.section_deadline - time.monotonic()


class Runner:
    """Runs rows fail-soft under the clock."""

    def __init__(self, args: argparse.Namespace, device, clock: Clock):
        from benches import common

        self.args, self.device, self.clock = args, device, clock
        self.dtype = common.bench_dtype(device)
        self.cuda = device.type == "cuda"
        self.ceilings: dict | None = None
        self.rows: list[dict] = []
        self.checks: list[dict] = []

    def guarded(self, row: dict, min_s: float, fn, collect: bool = False) -> dict:
        """Run ``fn() -> dict`` into ``row`` unless the section's time is spent; errors become the row's status.

        Memory is collected after a failure, or when ``collect`` (a whole model was built).
        """
        import torch

        from benches import measure, providers

        remaining = self.clock.remaining()
        if remaining < min_s:
            row.update(
                status="skipped", reason=f"time budget: {max(remaining, 0):.0f} s left, row needs ~{min_s:.0f} s"
            )
            return row
        t0 = time.monotonic()
        try:
            with measure.hard_timeout(remaining + GRACE_S if self.cuda else 0):
                row.update(fn())
            row.setdefault("status", "ok")
        except providers.Unavailable as e:
            row.update(status="unavailable", reason=str(e))
        except measure.MeasurementTimeout as e:
            row.update(status="error", reason=f"timed out: {e}")
            torch._dynamo.reset()
        except Exception as e:  # fail-soft: any failure is reported as this row's error
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
            row["traceback"] = traceback.format_exc(limit=6)
        if collect or row["status"] != "ok":
            measure.free_memory(self.device)
        row["wall_s"] = round(time.monotonic() - t0, 2)
        return row

    # ------------------------------------------------------------------------------------------------ sections

    def section_ceilings(self) -> None:
        from benches import measure

        row = self.guarded({}, 0.0, lambda: measure.measure_ceilings(self.device, self.args.dry_run))
        self.ceilings = row if row.get("status") == "ok" else {"reason": row.get("reason")}

    def section_checks(self, models) -> None:
        from benches import common, providers

        for op in common.OPS:
            for shape in models:
                variants = [(st, None) for st in common.STAGES] if op == "attention" else [("", None)]
                if op == "masked_mse":
                    variants = [("", True), ("", False)]
                for stage, norm_pix in variants:
                    label = providers.case_label(op, shape, stage or "encoder")
                    if norm_pix is not None:
                        label += f" norm_pix_loss={norm_pix}"
                    dtype = str(self.dtype).removeprefix("torch.")
                    entry = {"op": op, "model": shape.name, "case": label, "dtype": dtype}

                    def run(op=op, shape=shape, stage=stage, norm_pix=norm_pix):
                        fn = providers.kernel_or_unavailable(op, self.device)
                        case = providers.make_case(op, shape, self.device, self.dtype, stage or "encoder")
                        if norm_pix is not None:
                            case.args = (*case.args[:4], norm_pix)
                        result = providers.check_op(case, fn, self.dtype)
                        return {"tensors": result["tensors"], "status": "ok" if result["ok"] else "FAIL"}

                    self.checks.append(self.guarded(entry, 1.0, run))
        shape = models[0].with_batch(min(models[0].batch, MODEL_CHECK_BATCH))
        entry = {"op": "model", "model": shape.name, "case": "", "dtype": ""}

        def run_model():
            result = providers.check_model(shape, self.device)
            return {k: result[k] for k in ("case", "dtype", "tensors")} | {"status": "ok" if result["ok"] else "FAIL"}

        self.checks.append(self.guarded(entry, 5.0, run_model))

    def _measure(self, run, mode_flops, mode_bytes, bound) -> dict:
        from benches import measure

        for _ in range(2 if self.cuda else 1):
            run()
        measure.sync(self.device)
        ms = measure.time_ms(run, self.device, warmup_ms=10, rep_ms=50)
        out = {"ms": ms, **measure.rates(ms, mode_flops, mode_bytes, self.ceilings, bound)}
        out.update(measure.peak_memory(run, self.device) or {})
        return out

    def section_op(self, op: str, models) -> None:
        from benches import common, measure, providers

        plain = [p for p in common.OP_PROVIDERS[op] if p != "compile"]
        for pass_providers, min_s in ((plain, MIN_ROW_S["op"]), (["compile"], MIN_ROW_S["op_compile"])):
            for shape in models:
                for stage in common.STAGES if op == "attention" else ("",):
                    case_box: dict = {}

                    def case(shape=shape, stage=stage, box=case_box):
                        if "case" not in box:
                            box["case"] = providers.make_case(op, shape, self.device, self.dtype, stage or "encoder")
                        return box["case"]

                    for provider in pass_providers:
                        for mode in ("fwd+bwd", "fwd"):
                            row = {"section": op, "op": op, "model": shape.name, "mode": mode, "provider": provider}

                            def run(provider=provider, mode=mode, row=row, case=case):
                                c = case()
                                fn = providers.op_provider(op, provider, self.device)
                                return self._measure(
                                    providers.runner(c, fn, mode), c.flops[mode], c.nbytes[mode], c.bound
                                )

                            row["case"] = providers.case_label(op, shape, stage or "encoder")
                            self.rows.append(self.guarded(row, min_s, run))
                    case_box.clear()
                    measure.free_memory(self.device)

    def section_step(self, models) -> None:
        import torch

        from benches import common, measure, providers

        rank = {pair: i for i, pair in enumerate(STEP_PRIORITY)}
        plan = [(shape, p) for shape in models for p in common.STEP_PROVIDERS]
        plan.sort(key=lambda sp: rank.get((sp[0].name, sp[1]), len(rank) + common.STEP_PROVIDERS.index(sp[1])))
        for shape, provider in plan:
            row = {
                "section": "step",
                "op": "step",
                "model": shape.name,
                "case": f"batch {shape.batch}",
                "mode": "step",
                "provider": provider,
            }
            min_s = MIN_ROW_S["step"]
            if "compile" in provider:
                min_s = MIN_ROW_S["step_compile"] * {"vit_l16": 1.5, "vit_h14": 2.0}.get(shape.name, 1.0)

            def run(shape=shape, provider=provider, row=row):
                try:
                    case = providers.make_step(shape, provider, self.device)
                    row["kernels"] = case.kernels
                    for _ in range(3 if self.cuda else 1):
                        case.step()
                    measure.sync(self.device)
                    ms = measure.time_ms(case.step, self.device, warmup_ms=0, rep_ms=800)
                    out = {"ms": ms, "images_per_s": shape.batch / (ms * 1e-3)}
                    out.update(measure.rates(ms, case.flops["step"], None, self.ceilings, "matmul"))
                    out["mfu"] = out["pct_matmul"]
                    out.update(measure.peak_memory(case.step, self.device) or {})
                    return out
                finally:
                    if "compile" in provider:
                        torch._dynamo.reset()  # drop the compiled model's graphs (and their references)

            self.rows.append(self.guarded(row, min_s if self.cuda else 0.0, run, collect=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if device.type != "cuda":
        if not args.dry_run:
            print("the full report needs a CUDA GPU; on the CPU run it with --dry-run", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    else:
        torch.backends.cudnn.benchmark = True  # as the original MAE pretraining script sets it (eager conv)

    from benches import common, measure, reporting

    pool = common.TINY_MODELS if args.dry_run else common.GPU_MODELS
    names = args.models.split(",") if args.models and not args.dry_run else list(pool)
    unknown = [n for n in names if n not in pool]
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if unknown or bad:
        print(f"unknown models {unknown} (known: {list(pool)}) or sections {bad} (known: {SECTIONS})", file=sys.stderr)
        return 2
    models = [pool[n] for n in names]
    budget = args.budget_s if args.budget_s is not None else (900.0 if args.dry_run else 300.0)
    clock = Clock(budget, [s for s in SECTIONS if s in sections])
    runner = Runner(args, device, clock)
    for section in SECTIONS:
        if section not in sections:
            continue
        clock.begin(section)
        print(f"[{time.monotonic() - clock.start:6.1f} s] {section} (budget {clock.remaining():.0f} s)", flush=True)
        if section == "ceilings":
            runner.section_ceilings()
        elif section == "checks":
            runner.section_checks(models)
        elif section == "step":
            runner.section_step(models)
        else:
            runner.section_op(section, models)
        clock.end(section)

    reporting.add_speedups(runner.rows)
    report = {
        "dry_run": args.dry_run,
        "env": measure.environment(device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "models": {m.name: m.describe() for m in models},
        "kernels": {op: reporting_kernel(op) for op in common.OPS},
        "ceilings": runner.ceilings,
        "checks": runner.checks,
        "results": runner.rows,
        "targets": reporting.evaluate_targets(runner.rows, runner.checks, args.dry_run),
        "sections": clock.used,
        "budget_s": budget,
        "total_s": round(time.monotonic() - clock.start, 1),
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reporting.clean_json(report), indent=1))
    md = reporting.markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(md)
    print(f"[{report['total_s']:6.1f} s] done; JSON written to {path}\n", flush=True)
    print(md, flush=True)
    return 1 if any(c.get("status") == "FAIL" for c in runner.checks) else 0


def reporting_kernel(op: str) -> str | None:
    """The kernel module in use for ``op``, or None when fastmae has none."""
    from fastmae import ops

    return ops.KERNELS[op][0] if ops.triton_kernel(op) is not None else None


if __name__ == "__main__":
    sys.exit(main())
