"""Compile Triton kernels for sm_80 and sm_90 on a machine without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole NVIDIA pipeline (TTIR, TTGIR,
LLIR, PTX, cubin via ptxas) without a device, which catches what the interpreter lets through: layout and type
errors, shared memory over the architecture's limit, unsupported ops. Kernels imported under
``TRITON_INTERPRET=1`` cannot be compiled, so the compilation runs in a subprocess without that variable.

Usage in a kernel's test file, one line per kernel and config::

    SPECS = [
        KernelSpec("fastmae.kernels.attention", "_attn_fwd", {"Q": "*fp16", "N": "i32", "BLOCK": "constexpr"},
                   {"BLOCK": 64}, num_warps=4),
        *autotune_specs("fastmae.kernels.attention", "_attn_bwd", signature, constexprs),
    ]

    def test_compiles():
        assert_compiles(SPECS)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

ARCHS = (80, 90)
# Shared memory per block, opt-in maximum (bytes).
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one configuration.

    Args:
        module: import path of the kernel's module, e.g. ``"fastmae.kernels.attention"``.
        kernel: attribute name of the ``@triton.jit`` function (autotune/heuristics wrappers are unwrapped).
        signature: every argument's Triton type: ``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*i64"``, ``"i32"``,
            ``"fp32"``, or ``"constexpr"`` for compile-time arguments.
        constexprs: values of the ``"constexpr"`` arguments.
        num_warps, num_stages: launch options.
        label: a short name for messages.
        aligned: arguments assumed divisible by 16 (pointers: 16-byte aligned), as Triton's launcher specializes
            them at run time, which turns on vectorized loads and pipelining (and so more shared memory). None
            means every pointer argument, which is what freshly allocated tensors give.
    """

    module: str
    kernel: str
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    aligned: tuple[str, ...] | None = None

    def name(self) -> str:
        cfg = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return self.label or f"{self.kernel}[{cfg},w{self.num_warps},s{self.num_stages}]"


def autotune_specs(module: str, kernel: str, signature: dict, constexprs: dict | None = None) -> list[KernelSpec]:
    """One :class:`KernelSpec` per config of the ``@triton.autotune`` kernel ``module.kernel``.

    ``constexprs`` holds the compile-time arguments not set by the configs (dtypes, head dim, ...).
    """
    tuner = getattr(importlib.import_module(module), kernel)
    if not hasattr(tuner, "configs"):
        raise TypeError(f"{module}.{kernel} is not an autotuned kernel")
    specs = []
    for cfg in tuner.configs:
        specs.append(
            KernelSpec(
                module,
                kernel,
                signature,
                {**(constexprs or {}), **cfg.kwargs},
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
        )
    return specs


_WORKER = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

specs, archs = json.loads(sys.stdin.read())
out = []
for spec in specs:
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    aligned = spec["aligned"]
    if aligned is None:
        aligned = [k for k, t in spec["signature"].items() if t.startswith("*")]
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    for arch in archs:
        res = {"name": spec["name"], "arch": arch, "ok": False}
        try:
            src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
            opts = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
            ptx = k.asm["ptx"]
            res.update(ok=True, shared=int(k.metadata.shared), cubin_bytes=len(k.asm["cubin"]),
                       mma="mma." in ptx, wgmma="wgmma." in ptx)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"[-3000:]
        out.append(res)
print(json.dumps(out))
"""


def compile_specs(specs: list[KernelSpec], archs: tuple[int, ...] = ARCHS, timeout: float = 900) -> list[dict]:
    """Compile every spec for every arch in one subprocess (no ``TRITON_INTERPRET``); one result dict each.

    A result holds ``name``, ``arch``, ``ok`` and either ``error`` or ``shared`` (bytes), ``cubin_bytes``,
    ``mma`` and ``wgmma`` (whether the PTX uses tensor-core instructions).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = [{**dataclasses.asdict(s), "name": s.name()} for s in specs]
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER],
        input=json.dumps([payload, list(archs)]),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_compiles(specs: list[KernelSpec], archs: tuple[int, ...] = ARCHS) -> list[dict]:
    """Compile all specs for all archs; fail listing every kernel that does not compile or overflows shared memory."""
    results = compile_specs(specs, archs)
    bad = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in results if not r["ok"]]
    bad += [
        f"{r['name']} sm_{r['arch']}: {r['shared']} B shared > {SHARED_LIMIT[r['arch']]}"
        for r in results
        if r["ok"] and r["shared"] > SHARED_LIMIT[r["arch"]]
    ]
    assert not bad, "kernels that fail to compile:\n" + "\n".join(bad)
    return results
