"""MAE pretraining on one process, one GPU or many: the original recipe with fastmae's fused model.

Commands (run from the repository root)::

    make pretrain                                   # demo on the embedded images (CPU: small model; GPU: ViT-B)
    python training/pretrain.py --preset demo       # the same, without make
    python training/pretrain.py --help              # every flag (each field of TrainConfig below)

    # one GPU, your images in DIR/train/<class>/*.jpg (torchvision ImageFolder, as the original reads ImageNet)
    python training/pretrain.py --model mae_vit_base_patch16 --data-path DIR --batch-size 256 --norm-pix-loss

    # the paper's ViT-L recipe on 8 GPUs: effective batch 8 × 128 × 4 = 4096, lr = 1.5e-4 · 4096 / 256
    torchrun --nproc_per_node=8 training/pretrain.py --model mae_vit_large_patch16 --data-path /data/imagenet \
        --batch-size 128 --accum-iter 4 --epochs 800 --warmup-epochs 40 --norm-pix-loss --output-dir runs/vitl

    # ViT-H with parameters, gradients and optimizer state sharded (FSDP2) instead of replicated (DDP)
    torchrun --nproc_per_node=8 training/pretrain.py --model mae_vit_huge_patch14 --fsdp --data-path ... ...

    # continue a killed run exactly where its newest checkpoint left it (same command plus --resume; with
    # 'auto' and no checkpoint yet it starts afresh, so a preemptible job can always pass it)
    torchrun --nproc_per_node=8 training/pretrain.py ... --output-dir runs/vitl --resume auto

The original's flag spellings (``--batch_size``, ``--norm_pix_loss``, ``--data_path`` ...) are accepted too.
Outputs in ``--output-dir``: ``checkpoint-<step>.pth`` (the newest ``--keep-last``; the original's keys ``model``,
``optimizer``, ``epoch``, ``scaler``, ``args`` plus ``step``, ``position``, ``rng``), ``encoder.pth`` (timm
``VisionTransformer`` keys under ``model``), ``metrics.jsonl``, ``loss.png``, ``recon-<step>.png``,
``config.json`` and ``tensorboard/`` when TensorBoard is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

import fastmae
from fastmae import checkpoint as ckpt_io
from fastmae import data, schedule, visualize
from fastmae.model import encoder_state


@dataclass
class TrainConfig:
    """Every knob of a run; each field is a command-line flag (``--batch-size`` or ``--batch_size``)."""

    model: str = field(default="mae_vit_large_patch16", metadata={"help": "model name (fastmae.list_configs())"})
    input_size: int | None = field(default=None, metadata={"help": "image side (None: the model's)"})
    mask_ratio: float = field(default=0.75, metadata={"help": "fraction of patches removed"})
    norm_pix_loss: bool = field(default=False, metadata={"help": "per-patch normalized pixel targets"})
    pred_masked_only: bool = field(default=True, metadata={"help": "decode masked patches only (same loss)"})
    impl: str = field(default="auto", metadata={"help": "op implementation", "choices": ("auto", "triton", "eager")})
    data_path: str | None = field(default=None, metadata={"help": "ImageFolder root DIR (DIR/train/<class>/*)"})
    views_per_epoch: int = field(default=1024, metadata={"help": "views in an epoch of the embedded images"})
    batch_size: int = field(default=64, metadata={"help": "images per process per micro-step"})
    accum_iter: int = field(default=1, metadata={"help": "micro-steps accumulated per optimizer step"})
    epochs: int = field(default=400, metadata={"help": "length of the schedule in epochs"})
    warmup_epochs: float = field(default=40, metadata={"help": "linear warm-up length in epochs"})
    blr: float = field(default=schedule.BASE_LR, metadata={"help": "base lr: lr = blr * eff_batch / 256"})
    lr: float | None = field(default=None, metadata={"help": "absolute peak lr (overrides --blr)"})
    min_lr: float = field(default=0.0, metadata={"help": "floor of the cosine decay"})
    weight_decay: float = field(default=schedule.WEIGHT_DECAY, metadata={"help": "AdamW decay (not on biases/1-D)"})
    clip_grad: float | None = field(default=None, metadata={"help": "clip the gradient norm to this value"})
    precision: str = field(
        default="auto",
        metadata={"help": "auto = bf16 on CUDA, fp32 on CPU", "choices": ("auto", "bf16", "fp16", "fp32")},
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fsdp: bool = field(default=False, metadata={"help": "shard with FSDP2 (fully_shard per block) instead of DDP"})
    device: str = field(default="auto", metadata={"help": "auto, cuda or cpu", "choices": ("auto", "cuda", "cpu")})
    num_workers: int = field(default=-1, metadata={"help": "loader processes per rank (-1: from the CPU count)"})
    pin_mem: bool = field(default=True, metadata={"help": "pinned host memory for batches (CUDA only)"})
    seed: int = field(default=0, metadata={"help": "seed; rank r draws data and masks with seed + r"})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "checkpoints, metrics and pictures"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint path, or 'auto' for the newest"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    save_every_epochs: int = field(default=1, metadata={"help": "checkpoint every N epochs (0: off)"})
    save_every_steps: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps (0: off)"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept (0: all)"})
    log_every: int = field(default=10, metadata={"help": "metrics record every N optimizer steps"})
    viz_every: int = field(default=1000, metadata={"help": "reconstruction PNG every N steps (0: only at the end)"})
    tensorboard: bool = field(default=True, metadata={"help": "TensorBoard scalars when it is installed"})
    progress: bool = field(default=True, metadata={"help": "progress bar on rank 0"})
    preset: str | None = field(default=None, metadata={"help": "defaults for a named run", "choices": ("demo",)})


def demo_preset(cuda: bool) -> dict:
    """``--preset demo``: minutes on the embedded images; the model size follows the hardware."""
    demo = dict(output_dir="runs/demo", norm_pix_loss=False, min_lr=1e-5, save_every_epochs=0, warmup_epochs=1)
    if not cuda:  # 2 CPU cores: the 64-px toy model, 12 epochs × 16 steps of 64 views
        demo.update(model="mae_vit_nano_patch8", batch_size=64, views_per_epoch=1024, epochs=12, blr=8e-3)
        return dict(demo, viz_every=64, save_every_steps=64, log_every=1)
    demo.update(model="mae_vit_base_patch16", batch_size=128, views_per_epoch=4096, epochs=30, blr=1.5e-3)
    return dict(demo, warmup_epochs=3, viz_every=240, save_every_steps=240, log_every=5)


PRESETS = {"demo": demo_preset}


class ConfigError(ValueError):
    """A flag value that cannot work; reported before anything heavy starts."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`TrainConfig` field (plus the original's underscore spelling)."""
    parser = argparse.ArgumentParser(
        description="MAE pretraining (fastmae).", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if typing.get_args(kind) else kind
        kw = {"dest": f.name, "help": f.metadata.get("help", "")}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["choices"] = f.metadata.get("choices")
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **kw)
        if "_" in f.name:  # the original's spelling, hidden from --help
            parser.add_argument(f"--{f.name}", **{**kw, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS})
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config from the command line: dataclass defaults < ``--preset`` values < explicit flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset](torch.cuda.is_available()))
        args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        validate(cfg)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the first flag that cannot work."""
    checks = [
        (cfg.model in fastmae.list_configs(), f"--model {cfg.model!r} is unknown; known: {fastmae.list_configs()}"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.accum_iter >= 1, f"--accum-iter must be >= 1, got {cfg.accum_iter}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}"),
        (0 <= cfg.warmup_epochs <= cfg.epochs, f"--warmup-epochs must be in [0, epochs], got {cfg.warmup_epochs}"),
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
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_file():
        raise ConfigError(f"--resume {cfg.resume!r}: no such file (or pass 'auto' for the newest in --output-dir)")


def use_cuda(cfg: TrainConfig) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


@dataclass
class Dist:
    """This process's place in the job (torchrun's environment; a lone process is rank 0 of 1)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and pick this process's device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda(cfg) else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or "RANK" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, device)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from non-negative integer keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def cpus_per_rank() -> int:
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def num_workers(cfg: TrainConfig, device: torch.device) -> int:
    if cfg.num_workers >= 0:
        return cfg.num_workers
    per_rank = cpus_per_rank()
    return min(8, max(1, per_rank - 1)) if device.type == "cuda" else min(1, per_rank - 1)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        ConfigError: a flag that cannot work; CheckpointError: an unusable ``--resume`` file;
        NonFiniteError: the loss or gradient norm became inf/NaN (parameters are left as of the step before).
    """
    validate(cfg)
    env = setup_distributed(cfg)
    try:
        return _train(cfg, env)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def build_data(cfg: TrainConfig, env: Dist):
    """Source, views, sampler and loader. Rank r reads its DistributedSampler share; its views use seed + r."""
    try:
        source = data.open_source(cfg.data_path)
    except ValueError as e:
        raise ConfigError(f"--data-path: {e}") from e
    img_size = cfg.input_size or fastmae.get_config(cfg.model).img_size
    length = cfg.views_per_epoch if cfg.data_path is None else None
    dataset = data.RandomViews(source, img_size, seed=cfg.seed + env.rank, length=length)
    sampler = data.ResumableDistributedSampler(dataset, env.world, env.rank, seed=cfg.seed)
    workers = num_workers(cfg, env.device)
    pin = cfg.pin_mem and env.device.type == "cuda"
    loader = data.build_loader(dataset, sampler, cfg.batch_size, workers, pin, seed=cfg.seed + env.rank)
    if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # leave the loader workers their cores
        torch.set_num_threads(max(1, cpus_per_rank() - workers))
    return source, dataset, sampler, loader, img_size


def build_model(cfg: TrainConfig, env: Dist):
    """The model, the same initial weights on every rank; wrapped in DDP, or sharded with FSDP2 per block then
    at the root. Returns ``(raw, model, ddp)``: the MAE module (sharded in place under FSDP), what the training
    step calls (possibly compiled), and the DDP wrapper or None."""
    seed_everything(cfg.seed)
    overrides = {"img_size": cfg.input_size} if cfg.input_size else {}
    raw = fastmae.create_model(cfg.model, norm_pix_loss=cfg.norm_pix_loss, impl=cfg.impl, **overrides)
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
        model = torch.compile(model)
    return raw, model, ddp


def _train(cfg: TrainConfig, env: Dist) -> RunResult:
    out = Path(cfg.output_dir)
    device, cuda = env.device, env.device.type == "cuda"
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temps(out)
    barrier()
    resume_path = ckpt_io.latest_checkpoint(out) if cfg.resume == "auto" else cfg.resume
    if resume_path is None and ckpt_io.list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints of another run: pass --resume auto or a new --output-dir")

    source, dataset, sampler, loader, img_size = build_data(cfg, env)
    steps_per_epoch = sampler.num_samples // cfg.batch_size // cfg.accum_iter
    if steps_per_epoch == 0:
        raise ConfigError(
            f"an epoch of {len(dataset)} images gives {sampler.num_samples} per process, fewer than one optimizer "
            f"step of batch_size × accum_iter = {cfg.batch_size * cfg.accum_iter}; lower them or add data"
        )
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = min(total_steps, cfg.max_steps or total_steps)
    eff_batch = cfg.batch_size * cfg.accum_iter * env.world
    peak_lr = cfg.lr if cfg.lr is not None else schedule.scaled_lr(cfg.blr, eff_batch)

    raw, model, ddp = build_model(cfg, env)
    seed_everything(cfg.seed + env.rank)
    optimizer = schedule.build_adamw(raw, lr=peak_lr, weight_decay=cfg.weight_decay, fused=cuda)
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    trainable = [p for p in raw.parameters() if p.requires_grad]
    # Full (unsharded) state dicts, keyed by parameter name, the same for a plain, DDP or FSDP model.
    full, full_on_cpu = StateDictOptions(full_state_dict=True), StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Where a step lies in the data stream: a checkpoint resumes exactly when this layout is unchanged.
    layout = dict(
        steps_per_epoch=steps_per_epoch,
        world_size=env.world,
        batch_size=cfg.batch_size,
        accum_iter=cfg.accum_iter,
        epoch_len=len(dataset),
        seed=cfg.seed,
    )

    start_step = 0
    if resume_path is not None:
        ck = ckpt_io.load_checkpoint(resume_path)
        shapes = {k: torch.empty(v.shape, device="meta") for k, v in raw.state_dict().items()}  # global shapes
        ckpt_io.check_model_state(ck["model"], shapes, resume_path)
        try:
            set_model_state_dict(raw, ck["model"], options=full)
            set_optimizer_state_dict(raw, optimizer, ck["optimizer"], options=full)
            if ck["scaler"]:
                scaler.load_state_dict(ck["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise ckpt_io.CheckpointError(f"checkpoint {str(resume_path)!r} does not fit this run: {e}") from e
        pos = ck["position"]
        if all(pos.get(k) == v for k, v in layout.items()):
            start_step = ck["step"]
            if len(ck.get("rng", [])) == env.world:
                ckpt_io.set_rng_state(ck["rng"][env.rank])
        elif pos["step_in_epoch"] == 0:  # another layout (e.g. more GPUs) can start at an epoch boundary
            start_step = pos["epoch"] * steps_per_epoch
        else:
            raise ckpt_io.CheckpointError(
                f"checkpoint {str(resume_path)!r} stopped mid-epoch with {pos}; this run has {layout}: an exact "
                "mid-epoch resume needs the same layout (or resume from an end-of-epoch checkpoint)"
            )
    if env.main:
        resolved = dict(eff_batch=eff_batch, peak_lr=peak_lr, total_steps=total_steps, precision=precision)
        resolved.update(layout, device=str(device), data=data.describe(source))
        (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), **resolved}, indent=2))
        mode = "FSDP" if cfg.fsdp else "DDP" if ddp else "single process"
        print(
            f"fastmae pretrain: {cfg.model} ({img_size}px) on {env.world}×{device.type} ({mode}, {precision}); "
            f"data: {data.describe(source)}; eff. batch {eff_batch}, peak lr {peak_lr:.3g}, {steps_per_epoch} "
            f"steps/epoch, steps {start_step}→{stop_step}{f', resumed from {resume_path}' if resume_path else ''}; "
            f"output {out}",
            flush=True,
        )

    def save(step: int) -> None:
        """Every rank takes part in gathering; rank 0 writes ``checkpoint-<step>.pth`` and prunes old ones."""
        model_state = get_model_state_dict(raw, options=full_on_cpu)
        optim_state = get_optimizer_state_dict(raw, optimizer, options=full_on_cpu)
        rngs = [ckpt_io.rng_state()]
        if dist.is_initialized():
            rngs = [None] * env.world
            dist.all_gather_object(rngs, ckpt_io.rng_state())
        if env.main:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "epoch": epoch - 1,  # the last completed epoch, as the original counts
                "scaler": scaler.state_dict(),
                "args": dataclasses.asdict(cfg),
                "step": step,
                "position": dict(layout, epoch=epoch, step_in_epoch=in_epoch),
                "rng": rngs,
                "format": ckpt_io.FORMAT,
            }
            ckpt_io.atomic_save(state, ckpt_io.checkpoint_path(out, step))
            ckpt_io.prune(out, cfg.keep_last)
        barrier()

    # A fixed batch and fixed masks, so that the reconstructions of successive pictures are comparable.
    viz_imgs = data.center_views(source, img_size, 8).to(device)  # [n, 3, S, S]
    viz_noise = torch.rand(len(viz_imgs), raw.num_patches, generator=torch.Generator().manual_seed(cfg.seed))

    def render(step: int) -> None:
        if not (cfg.fsdp or env.main):  # FSDP's forward needs every rank; otherwise rank 0 draws alone
            return
        with torch.no_grad(), autocast:
            _, pred, mask = raw(viz_imgs, cfg.mask_ratio, viz_noise.to(device))  # pred [n, L, p²·3], mask [n, L]
        if env.main:
            path = out / f"recon-{step:08d}.png"
            visualize.save_reconstructions(path, viz_imgs, pred, mask, raw.patch_size, cfg.norm_pix_loss)
            metrics.save_loss_curve(out / "loss.png")

    metrics = visualize.MetricsLog(out, start_step if resume_path else None, cfg.tensorboard) if env.main else None
    bar = tqdm(total=stop_step, initial=start_step, disable=not (env.main and cfg.progress), dynamic_ncols=True)
    mask_gen = torch.Generator(device=device)
    losses: list[tuple[int, float]] = []
    step, last_saved = start_step, start_step if resume_path else None
    window = {"loss": 0.0, "n": 0, "t": time.perf_counter()}
    try:
        if step == 0:
            render(0)
        model.train()
        while step < stop_step:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, start=in_epoch * cfg.accum_iter * cfg.batch_size)  # skip what was consumed
            batches = iter(loader)
            while in_epoch < steps_per_epoch and step < stop_step:
                t = epoch + in_epoch / steps_per_epoch
                lr = schedule.lr_at(t, peak_lr, cfg.epochs, cfg.warmup_epochs, cfg.min_lr)
                schedule.set_lr(optimizer, lr)
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.accum_iter):
                    imgs = next(batches).to(device, non_blocking=True)  # [B, 3, S, S]
                    # The masks of (rank, step, micro-step) are fixed by the seed: the same after a resume.
                    mask_gen.manual_seed(derive_seed(cfg.seed + env.rank, step, micro))
                    noise = torch.rand(imgs.shape[0], raw.num_patches, generator=mask_gen, device=device)  # [B, L]
                    last = micro == cfg.accum_iter - 1
                    if cfg.fsdp:
                        raw.set_requires_gradient_sync(last)
                    with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                        with autocast:
                            loss, _, _ = model(imgs, cfg.mask_ratio, noise, cfg.pred_masked_only)
                        scaler.scale(loss / cfg.accum_iter).backward()
                    loss_sum += loss.detach().float()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
                if cfg.clip_grad:
                    torch.nn.utils.clip_grads_with_norm_(trainable, cfg.clip_grad, grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                    grad_norm = grad_norm.full_tensor()
                loss_mean = loss_sum / cfg.accum_iter
                if dist.is_initialized():
                    dist.all_reduce(loss_mean)  # a NaN on any rank reaches every rank: all stop together
                    loss_mean = loss_mean / env.world
                loss_value, norm_value = torch.stack([loss_mean, grad_norm.float()]).tolist()
                if not math.isfinite(loss_value) or (precision != "fp16" and not math.isfinite(norm_value)):
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    raise NonFiniteError(
                        f"non-finite {what} (loss {loss_value}, grad norm {norm_value}) at step {step + 1} "
                        f"(epoch {epoch}, lr {lr:.3g}); stopped before updating the weights. Last checkpoint: "
                        f"{ckpt_io.latest_checkpoint(out) or 'none'}. Try a lower --blr, --clip-grad or fp32."
                    )
                scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step, in_epoch = step + 1, in_epoch + 1
                losses.append((step, loss_value))
                bar.update(1)
                window["loss"] += loss_value
                window["n"] += 1
                if env.main and (step % cfg.log_every == 0 or step == stop_step):
                    img_s = window["n"] * eff_batch / max(time.perf_counter() - window["t"], 1e-9)
                    record = dict(step=step, epoch=round(step / steps_per_epoch, 4), lr=lr)
                    record.update(loss=window["loss"] / window["n"], grad_norm=norm_value, img_per_s=img_s)
                    record.update(peak_mem_mb=peak_memory_mb(device), time=time.time())
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                    window.update(loss=0.0, n=0, t=time.perf_counter())
                epoch_done = in_epoch == steps_per_epoch and cfg.save_every_epochs
                if (cfg.save_every_steps and step % cfg.save_every_steps == 0) or (
                    epoch_done and (epoch + 1) % cfg.save_every_epochs == 0
                ):
                    save(step)
                    last_saved = step
                if cfg.viz_every and step % cfg.viz_every == 0:
                    render(step)
            del batches
        if last_saved != step:
            save(step)
        if not (cfg.viz_every and step % cfg.viz_every == 0):
            render(step)
        state = get_model_state_dict(raw, options=full_on_cpu)
        if env.main:  # the encoder alone, with timm VisionTransformer keys, for fine-tuning
            ckpt_io.atomic_save({"model": encoder_state(state), "args": dataclasses.asdict(cfg)}, out / "encoder.pth")
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if env.main and losses:
        print(f"done: step {step}, loss {losses[0][1]:.4f} → {losses[-1][1]:.4f}; outputs in {out}", flush=True)
    return RunResult(step, losses, out, ckpt_io.latest_checkpoint(out), raw)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ConfigError, ckpt_io.CheckpointError, NonFiniteError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
