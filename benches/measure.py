"""Timing, the card's measured ceilings, peak memory, time guards and the environment record.

On CUDA every time is ``triton.testing.do_bench``'s median (CUDA events, after its warm-up, L2 flushed between
repetitions). On the CPU (the dry run only) a time is one plain call: it shows that the code runs, not how fast
anything is.
"""

from __future__ import annotations

import contextlib
import datetime
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

GIB = 1024**3
MIB = 1024**2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """The median time of ``fn`` in milliseconds (the caller warms ``fn`` up first: compilation, autotuning)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, float] | None:
    """Run ``fn`` once; its peak allocated memory in MiB, in total and above what was allocated before it."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / MIB, "peak_extra_mib": (peak - before) / MIB}


def measure_ceilings(device: torch.device, dry_run: bool = False) -> dict[str, float | str]:
    """The card's copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s), measured.

    CUDA: a 1 GiB device-to-device copy and an 8192³ bf16 matmul on random data (``dry_run``: 64 MiB, 2048³).
    CPU: a 16 MiB copy and a 256³ fp32 matmul, only so that the dry run exercises the same code.
    """
    if device.type == "cuda":
        copy_bytes, n, dtype = (64 * MIB, 2048, torch.bfloat16) if dry_run else (GIB, 8192, torch.bfloat16)
    else:
        copy_bytes, n, dtype = 16 * MIB, 256, torch.float32
    src = torch.rand(copy_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, warmup_ms=50, rep_ms=200)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # library and handle set-up outside the timing
    mm_ms = time_ms(lambda: a @ b, device, warmup_ms=50, rep_ms=200)
    return {
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "matmul_tflops": 2.0 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_desc": f"{'device-to-device' if device.type == 'cuda' else 'host'} copy of {copy_bytes / MIB:.0f} MiB "
        "(read + write counted)",
        "matmul_desc": f"{n}×{n}×{n} {str(dtype).removeprefix('torch.')} matmul on random data",
    }


def rates(
    ms: float, flops: float | None, nbytes: float | None, ceilings: dict | None, bound: str
) -> dict[str, float | None]:
    """TFLOP/s and GB/s from a time, with fractions of the measured ceilings.

    ``bound`` names the ceiling the op is judged by, "matmul" or "copy"; ``pct_roofline`` is the roofline time
    (the larger of FLOPs over the matmul rate and bytes over the copy bandwidth) over the measured time.
    """
    sec = ms * 1e-3
    tflops = flops / sec / 1e12 if flops else None
    gbps = nbytes / sec / 1e9 if nbytes else None
    out: dict[str, float | None] = {"tflops": tflops, "gbps": gbps, "pct_matmul": None, "pct_copy": None}
    if ceilings:
        if tflops is not None:
            out["pct_matmul"] = tflops / ceilings["matmul_tflops"]
        if gbps is not None:
            out["pct_copy"] = gbps / ceilings["copy_gbps"]
        floor = max(
            (flops or 0) / (ceilings["matmul_tflops"] * 1e12),
            (nbytes or 0) / (ceilings["copy_gbps"] * 1e9),
        )
        out["pct_roofline"] = floor / sec if floor else None
    out["pct_ceiling"] = out["pct_matmul"] if bound == "matmul" else out["pct_copy"]
    return out


class MeasurementTimeout(Exception):
    """Raised inside a measurement that ran past its hard time limit."""


@contextlib.contextmanager
def hard_timeout(seconds: float) -> Iterator[None]:
    """Raise :class:`MeasurementTimeout` in the block after ``seconds`` (SIGALRM; main thread on POSIX only)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or seconds <= 0:
        yield
        return

    def _raise(signum, frame):
        raise MeasurementTimeout(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on: card, date, torch, triton, CUDA and driver versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "card": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "fastmae_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            card=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / GIB, 1),
        )
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            env["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
        except OSError:
            env["driver"] = None
    return env


def run_benchmark(
    benchmark,
    run: Callable[[], object],
    device: torch.device,
    *,
    group: str,
    ceilings: dict | None,
    flops: float | None = None,
    nbytes: float | None = None,
    bound: str = "matmul",
    warmup_calls: int = 2,
) -> float:
    """Time ``run`` with pytest-benchmark and record rates, ceiling fractions and peak memory in ``extra_info``.

    Each timed call ends with a device synchronization, so a round is the call's full GPU time (plus the launch
    and synchronization overhead, a few microseconds). Warm-up calls (compilation, autotuning) run first, outside
    the timing. With ``--benchmark-disable`` the body runs once and the rates come from that single call.

    Returns:
        The median time in seconds (the single call's time when benchmarking is disabled).
    """
    benchmark.group = group
    if benchmark.enabled:
        for _ in range(warmup_calls):
            run()
        sync(device)

    def timed():
        out = run()
        sync(device)
        return out

    t0 = time.perf_counter()
    benchmark(timed)
    seconds = benchmark.stats.stats.median if benchmark.stats is not None else time.perf_counter() - t0
    info = rates(seconds * 1e3, flops, nbytes, ceilings, bound)
    info["timing"] = "median of synchronized calls" if benchmark.stats is not None else "one call (benchmark disabled)"
    info.update(peak_memory(timed, device) or {})
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})
    return seconds
