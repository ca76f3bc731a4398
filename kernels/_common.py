"""What every kernel module shares: checks, output allocation, the op registration, and the error policy.

It imports no Triton itself, so that fastmae.ops and the tests use its one :func:`interpreting` check without
loading any kernel module.

Bad indices and empty masks, one policy for every op (``patch_embed``'s ids_keep, ``decoder_assembly``'s
ids_restore, ``masked_mse``'s ids and mask):

* Validated where it costs no wait on the GPU. CPU tensors (the interpreter) are checked on the host and a bad
  value raises a ValueError at once (:func:`host_checks`). Indices fastmae builds itself are valid by construction:
  :class:`fastmae.MAE` draws its masks with :func:`fastmae.masking.random_masking` and rejects a mask ratio that
  scores no patch before running anything.
* On the GPU nothing is read back on the hot path (no host sync, CUDA-graph capturable). The kernels mask out-of-
  range indices, so no load or store leaves its tensor; the rows they affect come out NaN (and so does the loss of
  an all-zero mask, as the eager op's 0/0), and the forward kernel sets a flag on the device
  (:func:`error_flags`, one int32 per kind of error in :data:`ERRORS`).
* The flags are reported lazily: :func:`check_errors` (``fastmae.kernels.check_errors()``) waits for the GPU,
  raises a ValueError naming the op and the error, and clears them; with ``FASTMAE_CHECK=1`` in the environment
  every op that sets flags checks after its forward (:func:`debug_check`: a sync per call, for debugging).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# op -> what each of its device error flags means (flag i of error_flags(op, ...) is ERRORS[op][i]).
ERRORS: dict[str, tuple[str, ...]] = {
    "patch_embed": ("ids_keep holds a patch index outside [0, L)",),
    "decoder_assembly": ("ids_restore holds an index outside [0, L)",),
    "masked_mse": ("ids holds a patch index outside [0, L)", "the mask sums to zero (no patch is scored)"),
}

_poison = False
_recording = False
_flags: dict[tuple[str, str], torch.Tensor] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``): the one check of it.
    ``@triton.jit`` reads it when a kernel module is imported, so each module keeps its value at import."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def poison_outputs() -> Iterator[None]:
    """Within this context every output a launcher allocates is NaN-filled (ints: -1) before the launch."""
    global _poison
    prev, _poison = _poison, True
    try:
        yield
    finally:
        _poison = prev


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, NaN-poisoned inside :func:`poison_outputs` so unwritten elements show in tests."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


@contextlib.contextmanager
def recording_launches() -> Iterator[None]:
    """Within this context the public ops take CPU tensors without the interpreter and check no values on the host.

    For recording the launches offline (``tests/compile_harness.capture_launches``, which stops every launch before
    it runs and compiles for a GPU instead): the ops then run their real launchers on CPU tensors, nothing is
    computed and nothing is read back.
    """
    global _recording
    prev, _recording = _recording, True
    try:
        yield
    finally:
        _recording = prev


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` as ``[M, D]`` rows with a unit-stride last dim (a view when the strides allow it), for the
    row-wise kernels."""
    t = t.reshape(-1, t.shape[-1])  # [M, D]
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise a TypeError unless ``t`` is a tensor of a supported floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def unsupported_float(**tensors) -> str | None:
    """For a kernel module's ``unsupported`` check: the first floating tensor of a dtype the kernels do not take
    (float64, ...) that the eager ops accept, named, or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
            return f"{name} is {t.dtype}; the kernel takes float32, float16 or bfloat16"
    return None


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the tensors when they are not all on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k}: {v}" for k, v in devices.items()))


def check_device(name: str, t: torch.Tensor, interpreted: bool) -> None:
    """Raise a ValueError unless the kernels can run on ``t``'s device: CUDA, or any device when the module was
    imported under the interpreter (``interpreted``), or inside :func:`recording_launches`."""
    if t.device.type != "cuda" and not interpreted and not _recording:
        raise ValueError(f"{name} must be a CUDA tensor (got one on {t.device}); set TRITON_INTERPRET=1 for the CPU")


def host_checks(*tensors: torch.Tensor) -> bool:
    """Whether the values of ``tensors`` (indices, masks) are validated on the host, which costs no GPU sync: CPU
    tensors, outside torch.compile's tracing and :func:`recording_launches`. Elsewhere the kernels flag them."""
    if _recording or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" for t in tensors)


@torch.compiler.assume_constant_result
def error_flags(op: str, device: torch.device) -> torch.Tensor:
    """The device error flags of ``op`` on ``device``: int32 ``[len(ERRORS[op])]``, zero until a kernel sets one.
    Allocated on the op's first call on the device (without waiting on it: run a step before capturing a CUDA graph
    by hand), then the same tensor at a fixed address, passed to the op as a mutated argument; under torch.compile
    it is a constant of the graph (a static address for CUDA graphs)."""
    key = (op, str(device))
    if key not in _flags:
        flags = torch.zeros(len(ERRORS[op]), dtype=torch.int32, device=device)
        torch._dynamo.mark_static_address(flags)
        _flags[key] = flags
    return _flags[key]


def check_errors() -> None:
    """Raise a ValueError for every error the kernels flagged on a device since the last check, naming the op and
    what was wrong (their results are NaN); the flags are cleared. Waits for each device that has flags."""
    found = []
    for (op, device), flags in _flags.items():
        values = flags.tolist()  # the one wait on the device
        if any(values):
            flags.zero_()
            found += [f"{op} on {device}: {what}" for what, v in zip(ERRORS[op], values) if v]
    if found:
        raise ValueError(
            "fastmae.kernels found bad arguments on the device (their results are NaN): " + "; ".join(found)
        )


def debug_check() -> None:
    """:func:`check_errors` when ``FASTMAE_CHECK=1`` (called after its forward by every op that sets flags); nothing
    while torch.compile traces or a CUDA graph is captured."""
    if os.environ.get("FASTMAE_CHECK", "0") in ("", "0") or torch.compiler.is_compiling():
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    check_errors()


def launch_skipped(*args) -> bool:
    """Whether a launch under the interpreter gets fake tensors (torch.compile tracing the op's fake
    implementation, which is its body): then it is skipped, as fake tensors have shapes but no data."""
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def register_op(name: str, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register a launcher as the op ``name`` (``fastmae::<op>_fwd`` / ``_bwd``), so torch.compile captures it in
    one graph: a ``torch.library.triton_op`` (Inductor traces its body and schedules the kernels, launched there
    through ``wrap_triton``), or under ``TRITON_INTERPRET``, whose kernels launch eagerly and cannot be traced, an
    opaque ``torch.library.custom_op`` whose fake implementation is the same body with the launches skipped (see
    :func:`launch_skipped`). The launcher's arguments must be annotated (tensors, ints, floats, bools, dtypes)."""
    from torch.library import custom_op, triton_op

    def wrap(fn: Callable) -> Callable:
        if not interpreting():
            return triton_op(name, mutates_args=mutates_args)(fn)
        op = custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fn)
        return op

    return wrap
