"""One command for the whole picture on a GPU: ``python benches/report.py [--json F] [--markdown F]``.

Ceilings, correctness checks, then model by model the training step and every op for every provider, and the
targets; each row fail-soft, a deadline (``--budget-s``) checked before each row, the JSON rewritten after each.
A GPU run appends its rows to BENCHMARKS.csv. ``--dry-run``: the same at a tiny size on the CPU, measuring
nothing. Exit status 1 when a check fails. BENCHMARKS.md, "Running the GPU report", says what each part does.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OP_SECTIONS = ("patch_embed", "attention", "masked_mse", "decoder_assembly", "block")  # harness.OPS, in table order
SECTIONS = ("ceilings", "checks", "step", *OP_SECTIONS, "data")  # data: the input path (benches/harness_data.py)
MODEL_CHECK_BATCH = 4  # the model check's fp64 reference must fit
RESULTS = ROOT / "BENCHMARKS.csv"
ENV_KEYS = ("date", "card", "torch", "triton", "cuda", "driver", "fastmae_commit")
ROW_KEYS = ("section", "model", "case", "mode", "provider", "ms", "tflops", "gbps", "pct_ceiling", "speedup_vs_eager")
ROW_KEYS += ("speedup_vs_compile", "speedup_vs_best_sdpa", "images_per_s", "mfu", "peak_mib", "status")
ROW_KEYS += ("worker_share", "loader_over_step", "step_share")
LOWER_IS_BETTER = ("peak_ratio", "worker_share")
STEP_MINE = ("triton", "triton+compile", "triton+graphs", "triton+reduce-overhead")  # fastmae's step providers


@dataclasses.dataclass(frozen=True)
class Target:
    """fastmae's ``metric`` in ``section`` (forward+backward, or the step) against ``threshold``."""

    section: str
    metric: str  # a row's key (speedup_vs_*, pct_copy, mfu) or "peak_ratio" (peak memory over eager's)
    threshold: float
    models: tuple[str, ...] = ()  # empty: every model measured
    note: str = ""
    mode: str = ""  # the row's mode (default: fwd+bwd, or step for the step)
    provider: str = ""  # the row's provider (default: triton, or for the step the fastest of STEP_MINE)

    def describe(self) -> str:
        x = self.threshold
        what = {
            "speedup_vs_eager": f"≥ {x:g}× eager",
            "speedup_vs_compile": f"≥ {x:g}× torch.compile",
            "speedup_vs_best_sdpa": f"≥ {x:g}× the best SDPA backend",
            "pct_copy": f"≥ {x:.0%} of copy bandwidth",
            "peak_ratio": f"peak memory ≤ {x:g}× eager",
            "mfu": f"MFU ≥ {x:.0%}",
            "loader_over_step": f"≥ {x:g}× the training step's images/s",
            "worker_share": f"worker time per image ≤ {x:.0%} of the CPU path's",
        }[self.metric]
        where = {"step": "training step", "data": f"input, {self.provider} path"}.get(self.section)
        where = where or f"{self.section} fwd+bwd"
        return f"{where}: {what}" + (f" ({self.note})" if self.note else "")


TARGETS = (
    Target("patch_embed", "speedup_vs_eager", 3.0),
    Target("patch_embed", "speedup_vs_compile", 1.0, note="faster than compile"),
    Target("attention", "speedup_vs_best_sdpa", 1.2, note="encoder and decoder shapes"),
    Target("masked_mse", "pct_copy", 0.70),
    Target("masked_mse", "speedup_vs_eager", 4.0),
    Target("decoder_assembly", "speedup_vs_eager", 2.0),
    Target("block", "speedup_vs_eager", 1.3, note="encoder and decoder shapes"),
    Target("step", "speedup_vs_eager", 1.6, ("vit_b16",)),
    Target("step", "speedup_vs_compile", 1.2, ("vit_b16",)),
    Target("step", "peak_ratio", 0.75, ("vit_b16",)),
    Target("step", "mfu", 0.45, ("vit_b16",)),
    Target("step", "mfu", 0.55, ("vit_l16",)),
    Target("data", "loader_over_step", 2.0, ("vit_b16",), "its workers and decode+crop", "loader", "gpu"),
    Target("data", "worker_share", 0.05, ("vit_b16",), mode="gpu worker", provider="gpu"),
)


def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("status") == "ok" and row.get("ms") is not None


def _groups(rows: list[dict], key) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_eager``, ``_vs_compile`` and ``_vs_best_sdpa`` within each op, model, stage and mode, in place."""
    for group in _groups(rows, lambda r: (r["section"], r["model"], r.get("stage", ""), r["mode"])).values():
        ms = {r["provider"]: r["ms"] for r in group if _ok(r)}
        sdpa = min((p for p in ms if p.startswith("sdpa_")), key=ms.get, default=None)
        for r in group:
            for key, base in (("eager", "eager"), ("compile", "compile"), ("best_sdpa", sdpa)):
                r[f"speedup_vs_{key}"] = ms[base] / r["ms"] if base in ms and _ok(r) else None
            if r["section"] == "attention":
                r["best_sdpa"] = sdpa


def evaluate_targets(rows: list[dict], checks: list[dict], dry_run: bool) -> list[dict]:
    """One entry per target and measured shape: fastmae's value (the Triton kernel; for the step the fastest of
    :data:`STEP_MINE`), met or missed and the margin (value over threshold, minus one). A dry run's tiny model stands
    in for every model, and its verdicts say so."""
    failed = {c["op"] for c in checks if c.get("status") == "FAIL"}
    out = []
    for t in TARGETS:
        mine = (t.provider,) if t.provider else STEP_MINE if t.section == "step" else ("triton",)
        mode = t.mode or ("step" if t.section == "step" else "fwd+bwd")
        measured = [r for r in rows if (r["section"], r["mode"]) == (t.section, mode)]
        measured = [r for r in measured if dry_run or not t.models or r["model"] in t.models]
        groups = _groups(measured, lambda r: (r["model"], r.get("stage", "")))
        for model, stage in groups or [(m, "") for m in t.models or ("",)]:
            group = groups.get((model, stage), [])
            cands = [r for r in group if r["provider"] in mine]
            row = min([r for r in cands if _ok(r)], key=lambda r: r["ms"], default=cands[0] if cands else None)
            value = row.get(t.metric) if _ok(row) else None
            if t.metric == "peak_ratio" and _ok(row):
                eager = next((r for r in group if r["provider"] == "eager" and _ok(r)), {})
                value = row["peak_mib"] / eager["peak_mib"] if row.get("peak_mib") and eager.get("peak_mib") else None
            lower = t.metric in LOWER_IS_BETTER
            ratio = None if not value else t.threshold / value if lower else value / t.threshold
            status = "not measured" if ratio is None else "met" if ratio >= 1 else "missed"
            if ("model" if t.section == "step" else t.section) in failed:
                status = "invalid (correctness check failed)"
            entry = {"target": t.describe(), "section": t.section, "metric": t.metric, "model": model, "case": stage}
            entry |= {"provider": row and row["provider"], "threshold": t.threshold, "value": value}
            entry |= {"margin": None if ratio is None else ratio - 1, "status": status}
            out.append(entry | ({"status": f"dry run: {status}"} if dry_run else {}))
    return out


# ----------------------------------------------------------------------------------------------------- running


class Run:
    """The run's rows, each fail-soft and refused after the deadline; the JSON is rewritten after every one."""

    def __init__(self, args: argparse.Namespace, device, models: list):
        from benches import harness

        self.h, self.args, self.device, self.models = harness, args, device, models
        self.env, self.start = harness.environment(device), time.monotonic()
        self.ceilings, self.checks, self.rows = {}, [], []

    def guarded(self, row: dict, fn, always: bool = False) -> dict:
        now = time.monotonic()
        if now >= self.start + self.args.budget_s and not always:
            return row | {"status": "skipped", "reason": f"time budget: {self.args.budget_s:g} s spent"}
        try:
            row.update(fn())
            row.setdefault("status", "ok")
        except self.h.Unavailable as e:
            row.update(status="unavailable", reason=str(e))
        except Exception as e:  # fail-soft: any failure is this row's error
            first = (str(e).strip().splitlines() or [""])[0]
            row.update(status="error", reason=f"{type(e).__name__}: {first}", traceback=traceback.format_exc(limit=6))
        row["wall_s"] = round(time.monotonic() - now, 2)
        self.save()
        return row

    def check(self, op: str, shape, stage: str = "", norm_pix: bool | None = None) -> None:
        """``op``'s kernel against the eager op (``norm_pix``: the loss's flag); ``op="model"``: the whole model."""
        h, dtype = self.h, self.h.bench_dtype(self.device)
        entry = {"op": op, "model": shape.name, "case": stage, "dtype": str(dtype).removeprefix("torch.")}
        if op == "model":
            entry.update(case=f"batch {shape.batch}, kernels: {', '.join(h.kernels_in_use()) or 'none'}")
            entry.update(dtype="bf16 autocast" if self.device.type == "cuda" else "float32")

        def run():
            if op == "model":
                result = h.check_model(shape, self.device)
            else:
                fn, case = h.kernel(op, self.device), h.make_case(op, shape, self.device, dtype, stage)
                if norm_pix is not None:
                    case.args = (*case.args[:4], norm_pix)
                entry["case"] = case.label + ("" if norm_pix is None else f" norm_pix_loss={norm_pix}")
                result = h.check_op(op, case, fn, dtype)
            return {"tensors": result["tensors"], "status": "ok" if result["ok"] else "FAIL"}

        self.checks.append(self.guarded(entry, run))

    def measure(self, section: str, shape, stage: str, mode: str, provider: str, labels: dict) -> None:
        """One row; ``labels`` keeps each shape's label for the rows that do not run."""
        row = {"section": section, "model": shape.name, "stage": stage, "mode": mode, "provider": provider}
        row["case"] = labels.get(stage, stage)

        def run():
            b = None
            try:
                b = self.h.make_bench(section, shape, stage, mode, provider, self.device)
                row["case"] = labels[stage] = b.label
                return self.h.measure(b, self.device, self.ceilings)
            finally:
                del b
                self.h.release(section, provider, self.device)

        self.rows.append(self.guarded(row, run))

    def data(self, shape) -> None:
        """The input path's rows (benches/harness_data.py), against ``shape``'s training step of this run."""
        from benches import harness_data as hd

        dry, size = self.args.dry_run, shape.cfg.img_size
        count, batch = (16, 8) if dry else (256, hd.GPU_BATCH)
        rows = []
        for mode, fn in (
            ("cpu worker", lambda: hd.worker_row("cpu", size, count, rounds=1 if dry else 3)),
            ("gpu worker", lambda: hd.worker_row("gpu", size, count, rounds=1 if dry else 3)),
            ("decode+crop", lambda: hd.decode_crop_row(size, self.device, batch)),
        ):
            provider = mode.split()[0] if "worker" in mode else "gpu"
            row = {"section": "data", "model": shape.name, "stage": "", "mode": mode, "provider": provider}
            rows.append(self.guarded(row, fn))
        steps = [r for r in self.rows if (r["section"], r["model"]) == ("step", shape.name) and _ok(r)]
        steps = [r for r in steps if r["provider"].startswith("triton")] or steps
        step = min(steps, key=lambda r: r["ms"], default=None)
        base = {"section": "data", "model": shape.name, "stage": "", "status": "ok"}
        self.rows += rows + [base | r for r in hd.loader_rows(rows, step, hd.workers_available(), batch)]
        self.save()

    def report(self) -> dict:
        add_speedups(self.rows)
        return {
            "dry_run": self.args.dry_run,
            "env": self.env,
            "models": {m.name: m.describe() for m in self.models},
            "kernels": {op: self.h.kernel_module(op) for op in self.h.OPS},
            "ceilings": self.ceilings,
            "checks": self.checks,
            "results": self.rows,
            "targets": evaluate_targets(self.rows, self.checks, self.args.dry_run),
            "budget_s": self.args.budget_s if math.isfinite(self.args.budget_s) else None,
            "total_s": round(time.monotonic() - self.start, 1),
        }

    def save(self) -> dict:
        report = _finite(self.report())
        Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.json).write_text(json.dumps(report, indent=1))
        return report


def _finite(x):
    """Non-finite floats become None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return [_finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def append_results(path: Path, report: dict) -> None:
    """Append the run's ceilings, checks and rows to the results CSV, one line each, with the environment."""
    c = report["ceilings"]
    lines = [{"section": "ceilings", "provider": "copy", "gbps": c.get("copy_gbps"), "status": c.get("status")}]
    lines += [
        {"section": "ceilings", "provider": "matmul", "tflops": c.get("matmul_tflops"), "status": c.get("status")}
    ]
    lines += [{"section": "check", "model": ch["model"], "case": f"{ch['op']} {ch['case']}", "status": ch["status"]}
              for ch in report["checks"]]  # fmt: skip
    exists = path.exists() and path.stat().st_size > 0
    with path.open("a+", newline="") as f:  # writes go to the end; a header already there names the columns
        f.seek(0)
        writer = csv.DictWriter(f, next(csv.reader(f)) if exists else [*ENV_KEYS, *ROW_KEYS], extrasaction="ignore")
        if not exists:
            writer.writeheader()
        for line in lines + report["results"]:
            line = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in (report["env"] | line).items()}
            writer.writerow(line)


# ---------------------------------------------------------------------------------------------------- markdown


def _cell(key: str, row: dict) -> str:
    v = row.get(key)
    if key == "status" and row.get("reason"):
        text = f"{v}: {row['reason']}".replace("\n", " ").replace("|", "/")
        return text if len(text) <= 90 else text[:89] + "…"
    if v is None:
        return ""
    ratios = ("speedup", "peak", "loader_over_step")
    if key.startswith("speedup") or key == "loader_over_step" or key == "value" and row["metric"].startswith(ratios):
        return f"{v:.2f}×"
    if key.startswith("pct") or key in ("mfu", "value", "margin", "worker_share", "step_share"):
        return f"{100 * v:+.0f}%" if key == "margin" else f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.0f}" if key in ("gbps", "images_per_s") or key.endswith("mib") else f"{v:.3g}"
    return ", ".join(v) if isinstance(v, list) else str(v)


def _table(columns: str, rows: list[dict]) -> list[str]:
    """``columns``: ``header=key`` pairs (the key is the header when the same), comma-separated."""
    cols = [(c.split("=") * 2)[:2] for c in columns.split(", ")]
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    return out + ["| " + " | ".join(_cell(k, r) for _, k in cols) + " |" for r in rows]


def markdown(report: dict) -> str:
    """The report as markdown: environment, ceilings, checks, per-op and step tables, targets last."""
    out = ["## fastmae benchmark report", ""]
    if report["dry_run"]:
        out += ["**DRY RUN: tiny sizes; the numbers below measure nothing and must not be quoted.**", ""]
    out += _table(", ".join(ENV_KEYS), [report["env"]]) + [""]
    c = report["ceilings"]
    if c.get("copy_gbps"):
        ceil = f"copy {c['copy_gbps']:.0f} GB/s, {c['copy_desc']}; matmul {c['matmul_tflops']:.1f} TFLOP/s, "
        out.append(f"Ceilings: {ceil}{c['matmul_desc']}.")
    else:
        out.append(f"Ceilings: not measured ({c.get('reason', 'not asked for')}).")
    out += ["", "### Correctness (tolerance rule of tests/tolerance.py)", ""]
    worst = [
        ch
        | max(ch.get("tensors") or [{}], key=lambda t: (not t.get("ok", True), (t.get("err") or 0) / t.get("bound", 1)))
        for ch in report["checks"]
    ]
    out += _table("op, model, case, dtype, worst tensor=tensor, max err=err, bound, result=status", worst)
    step = "model, provider, ms, img/s=images_per_s, TFLOP/s=tflops, MFU=mfu, × eager=speedup_vs_eager"
    step += ", × compile=speedup_vs_compile, peak MiB=peak_mib, kernels, status"
    op = "model, case, mode, provider, ms, TFLOP/s=tflops, GB/s=gbps, % ceiling=pct_ceiling, × eager=speedup_vs_eager"
    op += ", × compile=speedup_vs_compile{}, peak extra MiB=peak_extra_mib, status"
    for section in (*OP_SECTIONS, "step"):
        if rows := [r for r in report["results"] if r["section"] == section]:
            cols = (
                step
                if section == "step"
                else op.format(", × best SDPA=speedup_vs_best_sdpa" * (section == "attention"))
            )
            out += ["", f"### {section}", ""] + _table(cols, rows)
    if rows := [r for r in report["results"] if r["section"] == "data"]:
        cols = "mode, provider, case, ms, img/s=images_per_s, worker share=worker_share, decode ms=decode_ms"
        cols += ", kernel ms=kernel_ms, loader ÷ step=loader_over_step, share of step=step_share, status"
        out += ["", "### data (the input path; ms: per image for a worker, per batch for decode+crop and loader)", ""]
        out += _table(cols, rows)
    out += ["", "### Targets (H100, bf16, same run)", ""]
    out += _table("target, model, case, fastmae provider=provider, value, margin, result=status", report["targets"])
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU: Triton interpreter, fp32)")
    p.add_argument("--json", default="runs/bench-report.json", help="where to write the JSON report")
    p.add_argument("--markdown", default=None, help="also write the markdown to this file")
    p.add_argument("--results", default=None, help=f"the CSV to append rows to (default {RESULTS.name}; dry run none)")
    p.add_argument("--models", default=None, help="comma-separated subset of vit_b16,vit_l16,vit_h14")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=None, help="deadline in s (default 300; dry run or inf: none)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    args = p.parse_args(argv)
    args.budget_s = args.budget_s if args.budget_s is not None else math.inf if args.dry_run else 300.0
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.dry_run:
        print("the full report needs a CUDA GPU; on the CPU run it with --dry-run", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    torch.backends.cudnn.benchmark = True  # as the original MAE pretraining script sets it (eager conv)
    from benches import harness

    pool = harness.TINY_MODELS if args.dry_run else harness.GPU_MODELS
    names = args.models.split(",") if args.models and not args.dry_run else list(pool)
    sections = [s for s in args.sections.split(",") if s]
    if set(names) - set(pool) or set(sections) - set(SECTIONS):
        print(f"--models must be among {list(pool)} and --sections among {list(SECTIONS)}", file=sys.stderr)
        return 2
    run = Run(args, device, [pool[n] for n in names])
    if "ceilings" in sections:  # measured whatever the budget: every rate is a fraction of them
        run.ceilings = run.guarded({}, lambda: harness.measure_ceilings(device, args.dry_run), always=True)
    for op, spec in harness.OPS.items() if "checks" in sections else ():
        for shape in run.models:
            for stage in spec.stages:
                for norm_pix in (True, False) if op == "masked_mse" else (None,):  # the loss's both forms
                    run.check(op, shape, stage, norm_pix)
    if "checks" in sections:
        run.check("model", dataclasses.replace(run.models[0], batch=min(run.models[0].batch, MODEL_CHECK_BATCH)))
    for i, shape in enumerate(run.models):  # model by model: a deadline cuts the largest last
        if i == 1 and "data" in sections:  # the input path against the first model's step
            run.data(run.models[0])
        for section in [s for s in ("step", *OP_SECTIONS) if s in sections]:
            spec = harness.OPS.get(section)
            stages, providers = (spec.stages, spec.providers) if spec else (("",), harness.STEP_PROVIDERS)
            labels: dict[str, str] = {}
            for stage in stages:
                for provider in sorted(providers, key=lambda p: "compile" in p or "overhead" in p):  # compiles last
                    for mode in ("step",) if section == "step" else ("fwd+bwd", "fwd"):
                        run.measure(section, shape, stage, mode, provider, labels)
    if len(run.models) == 1 and "data" in sections:
        run.data(run.models[0])
    report = run.save()
    md = markdown(report)
    if args.markdown:
        Path(args.markdown).write_text(md)
    results = Path(args.results) if args.results else None if args.dry_run else RESULTS
    if results:
        append_results(results, report)
    print(f"[{report['total_s']:.1f} s] JSON written to {args.json}" + (f", rows to {results}" if results else ""))
    print("\n" + md, flush=True)
    return 1 if any(c.get("status") == "FAIL" for c in run.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
