"""The pretraining step without host synchronization, optionally captured whole in one CUDA graph.

A host synchronization (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing, a blocking copy, a Python
``if`` on a device value) makes the CPU wait for the GPU to drain, so the next step's launches start late and
the GPU idles. The step here reads nothing back: :class:`TrainStep` returns the step's loss and gradient norm as
a device tensor, :class:`Pending` keeps those of the steps since the last read on the device, and the training
loop reads them all at once at its boundaries (a log line, a checkpoint, a picture). There it checks that every
step's numbers are finite: a non-finite loss or gradient norm is found at most ``capacity`` steps late, named by
the step it happened at, before anything is written from the weights it produced.

:class:`GraphedStep` records the whole step (forward and backward of every micro-batch, the gradient norm and
clipping, the AdamW update) once in a CUDA graph and replays it: one graph launch per step instead of thousands of
kernel launches. The batch is copied into static input buffers; the mask noise is drawn inside the graph from
per-micro-batch generators registered with it, reseeded before each replay (a replay reads a registered generator's
seed and offset as they are on the host then), so a replay draws exactly the masks an eager step draws; AdamW runs
``capturable`` with its learning rate in float32 device tensors refilled before each replay. Fused AdamW computes in
double precision from a float learning rate, and from the float32 value of a tensor one, so a captured step's
updates can differ from those of an eager step with float learning rates in the last bits; with the same tensor
learning rates the eager step and the captured one are equal bit for bit.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist

# Steps kept on the device between two reads at most (a read is also due at every log line).
MAX_PENDING = 1024


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """:func:`fastmae.schedule.set_lr`, writing into a group's lr tensor where it has one (a captured step's)."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # a kernel launch, no synchronization
        else:
            group["lr"] = value


class TrainStep:
    """One optimizer step of MAE pretraining: forward and backward of each micro-batch, the gradient norm (and
    clipping), the AdamW update. No host synchronization when the optimizer is fused (as on CUDA: GradScaler's
    fp16 step then skips an overflowed update on the device too) and the model's ops read nothing back.

    Args:
        model: what the step calls (the MAE module, or its DDP or compiled wrapper):
            ``model(imgs, mask_ratio, noise, pred_masked_only) -> (loss, pred, mask)``.
        raw: the MAE module itself (sharded in place under FSDP): its parameters and ``num_patches``.
        optimizer: AdamW over ``raw``'s parameters.
        scaler: the GradScaler (enabled for fp16 only).
        amp_dtype: the autocast dtype of the forward, or None for none.
        mask_ratio, pred_masked_only: the model's arguments.
        accum_iter: micro-batches per optimizer step.
        clip_grad: clip the gradient norm to this value (None: no clipping).
        ddp: the DDP wrapper (gradients are averaged on the last micro-batch only), or None.
        fsdp: whether ``raw`` is sharded with FSDP2 (likewise).
        device: where the step runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        raw: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype | None,
        mask_ratio: float,
        pred_masked_only: bool,
        accum_iter: int,
        clip_grad: float | None,
        device: torch.device,
        ddp: torch.nn.parallel.DistributedDataParallel | None = None,
        fsdp: bool = False,
    ):
        self.model, self.raw, self.optimizer, self.scaler = model, raw, optimizer, scaler
        self.amp_dtype, self.mask_ratio, self.pred_masked_only = amp_dtype, mask_ratio, pred_masked_only
        self.accum_iter, self.clip_grad, self.device, self.ddp, self.fsdp = accum_iter, clip_grad, device, ddp, fsdp
        self.trainable = [p for p in raw.parameters() if p.requires_grad]
        # One mask generator per micro-batch, seeded for each step (see __call__).
        self.generators = [torch.Generator(device=device) for _ in range(accum_iter)]
        self.cache_casts = True  # autocast's cache of cast weights (off inside a CUDA graph)
        self.mark_cudagraph_steps = False  # torch.compile(mode="reduce-overhead"): mark each step's start

    def autocast(self):
        enabled = self.amp_dtype is not None
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_casts)

    def compute(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step on device batches ``images`` (``accum_iter`` tensors ``[B, 3, S, S]``), the mask noise drawn
        from :attr:`generators` as they stand; gradients are left in place.

        Returns:
            ``[2]`` float32 on the device: the loss (mean over the micro-batches of this process) and the norm of
            the (unscaled, unclipped) gradient.
        """
        loss_sum = torch.zeros((), device=self.device)
        for micro, imgs in enumerate(images):
            gen = self.generators[micro]
            noise = torch.rand(imgs.shape[0], self.raw.num_patches, generator=gen, device=self.device)  # [B, L]
            last = micro == len(images) - 1
            if self.fsdp:
                self.raw.set_requires_gradient_sync(last)
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                with self.autocast():
                    loss, _, _ = self.model(imgs, self.mask_ratio, noise, self.pred_masked_only)
                self.scaler.scale(loss / len(images)).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        if self.clip_grad:
            torch.nn.utils.clip_grads_with_norm_(self.trainable, self.clip_grad, grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)  # fp16: an overflowed update is skipped (on the device when fused)
        self.scaler.update()
        return torch.stack([loss_sum / len(images), grad_norm.float()])  # [2]

    def seed(self, seeds: Sequence[int]) -> None:
        """Seed micro-batch m's mask generator with ``seeds[m]`` (host-side state: no synchronization)."""
        if len(seeds) != self.accum_iter:
            raise ValueError(f"need one seed per micro-batch ({self.accum_iter}), got {len(seeds)}")
        for gen, seed in zip(self.generators, seeds):
            gen.manual_seed(seed)

    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int], lr: float) -> torch.Tensor:
        """One step at learning rate ``lr`` on ``images`` (``accum_iter`` batches ``[B, 3, S, S]``, on the device
        or in pinned host memory), micro-batch m masked with noise from seed ``seeds[m]``.

        Returns:
            ``[2]``: see :meth:`compute`.
        """
        if self.mark_cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        set_lr(self.optimizer, lr)
        self.seed(seeds)
        out = self.compute([x.to(self.device, non_blocking=True) for x in images])
        self.optimizer.zero_grad(set_to_none=True)
        return out


class GraphedStep:
    """:class:`TrainStep` captured in one CUDA graph on its first call, replayed on every call.

    The first call warms up on a side stream (kernels compile, cuBLAS and cuDNN choose their algorithms, AdamW
    creates its state), puts the parameters and optimizer state back as they were (in place: the graph reads those
    very tensors), captures, then replays for that call. Each call copies the batch into the static buffers,
    seeds the mask generators, writes the learning rate into the optimizer's lr tensors and replays: the numbers
    are those of the eager step. Shapes are fixed by the first call (MAE's are: full batches, one mask ratio).

    Not supported, with a ValueError: DDP or FSDP (their collectives would need static buckets and warm-up of
    their own), an enabled GradScaler (fp16: use bf16), a non-CUDA device.

    Args:
        step: the eager step to capture; its optimizer is switched to ``capturable`` with tensor learning rates.
        warmup: eager steps run (and undone) before the capture.
    """

    def __init__(self, step: TrainStep, warmup: int = 3):
        if step.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {step.device}")
        if step.ddp is not None or step.fsdp:
            raise ValueError("CUDA graph capture of the step is supported in one process only (no DDP or FSDP)")
        if step.scaler.is_enabled():
            raise ValueError("CUDA graph capture does not take fp16's GradScaler; use bf16 (or fp32)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_images: list[torch.Tensor] = []
        self.static_out: torch.Tensor | None = None

    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int], lr: float) -> torch.Tensor:
        """As :meth:`TrainStep.__call__`; the result is a static tensor, overwritten by the next call."""
        if self.graph is None:
            self._capture(images)
        for buf, x in zip(self.static_images, images, strict=True):
            if x.shape != buf.shape or x.dtype != buf.dtype:
                raise ValueError(f"a captured step takes batches {list(buf.shape)} {buf.dtype}, got "
                                 f"{list(x.shape)} {x.dtype}")  # fmt: skip
            buf.copy_(x, non_blocking=True)
        self.step.seed(seeds)
        set_lr(self.step.optimizer, lr)
        self.graph.replay()
        return self.static_out

    def _capture(self, images: Sequence[torch.Tensor]) -> None:
        step, opt, device = self.step, self.step.optimizer, self.step.device
        if len(images) != step.accum_iter:
            raise ValueError(f"need {step.accum_iter} micro-batches, got {len(images)}")
        self.static_images = [torch.empty(x.shape, dtype=x.dtype, device=device) for x in images]  # [B, 3, S, S]
        for buf, x in zip(self.static_images, images):
            buf.copy_(x)
        for group in opt.param_groups:  # the graph reads the lr from these tensors
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        step.cache_casts = False  # no autocast cache across the captured region
        with undone(step.trainable, opt):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True.*")
                for _ in range(self.warmup):
                    step.compute(self.static_images)
                    opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        for gen in step.generators:
            self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # loader threads may use CUDA
            self.static_out = step.compute(self.static_images)  # [2]


@contextlib.contextmanager
def undone(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Whatever the body does to ``params`` and to their state in ``optimizer`` is undone on exit, in place: the
    tensors stay the same objects (a CUDA graph captured afterwards reads them), their values are put back, and
    state the body created is zeroed (AdamW's fresh state: step 0, zero moments)."""
    saved_params = [p.detach().clone() for p in params]
    saved_state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
    yield
    with torch.no_grad():
        for p, saved in zip(params, saved_params):
            p.copy_(saved)
        for p in params:
            for key, value in optimizer.state.get(p, {}).items():
                if p in saved_state:
                    value.copy_(saved_state[p][key])
                else:
                    value.zero_()


def plain_param_groups(optimizer_state: dict) -> dict:
    """An optimizer state dict as an eager step's optimizer has it: tensor learning rates (a captured step's)
    as floats, ``capturable`` off; so that a checkpoint does not depend on how the step ran. Reads a device value:
    call it at a checkpoint, not per step."""
    groups = []
    for group in optimizer_state["param_groups"]:
        group = dict(group)
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        group["capturable"] = False
        groups.append(group)
    return {**optimizer_state, "param_groups": groups}


class StepNumbers(NamedTuple):
    """One step's numbers as read at a boundary: loss (mean over micro-batches and processes), gradient norm,
    learning rate and unreadable images skipped (all processes)."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    bad_images: int


class Pending:
    """The numbers of the steps since the last read, kept on the device: each step's ``[loss, grad_norm]`` is
    copied into a ``[capacity, 2]`` buffer (a device-to-device copy, no synchronization); its lr and bad-image
    count stay on the host. :meth:`read` returns them all with one synchronization (and one all-reduce when a
    process group is up). The buffer must be read before it is full.

    Args:
        capacity: steps kept at most (at most :data:`MAX_PENDING`).
        device: where the buffer lives.
    """

    def __init__(self, capacity: int, device: torch.device):
        self.capacity = max(1, min(capacity, MAX_PENDING))
        self.values = torch.zeros(self.capacity, 2, device=device)  # [W, 2]: loss of this process, grad norm
        self.steps: list[tuple[int, float, int]] = []  # (step, lr, bad images of this process)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def full(self) -> bool:
        return len(self.steps) == self.capacity

    def add(self, step: int, values: torch.Tensor, lr: float, bad_images: int) -> None:
        """Keep step ``step``'s ``values`` (``[2]``: loss, gradient norm) until the next :meth:`read`."""
        if self.full:
            raise RuntimeError(f"{self.capacity} steps pending: read them first")
        self.values[len(self.steps)].copy_(values, non_blocking=True)
        self.steps.append((step, lr, bad_images))

    def read(self, world: int = 1) -> list[StepNumbers]:
        """The pending steps' numbers, oldest first (losses averaged and bad images summed over the ``world``
        processes of the group); empties the buffer. Every process must call it at the same steps."""
        n = len(self.steps)
        if n == 0:
            return []
        bad = torch.tensor([b for _, _, b in self.steps], dtype=torch.float32).to(self.values.device)  # [n]
        shared = torch.stack([self.values[:n, 0], bad])  # [2, n]: loss, bad images
        if dist.is_initialized():
            dist.all_reduce(shared)  # a NaN on any rank reaches every rank: all stop together
            shared[0] /= world
        losses, bads, norms = torch.cat([shared, self.values[:n, 1][None]]).tolist()
        numbers = [StepNumbers(s, loss, norm, lr, int(b)) for (s, lr, _), loss, norm, b in
                   zip(self.steps, losses, norms, bads)]  # fmt: skip
        self.steps = []
        return numbers
