"""On a GPU: the GPU's own compile of every kernel of an MAE step, next to the static figures of the same kernels.

``python benches/static_gpu.py --json OUT.json`` (ViT-B/16, batch 256, bf16 model and bf16 autocast):

1. runs every launch of :func:`tests.mae_launches.run_mae` for real on CUDA inside
   :func:`tests.compile_harness.observe_launches` (autotuners benchmark, so every config compiles) and reads each
   compiled kernel's ``n_regs``, ``n_spills`` (Triton's count of 4-byte local-memory words per thread, i.e. the
   stack frame / 4) and shared memory;
2. captures the same launches on CPU tensors and compiles them offline with this machine's Triton (the static
   harness, cached): its prediction of the same figures, matched by compiled-kernel key (specialization,
   options, source), so a launch the harness specializes differently from the runtime shows as unmatched;
3. adds the committed ``benches/STATIC.md`` figures of the same row (possibly from another Triton version).

Exit status 1 when a GPU-compiled kernel has no static counterpart or disagrees with it (registers, stack, shared
memory). ``--dry-run`` skips step 1 (no GPU needed) to exercise the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import mae_launches  # noqa: E402


def committed_rows(path: Path) -> list[dict]:
    """The rows of the committed table: kernel, used in, w/s, grid, regs, spill st/ld, smem B."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not cells[5].isdigit():
            continue
        stores, loads = cells[6].split("/")
        rows.append(
            {
                "kernel": cells[0],
                "used_in": cells[1].split(" "),
                "ws": cells[2],
                "grid": cells[4],
                "regs": int(cells[5]),
                "spill_stores": int(stores),
                "spill_loads": int(loads),
                "shared": int(cells[7]),
            }
        )
    return rows


def find_committed(rows: list[dict], launch) -> dict | None:
    """The committed row of ``launch``: same op.kernel, w/s and grid, used in its model, mode (sequence, variant)."""
    ws = f"{launch.options['num_warps']}/{launch.options['num_stages']}"
    grid = "x".join(map(str, launch.grid))
    for row in rows:
        models, modes = row["used_in"][0].split("+"), row["used_in"][1].split("+") if len(row["used_in"]) > 1 else []
        ops = row["kernel"].split(".")[0].split("+")
        if (
            row["kernel"].split(".", 1)[1] == launch.kernel.lstrip("_")
            and launch.tags.get("op") in ops
            and (row["ws"], row["grid"]) == (ws, grid)
            and launch.tags.get("model") in models
            and launch.tags.get("mode") in modes
            and all(not launch.tags.get(k) or launch.tags[k] in row["used_in"] for k in ("seq", "variant"))
        ):
            return row
    return None


def gpu_launches(models: list[str]) -> list[tuple]:
    """(launch, GPU figures) of every kernel compiled while the MAE launches run for real on this GPU."""
    import torch

    from tests.compile_harness import observe_launches

    with observe_launches() as rec:
        mae_launches.run_mae(rec, models, device="cuda")
    torch.cuda.synchronize()
    out = []
    for launch, kernel in zip(rec.launches, rec.kernels):
        kernel._init_handles()  # loads the binary if no launch did: n_regs / n_spills come from the driver
        out.append((launch, {"n_regs": kernel.n_regs, "n_spills": kernel.n_spills, "shared": kernel.metadata.shared}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="runs/static-gpu.json", help="where to write the comparison")
    p.add_argument("--models", default="vit_b16", help=f"comma-separated subset of {','.join(mae_launches.MODELS)}")
    p.add_argument("--table", default=str(ROOT / "benches" / "STATIC.md"), help="the committed static table")
    p.add_argument("--dry-run", action="store_true", help="no GPU: static figures only")
    args = p.parse_args(argv)
    models = args.models.split(",")
    start = time.perf_counter()
    results = mae_launches.collect(models)
    static = {ln.key(): (ln, fig) for ln, fig in results}
    static_s = time.perf_counter() - start
    observed = [] if args.dry_run else gpu_launches(models)
    committed = committed_rows(Path(args.table))
    names = {ln.key(): name for name, members in mae_launches.group(results).items() for ln, _ in members}
    rows, bad = [], []
    for launch, fig in observed or [(ln, None) for ln, _ in static.values()]:
        pred = static.get(launch.key())
        row = {
            "kernel": names.get(launch.key(), f"{launch.tags.get('op')}.{launch.kernel} (no static counterpart)"),
            "tags": launch.tags,
            "num_warps": launch.options["num_warps"],
            "num_stages": launch.options["num_stages"],
            "grid": launch.grid,
            "gpu": fig,
            "static": None,
            "committed": find_committed(committed, launch),
        }
        if pred is not None and "error" not in pred[1]:
            s = pred[1]
            row["static"] = {k: s[k] for k in ("regs", "spill_stores", "spill_loads", "stack", "shared")}
        if fig is not None:
            s = row["static"]
            row["match"] = s is not None and (fig["n_regs"], fig["n_spills"], fig["shared"]) == (
                s["regs"],
                s["stack"] // 4,
                s["shared"],
            )
            if not row["match"]:
                bad.append(row["kernel"])
        rows.append(row)
    toolchain = next(iter(static.values()))[0].toolchain if static else ""
    report = {"toolchain": toolchain, "dry_run": args.dry_run, "static_s": round(static_s, 1), "rows": rows}
    if not args.dry_run:
        import torch

        report["device"] = torch.cuda.get_device_name()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"{'kernel':72s} {'gpu regs/words/smem':>20s} {'static':>20s} {'committed':>20s}")
    for r in rows:
        g, s, c = r["gpu"], r["static"], r["committed"]
        gs = f"{g['n_regs']}/{g['n_spills']}/{g['shared']}" if g else "-"
        ss = f"{s['regs']}/{s['stack'] // 4}/{s['shared']}" if s else "-"
        cs = f"{c['regs']}/{c['spill_stores']}B/{c['shared']}" if c else "-"
        print(f"{r['kernel']:72s} {gs:>20s} {ss:>20s} {cs:>20s}")
    print(f"{len(rows)} kernels, {len(bad)} GPU compiles differing from the static prediction: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
