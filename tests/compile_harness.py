"""Compile Triton kernels for sm_80 and sm_90 on a machine without a GPU, as the runtime would compile them.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the whole NVIDIA pipeline (TTIR, TTGIR,
LLIR, PTX, cubin via ptxas) without a device, which catches what the interpreter lets through: layout and type
errors, shared memory over the architecture's limit, unsupported ops. Kernels imported under
``TRITON_INTERPRET=1`` cannot be compiled, so the compilation runs in subprocesses without that variable.

What gets compiled must be what the launcher runs: Triton specializes every launch on its argument values (an
integer equal to 1 becomes a constant, integers divisible by 16 and 16-byte aligned pointers are marked so, which
turns on vector loads and pipelining), so hand-written signatures compile different code. Two ways in:

* **Captured launches** (:func:`capture_launches`, :func:`compile_launches`): the real launcher runs, with real
  shapes, on CPU tensors (``torch.empty``, untouched by any kernel, so batch 256 costs next to no memory), inside
  a context where Triton's own ``JITFunction.run`` executes unchanged except for two stand-ins: the driver reports
  an offline ``GPUTarget`` instead of asking a GPU, and ``_do_compile`` records instead of compiling. So the
  binder, the specialization (``native_specialize_impl`` / the backend's ``get_*_specialization``) and
  ``_pack_args`` are the installed Triton's, whatever its version does, and the recorded (signature, constexprs,
  attrs, options) are exactly what ``_do_compile`` would hand to ``triton.compile``. ``@triton.autotune`` kernels
  record one launch per config, as the autotuner would compile each one before benchmarking. Nothing about the
  kernels or their launchers (configs, argument values, specialization rules) is restated, so this cannot drift
  from them. CPU tensors are 64-byte aligned, CUDA's caching allocator 512-byte: both are 16-byte aligned, so
  pointer specialization matches; views keep their real offsets. Compiles run in parallel worker processes and
  are cached by (kernel source hash, specialization, options, Triton version) under ``$FASTMAE_STATIC_CACHE``
  (default ``~/.cache/fastmae/static``), with the PTX, the ``cuobjdump -sass`` listing and ptxas's ``-v`` log of
  each (see :mod:`tests.static_analysis`).
  On a GPU, :func:`observe_launches` records the same way while the launches really run and compile, with each
  ``CompiledKernel``, so the offline figures can be checked against the GPU's own.
* **KernelSpec** (:func:`compile_specs`, :func:`assert_compiles`): a hand-written signature with every integer an
  unspecialized ``i32`` (the generic case: no integer is 1 or a multiple of 16) and pointers assumed aligned.
  Good for "compiles at any shape" checks over dtypes and configs; not for resource figures at a given shape.

Captured launches, from a function run in a subprocess without ``TRITON_INTERPRET``::

    def my_launches():  # in an importable module
        with capture_launches(90) as rec:
            with rec.tagged(op="attention"):
                my_launcher(torch.empty(256, 65, 3840, dtype=torch.bfloat16), ...)
        return rec.launches

    launches = capture_in_subprocess("tests.my_module:my_launches")
    artifacts = compile_launches(launches)  # ptx, sass, ptxas_log, shared per launch

KernelSpecs in a kernel's test file, one line per kernel and config::

    SPECS = [
        KernelSpec("fastmae.kernels.attention", "_fwd_kernel", {"Q": "*fp16", "N": "i32", "BLOCK": "constexpr"},
                   {"BLOCK": 64}, num_warps=4),
        *autotune_specs("fastmae.kernels.attention", "_BWD_DQ", signature, constexprs),
    ]

    def test_compiles():
        assert_compiles(SPECS)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


# ---- launches captured from the real launchers ---------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
# Bump when the stored artifacts change shape.
CACHE_FORMAT = 1
_OFFLINE_DEVICE = "fastmae-offline"


@dataclass
class Launch:
    """One kernel launch as a launcher made it, specialized by Triton's runtime (JSON-serializable).

    ``signature``, ``constexprs`` and ``attrs`` are what ``JITFunction._do_compile`` receives (paths as lists);
    ``options`` the parsed backend options it passes to ``triton.compile``. ``tensors`` holds each tensor argument's
    dtype, shape, strides, element size and address mod 16; ``scalars`` the other non-constexpr values; ``tags`` the
    caller's labels (see :meth:`LaunchRecorder.tagged`).
    """

    module: str
    kernel: str
    arch: int
    grid: list[int]
    signature: dict[str, str]
    constexprs: list
    attrs: list
    options: dict
    source_key: str
    toolchain: str
    tensors: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)

    def key(self) -> str:
        """Cache key of the compiled code: kernel source hash, specialization, options, toolchain, arch."""
        what = [CACHE_FORMAT, self.toolchain, self.arch, self.module, self.kernel, self.source_key]
        what += [self.signature, self.constexprs, self.attrs, self.options]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def key_grid(self) -> tuple:
        """(compiled code, grid): two launches equal in this run the same work."""
        return self.key(), tuple(self.grid)

    def arg_names(self) -> list[str]:
        """The non-constexpr arguments in order: PTX parameter i is ``arg_names()[i]``."""
        return [name for name, ty in self.signature.items() if ty != "constexpr"]

    def divisible(self, name: str) -> bool:
        """Whether the launcher marked argument ``name`` divisible by 16 (pointers: 16-byte aligned)."""
        index = list(self.signature).index(name)
        return any(path == [index] and ["tt.divisibility", 16] in attr for path, attr in self.attrs)

    def constexpr_values(self) -> dict:
        """Constexpr arguments by name, including integers the launcher turned into constants (== 1)."""
        names = list(self.signature)
        return {names[path[0]]: value for path, value in self.constexprs if len(path) == 1}


def _jsonable(value):
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a launch value of type {type(value).__name__}: {value!r}")


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


class _OfflineDriver:
    """Stands in for the GPU driver while launches are captured: Triton's run() only asks it for the target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return _OFFLINE_DEVICE

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class LaunchRecorder:
    """The launches recorded inside :func:`capture_launches`, in launch order."""

    def __init__(self, arch: int, toolchain: str):
        self.arch, self.toolchain = arch, toolchain
        self.launches: list[Launch] = []
        self.kernels: list = []  # the CompiledKernel of each launch under observe_launches, else None
        self.functions: set = set()
        self._tags: dict = {}
        self._pending = None

    @contextlib.contextmanager
    def tagged(self, **tags) -> Iterator[None]:
        """Attach ``tags`` to every launch recorded inside the block (nested blocks add to them)."""
        prev = self._tags
        self._tags = {**prev, **tags}
        try:
            yield
        finally:
            self._tags = prev

    def drop(self, indices) -> None:
        """Forget the launches at ``indices``."""
        gone = set(indices)
        keep = [i for i in range(len(self.launches)) if i not in gone]
        self.launches = [self.launches[i] for i in keep]
        self.kernels = [self.kernels[i] for i in keep]

    def _record(self, fn, signature, constexprs, options, attrs, kernel=None) -> None:
        args, kwargs, grid = self._pending
        names = fn.arg_names
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        if callable(grid):
            grid = grid({**values, **kwargs})
        tensors, scalars = {}, {}
        for name, ty in signature.items():
            v = values.get(name)
            if ty == "constexpr":
                continue
            if hasattr(v, "data_ptr") and hasattr(v, "stride"):
                tensors[name] = {
                    "dtype": str(v.dtype).removeprefix("torch."),
                    "shape": list(v.shape),
                    "strides": list(v.stride()),
                    "itemsize": v.element_size(),
                    "ptr_mod16": v.data_ptr() % 16,
                }
            elif isinstance(v, (bool, int, float)):
                scalars[name] = v
        self.functions.add(fn)
        self.launches.append(
            Launch(
                module=fn.fn.__module__,
                kernel=fn.fn.__name__,
                arch=self.arch,
                grid=[int(g) for g in grid],
                signature=dict(signature),
                constexprs=[[list(p), _jsonable(v)] for p, v in constexprs.items()],
                attrs=[[list(p), _jsonable(a)] for p, a in attrs.items()],
                options=_jsonable(options.__dict__),
                source_key=fn.cache_key,
                toolchain=self.toolchain,
                tensors=tensors,
                scalars=scalars,
                tags=dict(self._tags),
            )
        )
        self.kernels.append(kernel)


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[LaunchRecorder]:
    """Record, instead of running, every Triton launch made inside the block (see the module docstring).

    Must run where the kernel modules were imported without ``TRITON_INTERPRET`` (e.g. in
    :func:`capture_in_subprocess`); kernels must not be read back from their outputs inside the block.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    rec = LaunchRecorder(arch, f"triton {triton.__version__}, ptxas {get_ptxas(arch).version}")
    orig_run, orig_compile, orig_tune = JITFunction.run, JITFunction._do_compile, Autotuner.run

    def run(fn, *args, grid, warmup, **kwargs):
        rec._pending = (args, dict(kwargs), grid)
        return orig_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

    def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
        rec._record(fn, signature, constexprs, options, attrs)
        return None  # run() returns before launching

    def tune(tuner, *args, **kwargs):
        for cfg in tuner.configs:  # every config the autotuner could pick gets compiled
            tuner.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})

    prev_driver = driver._active
    JITFunction.run, JITFunction._do_compile, Autotuner.run = run, do_compile, tune
    driver.set_active(_OfflineDriver(GPUTarget("cuda", arch, 32)))
    try:
        yield rec
    finally:
        JITFunction.run, JITFunction._do_compile, Autotuner.run = orig_run, orig_compile, orig_tune
        driver._active = prev_driver
        for fn in rec.functions:
            fn.device_caches.pop(_OFFLINE_DEVICE, None)


@contextlib.contextmanager
def observe_launches() -> Iterator[LaunchRecorder]:
    """On a GPU: run every launch inside the block for real (autotuners benchmark as usual) and record each kernel
    compiled meanwhile, as :func:`capture_launches` would, with its ``CompiledKernel`` in ``rec.kernels`` (whose
    ``n_regs`` / ``n_spills`` are the GPU's own figures). Kernels compiled before the block are not seen."""
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    arch = driver.active.get_current_target().arch
    rec = LaunchRecorder(arch, f"triton {triton.__version__}, ptxas {get_ptxas(arch).version}")
    orig_run, orig_compile = JITFunction.run, JITFunction._do_compile

    def run(fn, *args, grid, warmup, **kwargs):
        rec._pending = (args, dict(kwargs), grid)
        return orig_run(fn, *args, grid=grid, warmup=warmup, **kwargs)

    def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
        kernel = orig_compile(fn, key, signature, device, constexprs, options, attrs, warmup)
        rec._record(fn, signature, constexprs, options, attrs, kernel)
        return kernel

    JITFunction.run, JITFunction._do_compile = run, do_compile
    try:
        yield rec
    finally:
        JITFunction.run, JITFunction._do_compile = orig_run, orig_compile


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def capture_in_subprocess(target: str, timeout: float = 300, **kwargs) -> list[Launch]:
    """Run ``target`` (``"module:function"``, returning a list of :class:`Launch`) in a subprocess without
    ``TRITON_INTERPRET`` and return its launches; ``kwargs`` (JSON-able) are passed to it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launches.json"
        cmd = [sys.executable, "-m", "tests.compile_harness", "capture", target, str(out), json.dumps(kwargs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"capturing {target} failed:\n{proc.stderr[-4000:]}")
        return [Launch(**d) for d in json.loads(out.read_text())]


def cache_dir() -> Path:
    """Where compiled launches are kept: ``$FASTMAE_STATIC_CACHE`` or ``~/.cache/fastmae/static``."""
    return Path(os.environ.get("FASTMAE_STATIC_CACHE") or Path.home() / ".cache" / "fastmae" / "static")


def _cache_path(root: Path, key: str) -> Path:
    return root / f"{key}.json.gz"


def compile_launches(
    launches: list[Launch], jobs: int | None = None, cache: Path | None = None, timeout: float = 1800
) -> list[dict]:
    """The compiled artifacts of each launch, compiling (in ``jobs`` worker processes) those not cached.

    Each result holds ``ptx``, ``sass`` (cuobjdump listing, instruction lines), ``ptxas_log``, ``shared`` (bytes of
    dynamic shared memory), ``compile_s``, ``cached``; or ``error`` when it did not compile.
    """
    root = cache or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    todo = {}
    for launch in launches:
        if not _cache_path(root, launch.key()).exists():
            todo.setdefault(launch.key(), launch)
    errors = {}
    if todo:
        jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
        # Heaviest first (more warps and stages, larger tiles) so the workers finish together.
        order = sorted(todo.values(), key=lambda ln: -_cost(ln))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp) / "work.json"
            work.write_text(json.dumps([dataclasses.asdict(ln) for ln in order]))
            cmd = [sys.executable, "-m", "tests.compile_harness", "compile", str(work), str(root), tmp]
            procs = [
                subprocess.Popen(cmd, env=_clean_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for _ in range(jobs)
            ]
            for proc in procs:
                _, err = proc.communicate(timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"compile worker failed:\n{err.decode()[-4000:]}")
            for path in Path(tmp).glob("*.error"):
                errors[path.stem] = path.read_text()
    results = []
    for launch in launches:
        key = launch.key()
        if key in errors:
            results.append({"error": errors[key]})
            continue
        with gzip.open(_cache_path(root, key), "rt") as f:
            entry = json.load(f)
        results.append({**entry, "cached": key not in todo})
    return results


def _cost(launch: Launch) -> float:
    blocks = [v for v in launch.constexpr_values().values() if isinstance(v, int) and not isinstance(v, bool)]
    size = max(blocks, default=1)
    return launch.options.get("num_warps", 4) * launch.options.get("num_stages", 1) * size


def _compile_launch(launch: Launch, tools: dict) -> dict:
    """Compile one launch exactly as ``JITFunction._do_compile`` would; return the stored artifacts."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(launch.module, launch.kernel)
    constexprs = {tuple(p): v for p, v in launch.constexprs}
    attrs = {tuple(p): a for p, a in launch.attrs}
    options = {k: _tupled(v) for k, v in launch.options.items()}
    src = ASTSource(fn, launch.signature, constexprs, attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton with knobs.nvidia.dump_ptxas_log
        kernel = triton.compile(src, target=GPUTarget("cuda", launch.arch, 32), options=options)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        proc = subprocess.run([tools["cuobjdump"], "-sass", str(cubin)], capture_output=True, text=True, check=True)
    sass = "\n".join(line for line in proc.stdout.splitlines() if "/*" in line and not line.strip().startswith("/* 0x"))
    return {
        "ptx": kernel.asm["ptx"],
        "sass": sass,
        "ptxas_log": log.getvalue(),
        "shared": int(kernel.metadata.shared),
        "compile_s": round(seconds, 3),
    }


def _jit_function(module: str, name: str):
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _worker_compile(work: Path, root: Path, scratch: Path) -> None:
    """Compile the work list's launches that no other worker has claimed; store each in the cache."""
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # ptxas must run (and log) even when Triton's own cache has the kernel
    knobs.cache.dir = str(scratch / f"triton-cache-{os.getpid()}")
    tools = {"cuobjdump": knobs.nvidia.cuobjdump.path}
    for item in json.loads(work.read_text()):
        launch = Launch(**item)
        key = launch.key()
        try:
            os.close(os.open(scratch / f"{key}.claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        try:
            entry = _compile_launch(launch, tools)
        except Exception as e:  # reported per launch by compile_launches
            (scratch / f"{key}.error").write_text(f"{type(e).__name__}: {e}"[-3000:])
            continue
        tmp = root / f".{key}.{os.getpid()}.tmp"
        with gzip.open(tmp, "wt") as f:
            json.dump(entry, f)
        os.replace(tmp, _cache_path(root, key))


def _worker_capture(target: str, out: Path, kwargs: dict) -> None:
    module, func = target.split(":")
    launches = getattr(importlib.import_module(module), func)(**kwargs)
    out.write_text(json.dumps([dataclasses.asdict(ln) for ln in launches]))


def _main(argv: list[str]) -> None:
    if "TRITON_INTERPRET" in os.environ:
        raise RuntimeError("the compile worker must run without TRITON_INTERPRET")
    if argv[0] == "capture":
        _worker_capture(argv[1], Path(argv[2]), json.loads(argv[3]))
    elif argv[0] == "compile":
        _worker_compile(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
