"""MAE pretraining on one process, one GPU or many: the original recipe with fastmae's fused model.

Commands (run from the repository root)::

    python training/pretrain.py --preset demo       # = make pretrain: the embedded images (CPU: toy; GPU: ViT-B)
    python training/pretrain.py --help              # every flag (each field of TrainConfig below)

    # one GPU, your images in DIR/train/<class>/*.jpg (torchvision ImageFolder, as the original reads ImageNet)
    python training/pretrain.py --model mae_vit_base_patch16 --data-path DIR --batch-size 256 --norm-pix-loss

    # the paper's ViT-L recipe on 8 GPUs: effective batch 8 × 128 × 4 = 4096, lr = 1.5e-4 · 4096 / 256
    torchrun --nproc_per_node=8 training/pretrain.py --model mae_vit_large_patch16 --data-path /data/imagenet \
        --batch-size 128 --accum-iter 4 --epochs 800 --warmup-epochs 40 --blr 1.5e-4 --norm-pix-loss \
        --output-dir runs/vitl

    # continue a killed run exactly where its newest checkpoint left it (same command plus --resume; with
    # 'auto' and no checkpoint yet it starts afresh, so a preemptible job can always pass it)
    torchrun --nproc_per_node=8 training/pretrain.py ... --output-dir runs/vitl --save-every-steps 500 --resume auto

    # continue pretraining released weights on your images (new optimizer and schedule): --init-from FILE.pth

The original ``main_pretrain.py`` command lines work unchanged (its flag spellings, ``--resume`` of its
checkpoints, and its distributed flags, which torchrun replaces). Outputs in ``--output-dir``:
``checkpoint-<step>.pth`` (the newest ``--keep-last``, for ``--resume``), ``checkpoint-<epoch>.pth`` (the original's
name, every ``--save-every-epochs`` epochs and at the last), ``encoder.pth`` (timm ``VisionTransformer`` keys under
``model``), ``metrics.jsonl``, ``loss.png``, ``recon-<step>.png``, ``config.json`` and TensorBoard scalars.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import fastmae
from fastmae import checkpoint as ckpt_io
from fastmae import data, distributed, pipeline, schedule, visualize
from fastmae import step as steps
from fastmae.cli import ORIGINAL_PRETRAIN_FLAGS, option, parse_config
from fastmae.distributed import Dist
from fastmae.model import encoder_state


@dataclass
class TrainConfig:
    """Every knob of a run; each field is a command-line flag (``--batch-size`` or ``--batch_size``). Defaults
    are the original ``main_pretrain.py``'s, except where the README lists a difference."""

    model: str = option("mae_vit_large_patch16", "model name (fastmae.list_configs())")
    input_size: int | None = option(None, "image side (None: the model's, 224 for ViTs)")
    mask_ratio: float = option(0.75, "fraction of patches removed")
    norm_pix_loss: bool = option(False, "per-patch normalized pixel targets")
    pred_masked_only: bool = option(True, "decode masked patches only (same loss)")
    impl: str = option("auto", "op implementation", ("auto", "triton", "eager"))
    data_path: str | None = option(None, "ImageFolder root DIR (DIR/train/<class>/*)")
    views_per_epoch: int = option(1024, "views in an epoch of the embedded images")
    bad_images: str = option(
        "skip", "an unreadable image: skip = log it, use the next; error = stop", ("skip", "error")
    )
    decode: str = option("auto", "JPEG decode and crop: cpu = loader workers; gpu (auto on CUDA)", pipeline.DECODES)
    batch_size: int = option(64, "images per process per micro-step")
    accum_iter: int = option(1, "micro-steps accumulated per optimizer step")
    epochs: int = option(400, "length of the schedule in epochs")
    warmup_epochs: float = option(40, "linear warm-up length in epochs")
    blr: float = option(1e-3, "base lr: lr = blr * eff_batch / 256 (paper: 1.5e-4)")
    lr: float | None = option(None, "absolute peak lr (overrides --blr)")
    min_lr: float = option(0.0, "floor of the cosine decay")
    weight_decay: float = option(schedule.WEIGHT_DECAY, "AdamW decay (not on biases/1-D)")
    clip_grad: float | None = option(None, "clip the gradient norm to this value")
    precision: str = option("auto", "auto = bf16 on CUDA, fp32 on CPU", ("auto", "bf16", "fp16", "fp32"))
    compile: bool = option(False, "torch.compile the model")
    compile_mode: str = option("default", "torch.compile mode", ("default", "reduce-overhead", "max-autotune"))
    cuda_graphs: bool = option(False, "capture the whole step in a CUDA graph (one GPU; bf16 or fp32)")
    fsdp: bool = option(False, "shard with FSDP2 (fully_shard per block) instead of DDP")
    device: str = option("auto", "auto, cuda or cpu", ("auto", "cuda", "cpu"))
    num_workers: int = option(-1, "loader processes per rank (-1: from the CPU count)")
    pin_mem: bool = option(True, "pinned host memory for batches (CUDA only)")
    seed: int = option(0, "seed of weights, shuffles, views and masks (see README)")
    output_dir: str = option("output_dir", "checkpoints, metrics and pictures")
    log_dir: str | None = option(None, "TensorBoard folder (None: OUTPUT_DIR/tensorboard)")
    resume: str | None = option(None, "checkpoint to resume, 'auto' (newest) or ''")
    init_from: str | None = option(None, "start from these weights (not when resuming)")
    start_epoch: int = option(0, "first epoch of a run that does not resume")
    max_steps: int | None = option(None, "stop after this many optimizer steps")
    save_every_epochs: int = option(20, "keep checkpoint-<epoch>.pth every N (0: off)")
    save_every_steps: int = option(0, "checkpoint every N optimizer steps (0: off)")
    keep_last: int = option(3, "step-named checkpoints kept (0: all)")
    log_every: int = option(10, "log line and metrics record every N steps")
    viz_every: int = option(1000, "reconstruction PNG every N steps (0: only at the end)")
    tensorboard: bool = option(True, "TensorBoard scalars when it is installed")
    progress: bool = option(True, "progress bar on a terminal (else log lines)")
    preset: str | None = option(None, "defaults for a named run", ("demo",))


def demo_preset(cuda: bool) -> dict:
    """``--preset demo``: minutes on the embedded images; the model size follows the hardware."""
    demo = dict(output_dir="runs/demo", norm_pix_loss=False, min_lr=1e-5, save_every_epochs=0, warmup_epochs=1)
    if not cuda:  # 2 CPU cores: the 64-px toy model, 12 epochs × 16 steps of 64 views
        demo.update(model="mae_vit_nano_patch8", batch_size=64, views_per_epoch=1024, epochs=12, blr=8e-3)
        return dict(demo, viz_every=64, save_every_steps=64, log_every=16)
    demo.update(model="mae_vit_base_patch16", batch_size=128, views_per_epoch=4096, epochs=30, blr=1.5e-3)
    return dict(demo, warmup_epochs=3, viz_every=240, save_every_steps=240, log_every=20)


PRESETS = {"demo": demo_preset}


class ConfigError(ValueError):
    """A flag value that cannot work; reported before anything heavy starts."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config from the command line: dataclass defaults < ``--preset`` values < explicit flags; the original's
    obsolete flags each print a one-line note."""
    presets = {name: (lambda make=make: make(torch.cuda.is_available())) for name, make in PRESETS.items()}
    return parse_config(
        TrainConfig, argv, "MAE pretraining (fastmae).", presets, ORIGINAL_PRETRAIN_FLAGS, validate, ConfigError
    )


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first flag that cannot work."""
    one_process = not cfg.fsdp and int(os.environ.get("WORLD_SIZE", 1)) == 1
    checks = [
        (cfg.model in fastmae.list_configs(), f"--model {cfg.model!r} is unknown; known: {fastmae.list_configs()}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.accum_iter >= 1, f"--accum-iter must be >= 1, got {cfg.accum_iter}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (0 <= cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs must be in [0, epochs], got {cfg.warmup_epochs}"),
        (0 <= cfg.start_epoch < cfg.epochs, f"--start-epoch must be in [0, epochs), got {cfg.start_epoch}"),
        (0 < cfg.mask_ratio < 1, f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}"),
        (cfg.blr > 0 and (cfg.lr is None or cfg.lr > 0), "--blr and --lr must be > 0"),
        (cfg.min_lr >= 0 and cfg.weight_decay >= 0, "--min-lr and --weight-decay must be >= 0"),
        (cfg.clip_grad is None or cfg.clip_grad > 0, f"--clip-grad must be > 0, got {cfg.clip_grad}"),
        (cfg.views_per_epoch >= 1, f"--views-per-epoch must be >= 1, got {cfg.views_per_epoch}"),
        (cfg.num_workers >= -1, f"--num-workers must be >= -1, got {cfg.num_workers}"),
        (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}"),
        (min(cfg.save_every_epochs, cfg.save_every_steps, cfg.keep_last, cfg.viz_every) >= 0, "intervals are >= 0"),
        (cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}"),
        (cfg.device != "cuda" or torch.cuda.is_available(), "--device cuda but CUDA is not available"),
        (not (cfg.precision == "fp16" and not use_cuda(cfg)), "--precision fp16 needs CUDA (use fp32 or bf16)"),
        (not (cfg.precision == "fp16" and cfg.fsdp), "--precision fp16 is not supported with --fsdp; use bf16"),
        (cfg.compile or cfg.compile_mode == "default", "--compile-mode needs --compile"),
        (not cfg.cuda_graphs or use_cuda(cfg), "--cuda-graphs needs CUDA"),
        (not (cfg.cuda_graphs and cfg.precision == "fp16"), "--cuda-graphs does not take fp16's GradScaler; use bf16"),
        (not cfg.cuda_graphs or one_process, "--cuda-graphs runs in one process: DDP and FSDP are not captured"),
        (not (cfg.cuda_graphs and cfg.compile), "--cuda-graphs captures the uncompiled step (--compile: see README)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.input_size is not None:
        patch = fastmae.get_config(cfg.model).patch_size
        if cfg.input_size < patch or cfg.input_size % patch:
            raise ConfigError(f"--input-size must be a positive multiple of the patch size {patch}")
    if cfg.data_path is not None:
        root = Path(cfg.data_path)
        if not root.is_dir():
            raise ConfigError(f"--data-path {cfg.data_path!r} does not exist or is not a folder")
        if not (root / "train").is_dir():
            raise ConfigError(f"--data-path {cfg.data_path!r} has no train/ folder (expected DIR/train/<class>/*)")
    if cfg.resume not in (None, "", "auto") and not Path(cfg.resume).is_file():
        raise ConfigError(f"--resume {cfg.resume!r}: no such file (or pass 'auto' for the newest in --output-dir)")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"--init-from {cfg.init_from!r}: no such file")


def use_cuda(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def cpu_size_warning(cfg: TrainConfig) -> str | None:
    """A warning when a ViT-B-sized (or larger) model is to train on the CPU, where a step takes minutes."""
    if use_cuda(cfg) or fastmae.get_config(cfg.model).embed_dim < fastmae.get_config("mae_vit_base_patch16").embed_dim:
        return None
    return (
        f"pretrain: warning: {cfg.model} on the CPU: each step takes minutes and a run days. For a CPU demo use "
        "--preset demo (or --model mae_vit_nano_patch8); for real runs, a GPU"
    )


@dataclass
class RunResult:
    """What :func:`train` returns: the last step, this run's per-step losses (mean over ranks), the model."""

    step: int
    losses: list[tuple[int, float]]
    output_dir: Path
    checkpoint: Path | None
    model: torch.nn.Module


def train(cfg: TrainConfig) -> RunResult:
    """Run (or resume) one pretraining job as configured; returns when ``epochs`` or ``max_steps`` is reached.

    Raises:
        ConfigError: a flag that cannot work; CheckpointError: an unusable ``--resume`` or ``--init-from`` file;
        BadImageError: an unreadable image with ``--bad-images error``;
        NonFiniteError: the loss or gradient norm of a step became inf/NaN (seen where the loop reads its numbers:
            at the next log line, checkpoint or picture; nothing is saved from that step on).
    """
    validate(cfg)
    env = distributed.setup(use_cuda(cfg))
    try:
        return _train(cfg, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_data(cfg: TrainConfig, env: Dist) -> pipeline.Pipeline:
    try:
        source = data.open_source(cfg.data_path)
    except ValueError as e:
        raise ConfigError(f"--data-path: {e}") from e
    img_size = cfg.input_size or fastmae.get_config(cfg.model).img_size
    length = cfg.views_per_epoch if cfg.data_path is None else None
    workers = cfg.num_workers if cfg.num_workers >= 0 else distributed.default_num_workers(env.device)
    parts = pipeline.build_pipeline(source, img_size, decode=cfg.decode, device=env.device, seed=cfg.seed,
                                    rank=env.rank, world=env.world, length=length, bad_images=cfg.bad_images,
                                    batch_size=cfg.batch_size, num_workers=workers, pin_memory=cfg.pin_mem,
                                    impl=cfg.impl)  # fmt: skip
    if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # leave the loader workers their cores
        torch.set_num_threads(max(1, distributed.cpus_per_rank() - workers))
    return parts


@dataclass
class Model:
    """``raw``: the MAE module (sharded in place under FSDP); ``model``: what the training step calls (DDP and/or
    compiled); ``ddp``: the DDP wrapper or None."""

    raw: fastmae.MAE
    model: torch.nn.Module
    ddp: torch.nn.parallel.DistributedDataParallel | None


def build_model(cfg: TrainConfig, env: Dist, init_from: str | None) -> Model:
    """The same initial weights on every rank (``init_from``'s where it has them); wrapped in DDP, or sharded
    with FSDP2 per block then at the root."""
    distributed.seed_everything(cfg.seed)
    overrides = {"img_size": cfg.input_size} if cfg.input_size else {}
    raw = fastmae.create_model(cfg.model, norm_pix_loss=cfg.norm_pix_loss, impl=cfg.impl, **overrides)
    if init_from:
        try:
            loaded = raw.load_pretrained(init_from)
        except ValueError as e:
            raise ckpt_io.CheckpointError(f"--init-from: {e}") from e
        if not set(raw.state_dict()) - set(loaded.missing_keys):
            raise ckpt_io.CheckpointError(f"--init-from {init_from!r}: none of its keys is a key of {cfg.model}")
        if env.main:
            print(f"pretrain: initialized from {init_from}: {loaded.summary(len(raw.state_dict()))}", flush=True)
    raw = raw.to(env.device)
    ddp, model = None, raw
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(env.device.type, (env.world,))
        for block in [*raw.blocks, *raw.decoder_blocks]:
            fully_shard(block, mesh=mesh)
        fully_shard(raw, mesh=mesh)  # the rest: patch embedding, tokens, norms, decoder_embed, decoder_pred
    elif env.world > 1:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(raw, device_ids=device_ids, gradient_as_bucket_view=True)
        model = ddp
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    return Model(raw, model, ddp)


@dataclass
class Run:
    """Everything a training job holds, built once by :func:`build`."""

    cfg: TrainConfig
    env: Dist
    out: Path
    data: pipeline.Pipeline
    net: Model
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    precision: str
    autocast: torch.autocast
    steps_per_epoch: int
    stop_step: int
    eff_batch: int
    peak_lr: float
    layout: dict  # where a step lies in the data stream: an exact mid-epoch resume needs the same layout
    resume_path: Path | None
    train_step: steps.TrainStep | steps.GraphedStep  # launches a step; its numbers stay on the device
    pending: steps.Pending  # the numbers of the steps not read yet
    report_bad: data.BadImageLog
    viz: tuple[torch.Tensor, torch.Tensor] | None = None  # fixed images and mask noise for the pictures

    def group_names(self) -> list[list[str]]:
        """The parameter names of each optimizer group, in order."""
        names = {id(p): n for n, p in self.net.raw.named_parameters()}
        return [[names[id(p)] for p in group["params"]] for group in self.optimizer.param_groups]


# Full (unsharded) state dicts, keyed by parameter name, the same for a plain, DDP or FSDP model.
FULL = StateDictOptions(full_state_dict=True)
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(cfg: TrainConfig, env: Dist) -> Run:
    """Output folder, data, model, optimizer and precision; the checkpoint to resume, if any."""
    out = Path(cfg.output_dir)
    if env.main:
        if warning := cpu_size_warning(cfg):
            print(warning, file=sys.stderr, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temps(out)
    env.barrier()
    resume_path = ckpt_io.latest_checkpoint(out) if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None
    if resume_path is None and (ckpt_io.list_checkpoints(out) or ckpt_io.list_epoch_checkpoints(out)):
        raise ConfigError(f"{out} already holds checkpoints of another run: pass --resume auto or a new --output-dir")

    parts = build_data(cfg, env)
    steps_per_epoch = parts.sampler.num_samples // cfg.batch_size // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ConfigError(
            f"an epoch of {len(parts.dataset)} images gives {parts.sampler.num_samples} per process, fewer than one "
            f"optimizer step of batch_size × accum_iter = {cfg.batch_size * cfg.accum_iter}; lower them or add data"
        )
    total_steps = cfg.epochs * steps_per_epoch
    eff_batch = cfg.batch_size * cfg.accum_iter * env.world
    peak_lr = cfg.lr if cfg.lr is not None else schedule.scaled_lr(cfg.blr, eff_batch)
    if resume_path is not None and cfg.init_from and env.main:
        print(f"pretrain: note: resuming {resume_path}, so --init-from is not used", file=sys.stderr, flush=True)
    net = build_model(cfg, env, None if resume_path else cfg.init_from)
    distributed.seed_everything(cfg.seed + env.rank)
    cuda = env.device.type == "cuda"
    optimizer = schedule.build_adamw(net.raw, lr=peak_lr, weight_decay=cfg.weight_decay, fused=cuda)
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(env.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    layout = dict(steps_per_epoch=steps_per_epoch, world_size=env.world, batch_size=cfg.batch_size)
    layout.update(accum_iter=cfg.accum_iter, epoch_len=len(parts.dataset), seed=cfg.seed)
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    step = steps.TrainStep(net.model, net.raw, optimizer, scaler, amp_dtype, cfg.mask_ratio, cfg.pred_masked_only,
                           cfg.accum_iter, cfg.clip_grad, env.device, net.ddp, cfg.fsdp)  # fmt: skip
    step.mark_cudagraph_steps = cfg.compile and cfg.compile_mode == "reduce-overhead"
    pending = steps.Pending(cfg.log_every, env.device)
    report_bad = data.BadImageLog(f"pretrain: {f'rank {env.rank}: ' if env.world > 1 else ''}")
    return Run(cfg, env, out, parts, net, optimizer, scaler, precision, autocast, steps_per_epoch, stop_step,
               eff_batch, peak_lr, layout, resume_path, steps.GraphedStep(step) if cfg.cuda_graphs else step,
               pending, report_bad)  # fmt: skip


def resume(run: Run) -> int:
    """Load ``run.resume_path`` into the model, optimizer and scaler; returns the step to continue from (see
    :func:`fastmae.checkpoint.resume_step`: exact for fastmae's checkpoints, the next epoch for the original's)."""
    path = run.resume_path
    ck = ckpt_io.load_checkpoint(path)
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in run.net.raw.state_dict().items()}  # global shapes
    ckpt_io.check_model_state(ck["model"], shapes, path)
    optim_state = ckpt_io.optimizer_by_name(ck["optimizer"], run.group_names(), path)
    try:
        set_model_state_dict(run.net.raw, ck["model"], options=FULL)
        set_optimizer_state_dict(run.net.raw, run.optimizer, optim_state, options=FULL)
        if ck.get("scaler"):
            run.scaler.load_state_dict(ck["scaler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise ckpt_io.CheckpointError(f"checkpoint {str(path)!r} does not fit this run: {e}") from e
    step, exact = ckpt_io.resume_step(ck, run.layout, run.steps_per_epoch, path)
    if exact and len(ck.get("rng", [])) == run.env.world:
        ckpt_io.set_rng_state(ck["rng"][run.env.rank])
    if ckpt_io.is_original(ck) and run.env.main:
        epoch = step // run.steps_per_epoch
        print(f"pretrain: {path} was written by the original MAE code after epoch {epoch - 1}: model, optimizer and "
              f"loss scale loaded; training restarts at epoch {epoch} (step {step})", flush=True)  # fmt: skip
    return step


def announce(run: Run, start: int) -> None:
    """Write config.json and print the one-line banner (rank 0)."""
    cfg, env = run.cfg, run.env
    if not env.main:
        return
    source = data.describe(run.data.source)
    resolved = dict(eff_batch=run.eff_batch, peak_lr=run.peak_lr, total_steps=cfg.epochs * run.steps_per_epoch)
    resolved.update(run.layout, precision=run.precision, device=str(env.device), data=source, decode=run.data.decode)
    (run.out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), **resolved}, indent=2))
    mode = "FSDP" if cfg.fsdp else "DDP" if run.net.ddp else "single process"
    mode += ", CUDA graph of the step" if cfg.cuda_graphs else f", compile {cfg.compile_mode}" if cfg.compile else ""
    print(
        f"fastmae pretrain: {cfg.model} ({run.data.img_size}px) on {env.world}×{env.device.type} ({mode}, "
        f"{run.precision}); data: {source} (--decode {run.data.decode}); eff. batch {run.eff_batch}, "
        f"peak lr {run.peak_lr:.3g}, {run.steps_per_epoch} steps/epoch, steps {start}→{run.stop_step}"
        f"{f', resumed from {run.resume_path}' if run.resume_path else ''}; output {run.out}",
        flush=True,
    )


def batches(run: Run, start: int) -> Iterator[tuple[int, list[data.ViewBatch]]]:
    """``(step, its accum_iter micro-batches)`` for the steps from ``start`` to the end, epoch by epoch; an epoch
    entered part-way skips the views its earlier steps consumed."""
    cfg, spe, step = run.cfg, run.steps_per_epoch, start
    while step < run.stop_step:
        epoch, in_epoch = divmod(step, spe)
        run.data.sampler.set_epoch(epoch, start=in_epoch * cfg.accum_iter * cfg.batch_size)
        loader, end = iter(run.data.loader), min(run.stop_step, (epoch + 1) * spe)
        for i in range(step, end):
            yield i, [run.data.finish(next(loader)) for _ in range(cfg.accum_iter)]
        step = end
        del loader


def take_step(run: Run, done: int, micro_batches: list[data.ViewBatch]) -> None:
    """Launch optimizer step ``done + 1``; its loss and gradient norm stay on the device (``run.pending``)."""
    cfg, env, spe = run.cfg, run.env, run.steps_per_epoch
    bad = 0
    for batch in micro_batches:
        for item in batch.bad:
            run.report_bad(item)
        bad += len(batch.bad)
    epoch, in_epoch = divmod(done, spe)
    lr = schedule.lr_at(epoch + in_epoch / spe, run.peak_lr, cfg.epochs, cfg.warmup_epochs, cfg.min_lr)
    # The masks of (rank, step, micro-step) are fixed by the seed: the same after a resume.
    seeds = [distributed.derive_seed(cfg.seed + env.rank, done, micro) for micro in range(cfg.accum_iter)]
    values = run.train_step([batch.images for batch in micro_batches], seeds, lr)  # [2]: loss, grad norm (unread)
    run.pending.add(done + 1, values, lr, bad)


def read_numbers(run: Run, log: visualize.Progress) -> None:
    """The loop's one host synchronization: the pending steps' numbers, checked and logged in order. A non-finite
    loss or gradient norm stops the run naming its step, before anything is saved from the weights it made."""
    for s in run.pending.read(run.env.world):
        if not math.isfinite(s.loss) or (run.precision != "fp16" and not math.isfinite(s.grad_norm)):
            what = "loss" if not math.isfinite(s.loss) else "gradient norm"
            raise NonFiniteError(
                f"non-finite {what} (loss {s.loss}, grad norm {s.grad_norm}) at step {s.step} (epoch "
                f"{(s.step - 1) // run.steps_per_epoch}, lr {s.lr:.3g}); nothing was saved after step {s.step - 1}. "
                f"Last checkpoint: {ckpt_io.latest_checkpoint(run.out) or 'none'}. Try a lower --blr, --clip-grad "
                "or fp32."
            )
        log.update(s.step, s.loss, s.lr, s.grad_norm, s.bad_images)


def save(run: Run, step: int, epoch_name: int | None = None) -> None:
    """Every rank takes part in gathering; rank 0 writes ``checkpoint-<step>.pth`` (and, with ``epoch_name``,
    the original's ``checkpoint-<epoch_name>.pth`` too) and prunes old step-named ones."""
    model_state = get_model_state_dict(run.net.raw, options=FULL_ON_CPU)
    optim_state = get_optimizer_state_dict(run.net.raw, run.optimizer, options=FULL_ON_CPU)
    rngs = [ckpt_io.rng_state()]
    if dist.is_initialized():
        rngs = [None] * run.env.world
        dist.all_gather_object(rngs, ckpt_io.rng_state())
    if run.env.main:
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        state = {
            "model": model_state,
            "optimizer": ckpt_io.optimizer_by_index(steps.plain_param_groups(optim_state)),
            "epoch": epoch - 1,  # the last completed epoch, as the original counts
            "scaler": ckpt_io.scaler_state(run.scaler),
            "args": dataclasses.asdict(run.cfg),
            "step": step,
            "position": dict(run.layout, epoch=epoch, step_in_epoch=in_epoch),
            "rng": rngs,
            "format": ckpt_io.FORMAT,
        }
        path = ckpt_io.atomic_save(state, ckpt_io.checkpoint_path(run.out, step))
        if epoch_name is not None:
            ckpt_io.link_or_copy(path, ckpt_io.epoch_checkpoint_path(run.out, epoch_name))
        ckpt_io.prune(run.out, run.cfg.keep_last)
    run.env.barrier()


def render(run: Run, step: int, metrics: visualize.MetricsLog | None) -> None:
    """The reconstruction grid of the fixed pictures at ``step`` and the loss curve so far."""
    cfg, env, raw = run.cfg, run.env, run.net.raw
    if not (cfg.fsdp or env.main):  # FSDP's forward needs every rank; otherwise rank 0 draws alone
        return
    if run.viz is None:  # a fixed batch and fixed masks, so that successive pictures are comparable
        imgs = data.center_views(run.data.source, run.data.img_size, 8, cfg.bad_images, run.report_bad)
        noise = torch.rand(len(imgs), raw.num_patches, generator=torch.Generator().manual_seed(cfg.seed))
        run.viz = imgs.to(env.device), noise.to(env.device)  # [n, 3, S, S], [n, L]
    imgs, noise = run.viz
    with torch.no_grad(), run.autocast:
        loss, pred, mask = raw(imgs, cfg.mask_ratio, noise, pred_masked_only=True)  # pred [n, M, p²·3]
    if env.main:
        path = run.out / f"recon-{step:08d}.png"
        visualize.save_reconstructions(path, imgs, pred, mask, raw.patch_size, cfg.norm_pix_loss, step, loss.item())
        metrics.save_loss_curve(run.out / "loss.png")


def archived_epoch(run: Run, step: int) -> int | None:
    """The epoch that ``step`` completes when it gets an epoch-named checkpoint: every ``--save-every-epochs``
    (epoch % N == 0, as the original counts from 0) and the last epoch; else None."""
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    every, done = run.cfg.save_every_epochs, epoch - 1
    return done if in_epoch == 0 and every and (done % every == 0 or done == run.cfg.epochs - 1) else None


def finish(run: Run, step: int, saved: bool, log: visualize.Progress) -> None:
    """The last checkpoint and picture, ``encoder.pth`` with timm keys for fine-tuning, and the closing line."""
    if not saved:
        save(run, step)
    if not (run.cfg.viz_every and step % run.cfg.viz_every == 0):
        render(run, step, log.metrics)
    state = get_model_state_dict(run.net.raw, options=FULL_ON_CPU)
    if run.env.main:
        ckpt_io.atomic_save(
            {"model": encoder_state(state), "args": dataclasses.asdict(run.cfg)}, run.out / "encoder.pth"
        )
        print(log.summary(step, run.out), flush=True)


def _train(cfg: TrainConfig, env: Dist) -> RunResult:
    run = build(cfg, env)
    step = resume(run) if run.resume_path else cfg.start_epoch * run.steps_per_epoch
    announce(run, step)
    metrics = None
    if env.main:
        tb_dir = cfg.log_dir or run.out / "tensorboard"
        metrics = visualize.MetricsLog(run.out, step if run.resume_path else None, cfg.tensorboard, tb_dir)
    bar = env.main and cfg.progress and sys.stdout.isatty()  # a terminal gets a bar; a file or pipe, log lines
    log = visualize.Progress(metrics, step, run.stop_step, run.steps_per_epoch, run.eff_batch, cfg.log_every, bar,
                             lambda: distributed.peak_memory_mb(env.device))  # fmt: skip
    saved = run.resume_path is not None
    try:
        if step == 0:
            render(run, 0, metrics)
        run.net.model.train()
        for done, micro_batches in batches(run, step):
            take_step(run, done, micro_batches)
            step = done + 1
            epoch_name = archived_epoch(run, step)
            saved = epoch_name is not None or (cfg.save_every_steps and step % cfg.save_every_steps == 0)
            viz = cfg.viz_every and step % cfg.viz_every == 0
            if saved or viz or step % cfg.log_every == 0 or step == run.stop_step or run.pending.full:
                read_numbers(run, log)
            if saved:
                save(run, step, epoch_name)
            if viz:
                render(run, step, metrics)
        read_numbers(run, log)
        finish(run, step, saved, log)
    finally:
        log.close()
    return RunResult(step, log.losses, run.out, ckpt_io.latest_checkpoint(run.out), run.net.raw)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ConfigError, ckpt_io.CheckpointError, data.BadImageError, NonFiniteError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            message = str(e)
            if isinstance(e, data.BadImageError):  # from a loader worker: the last line of its traceback
                message = message.strip().splitlines()[-1].split("BadImageError: ")[-1]
            print(f"pretrain: error: {message}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
