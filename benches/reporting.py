"""The report's arithmetic on measured rows: speedups, the targets (met or missed, by how much), markdown, JSON.

Pure functions over plain dicts, so that they are tested on the CPU without any timing.
"""

from __future__ import annotations

import math

from . import common

FASTMAE_STEP_PROVIDERS = ("triton", "triton+compile")


def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("ms") is not None


def add_speedups(rows: list[dict]) -> None:
    """Fill ``speedup_vs_eager``, ``speedup_vs_compile`` (and for attention ``speedup_vs_best_sdpa``) in place.

    Rows compare within one (section, model, case, mode): the same op at the same shape.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["section"], r["model"], r.get("case"), r["mode"]), []).append(r)
    for group in groups.values():
        by_provider = {r["provider"]: r for r in group if _ok(r)}
        sdpa = [r for p, r in by_provider.items() if p.startswith("sdpa_")]
        best_sdpa = min(sdpa, key=lambda r: r["ms"]) if sdpa else None
        for r in group:
            for key, base in (("eager", by_provider.get("eager")), ("compile", by_provider.get("compile"))):
                r[f"speedup_vs_{key}"] = base["ms"] / r["ms"] if base and _ok(r) else None
            if r["section"] == "attention":
                r["best_sdpa"] = best_sdpa["provider"] if best_sdpa else None
                r["speedup_vs_best_sdpa"] = best_sdpa["ms"] / r["ms"] if best_sdpa and _ok(r) else None


def fastmae_row(group: list[dict], section: str) -> dict | None:
    """fastmae's row in a group: the Triton kernel; for the step the faster of triton and triton+compile."""
    names = FASTMAE_STEP_PROVIDERS if section == "step" else ("triton",)
    ok = [r for r in group if r["provider"] in names and _ok(r)]
    if ok:
        return min(ok, key=lambda r: r["ms"])
    rows = [r for r in group if r["provider"] in names]
    return rows[0] if rows else None


def _metric(target: common.Target, row: dict, group: list[dict]) -> float | None:
    if target.metric == "peak_ratio":
        eager = next((r for r in group if r["provider"] == "eager" and _ok(r)), None)
        if eager and row.get("peak_mib") and eager.get("peak_mib"):
            return row["peak_mib"] / eager["peak_mib"]
        return None
    return row.get(target.metric)


def evaluate_targets(rows: list[dict], checks: list[dict], dry_run: bool) -> list[dict]:
    """One entry per target and measured shape: value, threshold, met/missed and the margin.

    A dry run's tiny model stands in for every model, so that each target's arithmetic runs; its verdicts are
    labelled as dry-run ones.
    """
    failed_ops = {c["op"] for c in checks if c.get("status") == "FAIL"}
    out = []
    for t in common.TARGETS:
        models = () if dry_run else t.models
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["section"] == t.section and r["mode"] == t.mode and (not models or r["model"] in models):
                groups.setdefault((r["model"], r.get("case")), []).append(r)
        if not groups and models:
            groups = {(m, None): [] for m in models}
        for (model, case), group in groups.items():
            row = fastmae_row(group, t.section)
            value = _metric(t, row, group) if row and _ok(row) else None
            entry = {
                "target": t.describe(),
                "section": t.section,
                "metric": t.metric,
                "model": model,
                "case": case,
                "provider": row["provider"] if row else None,
                "threshold": t.threshold,
                "value": value,
            }
            if value is None:
                entry.update(status="not measured", margin=None)
            else:
                met = value >= t.threshold if t.higher_is_better else value <= t.threshold
                ratio = value / t.threshold if t.higher_is_better else t.threshold / value
                entry.update(status="met" if met else "missed", margin=ratio - 1.0)
            check_op = "model" if t.section == "step" else t.section
            if check_op in failed_ops:
                entry["status"] = "invalid (correctness check failed)"
            if dry_run:
                entry["status"] = f"dry run: {entry['status']}"
            out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------------ format


def _num(x, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x, fmt)


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _times(x) -> str:
    return "" if x is None else f"{x:.2f}×"


def _status(row: dict, width: int = 90) -> str:
    if row.get("status") == "ok":
        return "ok"
    text = f"{row.get('status')}: {row.get('reason') or ''}".replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _index(seq, item) -> int:
    return list(seq).index(item) if item in seq else len(seq)


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def markdown(report: dict) -> str:
    """The whole report as markdown; the targets table comes last."""
    env, ceil = report["env"], report.get("ceilings") or {}
    out = ["## fastmae benchmark report", ""]
    if report.get("dry_run"):
        out += ["**DRY RUN: tiny sizes; the numbers below measure nothing and must not be quoted.**", ""]
    keys = ("card", "date", "torch", "triton", "cuda", "driver", "fastmae_commit")
    out += _table(list(keys), [[str(env.get(k, "")) for k in keys]]) + [""]
    if ceil.get("copy_gbps"):
        out.append(
            f"Ceilings: copy {ceil['copy_gbps']:.0f} GB/s, {ceil['copy_desc']}; "
            f"matmul {ceil['matmul_tflops']:.1f} TFLOP/s, {ceil['matmul_desc']}."
        )
    else:
        out.append(f"Ceilings: not measured ({ceil.get('reason', 'section skipped')}).")
    out += ["", "### Correctness (tolerance rule of tests/tolerance.py)", ""]
    lines = []
    for c in report["checks"]:
        worst = max(c.get("tensors") or [{}], key=lambda t: (t.get("err") or 0) / (t.get("bound") or 1))
        lines.append(
            [
                c["op"],
                c.get("model", ""),
                c.get("case", ""),
                c.get("dtype", ""),
                worst.get("tensor", ""),
                _num(worst.get("err")),
                _num(worst.get("bound")),
                c["status"] + (f": {c['reason']}" if c.get("reason") else ""),
            ]
        )
    out += _table(["op", "model", "case", "dtype", "worst tensor", "max err", "bound", "result"], lines)
    model_order = list(report.get("models") or [])
    for section in (*common.OPS, "step"):
        rows = [r for r in report["results"] if r["section"] == section]
        if section == "step":  # run in priority order, shown by model
            rows.sort(key=lambda r: (_index(model_order, r["model"]), _index(common.STEP_PROVIDERS, r["provider"])))
        if not rows:
            continue
        out += ["", f"### {section}", ""]
        if section == "step":
            header = [
                "model",
                "provider",
                "ms",
                "img/s",
                "TFLOP/s",
                "MFU",
                "× eager",
                "× compile",
                "peak MiB",
                "kernels",
                "status",
            ]
            lines = [
                [
                    r["model"],
                    r["provider"],
                    _num(r.get("ms")),
                    _num(r.get("images_per_s"), ".0f"),
                    _num(r.get("tflops")),
                    _pct(r.get("mfu")),
                    _times(r.get("speedup_vs_eager")),
                    _times(r.get("speedup_vs_compile")),
                    _num(r.get("peak_mib"), ".0f"),
                    ", ".join(r.get("kernels") or []),
                    _status(r),
                ]
                for r in rows
            ]
        else:
            header = (
                ["model", "case", "mode", "provider", "ms", "TFLOP/s", "GB/s", "% ceiling", "× eager", "× compile"]
                + (["× best SDPA"] if section == "attention" else [])
                + ["peak extra MiB", "status"]
            )
            lines = []
            for r in rows:
                cells = [
                    r["model"],
                    r.get("case") or "",
                    r["mode"],
                    r["provider"],
                    _num(r.get("ms")),
                    _num(r.get("tflops")),
                    _num(r.get("gbps"), ".0f"),
                    _pct(r.get("pct_ceiling")),
                    _times(r.get("speedup_vs_eager")),
                    _times(r.get("speedup_vs_compile")),
                ]
                if section == "attention":
                    cells.append(_times(r.get("speedup_vs_best_sdpa")))
                lines.append(cells + [_num(r.get("peak_extra_mib"), ".0f"), _status(r)])
        out += _table(header, lines)
    out += ["", "### Targets (H100, bf16, same run)", ""]
    lines = []
    for t in report["targets"]:
        value = t["value"]
        shown = _pct(value) if t["metric"] in ("pct_copy", "mfu") else _times(value)
        margin = "" if t["margin"] is None else f"{100 * t['margin']:+.0f}%"
        lines.append(
            [t["target"], t["model"], t.get("case") or "", t.get("provider") or "", shown, margin, t["status"]]
        )
    out += _table(["target", "model", "case", "fastmae provider", "value", "margin", "result"], lines)
    return "\n".join(out) + "\n"


def clean_json(x):
    """Non-finite floats become None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    return x
