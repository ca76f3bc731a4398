"""The training step without host synchronization (fastmae/step.py) and its CUDA-graph capture.

On the CPU: the training loop, once its first step is launched, reads no tensor back (no ``.item()``, ``.tolist()``,
``nonzero``, boolean indexing, Python ``bool``/``float``/``int`` of a tensor) except at its boundaries (reading the
steps' numbers, saving, pictures) and while loading data, shown by a spy on those tensor methods that is also shown
to catch an added read; a non-finite step found late is named, with nothing saved after it. On a GPU: the same loop
and the step with the kernels under ``torch.cuda.set_sync_debug_mode("error")``, the captured step equal to the eager
one bit for bit, and training with ``--cuda-graphs`` resuming exactly.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from fastmae import checkpoint as ck
from fastmae import masking
from fastmae import step as steps

from .test_training import one_thread, poison_fifth_loss, pretrain, tiny  # noqa: F401 (one_thread: autouse fixture)

READS = ("item", "tolist", "cpu", "numpy", "nonzero", "argwhere", "__bool__", "__float__", "__int__", "__index__")


class ReadSpy:
    """Records each read of a tensor's value on the host while :attr:`active`: the methods of :data:`READS`,
    ``torch.nonzero``/``torch.argwhere``, and indexing with a boolean tensor."""

    def __init__(self, monkeypatch):
        self.active, self.seen = False, []
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._spy(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "argwhere"):
            monkeypatch.setattr(torch, name, self._spy(f"torch.{name}", getattr(torch, name)))
        for name in ("__getitem__", "__setitem__"):
            original = getattr(torch.Tensor, name)

            def indexed(t, index, *rest, _name=name, _original=original):
                parts = index if isinstance(index, tuple) else (index,)
                if self.active and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                    self.seen.append(f"boolean {_name}")
                return _original(t, index, *rest)

            monkeypatch.setattr(torch.Tensor, name, indexed)

    def _spy(self, name, original):
        def spy(*args, **kwargs):
            if self.active:
                self.seen.append(name)
            return original(*args, **kwargs)

        return spy

    @contextlib.contextmanager
    def paused(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before


class SyncGuard:
    """The same interface on CUDA: while :attr:`active`, any synchronizing CUDA call raises."""

    def __init__(self):
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = value
        torch.cuda.set_sync_debug_mode("error" if value else "default")

    paused = ReadSpy.paused


def guard_the_loop(monkeypatch, guard):
    """From the second step on (the first one compiles kernels and creates the optimizer's state), ``guard``
    watches everything the training loop does except loading data and its boundaries: reading the steps' numbers,
    saving, pictures and the end of the run."""
    take, launched = pretrain.take_step, []

    def take_step(*args, **kwargs):
        launched.append(True)
        guard.active = len(launched) > 1
        return take(*args, **kwargs)

    monkeypatch.setattr(pretrain, "take_step", take_step)

    def boundary(fn):
        def paused(*args, **kwargs):
            with guard.paused():
                return fn(*args, **kwargs)

        return paused

    for name in ("read_numbers", "save", "render", "finish"):
        monkeypatch.setattr(pretrain, name, boundary(getattr(pretrain, name)))
    batches = pretrain.batches

    def loading(run, start):
        it = batches(run, start)
        while True:
            with guard.paused():
                item = next(it, None)
            if item is None:
                return
            yield item

    monkeypatch.setattr(pretrain, "batches", loading)


def fused_adamw(monkeypatch):
    """AdamW fused on the CPU too, as on CUDA (the unfused CPU AdamW reads its step count on the host each step:
    a CPU number, no device to wait for)."""
    build = pretrain.schedule.build_adamw
    monkeypatch.setattr(pretrain.schedule, "build_adamw", lambda *a, fused=None, **kw: build(*a, fused=True, **kw))


GUARDED = dict(max_steps=6, log_every=3, save_every_steps=4, viz_every=5, clip_grad=1.0, norm_pix_loss=True)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_the_loop_reads_nothing_between_boundaries(tmp_path, monkeypatch, decode):
    fused_adamw(monkeypatch)
    spy = ReadSpy(monkeypatch)
    guard_the_loop(monkeypatch, spy)
    try:
        result = pretrain.train(tiny(tmp_path, decode=decode, **GUARDED))
    finally:
        spy.active = False
    assert spy.seen == []
    assert [s for s, _ in result.losses] == list(range(1, 7))
    assert [s for s, _ in ck.list_checkpoints(result.output_dir)] == [4, 6]


def test_the_spy_catches_a_read_in_the_step_or_the_loop(tmp_path, monkeypatch):
    fused_adamw(monkeypatch)
    spy = ReadSpy(monkeypatch)
    guard_the_loop(monkeypatch, spy)
    compute = steps.TrainStep.compute

    def reading(self, images):
        out = compute(self, images)
        return out if out[0].item() else out  # a per-step read of the loss

    monkeypatch.setattr(steps.TrainStep, "compute", reading)
    archived = pretrain.archived_epoch
    monkeypatch.setattr(pretrain, "archived_epoch", lambda run, step: archived(run, step) if run.pending.values[0, 0]
                        else archived(run, step))  # fmt: skip
    try:
        pretrain.train(tiny(tmp_path, max_steps=3, log_every=3))
    finally:
        spy.active = False
    assert spy.seen == ["item", "__bool__"] * 2  # steps 2 and 3


def test_random_masking_reads_nothing(monkeypatch):
    spy = ReadSpy(monkeypatch)
    spy.active = True
    try:
        m = masking.random_masking(3, 16, 0.75, noise=torch.rand(3, 16))
        masking.random_masking(2, 49, 0.6)
    finally:
        spy.active = False
    assert spy.seen == [] and m.ids_keep.shape == (3, 4) and m.mask.sum(1).tolist() == [12.0] * 3


def test_a_non_finite_step_found_late_is_named_and_nothing_is_saved_after_it(tmp_path, monkeypatch):
    calls = poison_fifth_loss(monkeypatch)  # step 3
    cfg = tiny(tmp_path, max_steps=8, log_every=4, save_every_steps=2)  # numbers read at steps 2, 4, 6, 8
    with pytest.raises(pretrain.NonFiniteError) as info:
        pretrain.train(cfg)
    message = str(info.value)
    assert re.search(r"non-finite loss \(loss nan, grad norm nan\) at step 3 \(epoch 0, lr [^)]+\); nothing was "
                     r"saved after step 2\. Last checkpoint: .*checkpoint-00000002\.pth", message), message  # fmt: skip
    assert calls["n"] == 8  # found when step 4 was read: the steps ran on without waiting for their numbers
    assert [s for s, _ in ck.list_checkpoints(cfg.output_dir)] == [2]  # step 4's checkpoint was never written
    state = ck.load_checkpoint(ck.checkpoint_path(cfg.output_dir, 2))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_pending_keeps_steps_on_the_device_until_read():
    pending = steps.Pending(3, torch.device("cpu"))
    assert steps.Pending(10**9, torch.device("cpu")).capacity == steps.MAX_PENDING
    for s in (1, 2, 3):
        pending.add(s, torch.tensor([s / 10, s * 2.0]), lr=s * 1e-3, bad_images=s - 1)
    assert pending.full
    with pytest.raises(RuntimeError, match="read them first"):
        pending.add(4, torch.zeros(2), 0.0, 0)
    got = pending.read()
    assert got == [steps.StepNumbers(s, pytest.approx(s / 10), s * 2.0, s * 1e-3, s - 1) for s in (1, 2, 3)]
    assert len(pending) == 0 and pending.read() == []


def test_checkpoints_hold_plain_optimizer_groups():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=torch.tensor(2e-3), capturable=True)
    plain = steps.plain_param_groups(opt.state_dict())
    assert plain["param_groups"][0]["lr"] == pytest.approx(2e-3) and type(plain["param_groups"][0]["lr"]) is float
    assert plain["param_groups"][0]["capturable"] is False
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["capturable"]  # untouched


@pytest.mark.parametrize(
    "flags,world,message",
    [
        (["--compile-mode", "reduce-overhead"], 1, "--compile-mode needs --compile"),
        (["--cuda-graphs", "--fsdp"], 1, "--cuda-graphs runs in one process"),
        (["--cuda-graphs"], 2, "--cuda-graphs runs in one process"),
        (["--cuda-graphs", "--precision", "fp16"], 1, "--cuda-graphs does not take fp16's GradScaler"),
        (["--cuda-graphs", "--compile"], 1, "--cuda-graphs captures the uncompiled step"),
    ],
)
def test_cuda_graph_flags_that_cannot_work_are_refused(flags, world, message, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--model", "mae_vit_nano_patch8", "--cuda-graphs", "--device", "cpu"])
    assert "--cuda-graphs needs CUDA" in capsys.readouterr().err
    monkeypatch.setattr(pretrain, "use_cuda", lambda cfg: True)  # as if on a GPU
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--model", "mae_vit_nano_patch8", *flags])
    assert message in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pretrain.parse_args(["--model", "mae_vit_nano_patch8", "--cuda-graphs"]).cuda_graphs


def test_graphed_step_refuses_what_it_cannot_capture():
    model = pretrain.fastmae.create_model("mae_vit_nano_patch8", impl="eager")
    opt = pretrain.schedule.build_adamw(model, 1e-3)
    step = steps.TrainStep(model, model, opt, torch.amp.GradScaler("cpu", enabled=False), None, 0.75, True, 1, None,
                           torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        steps.GraphedStep(step)


@pytest.mark.parametrize("fresh", [True, False])
def test_undone_puts_parameters_and_adamw_state_back_in_place(fresh):
    """What a captured step's warm-up relies on: the same tensors afterwards, with their values before it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)

    def train_once():
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if not fresh:
        train_once()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}
    with steps.undone(params, opt):
        for _ in range(3):
            train_once()
        objects = {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in params}
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for p in params:
        assert {k: id(v) for k, v in opt.state[p].items()} == objects[id(p)]  # in place
        for key, value in opt.state[p].items():
            assert torch.equal(value, state[id(p)][key] if not fresh else torch.zeros_like(value)), key
    if fresh:  # a zeroed state trains exactly as a fresh one
        fresh_model = torch.nn.Linear(4, 3)
        fresh_model.load_state_dict(model.state_dict())
        fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2, fused=True)
        torch.manual_seed(1)
        train_once()
        torch.manual_seed(1)
        fresh_model(torch.randn(5, 4)).square().sum().backward()
        fresh_opt.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


# ----------------------------------------------------------------------------------------------------------- CUDA


def cuda_step(precision: str = "bf16", impl: str = "auto", accum_iter: int = 2, seed: int = 0):
    """A nano MAE's TrainStep on CUDA (fused AdamW, clipping on), and its 2×accum_iter fixed batches."""
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    model = pretrain.fastmae.create_model("mae_vit_nano_patch8", impl=impl, norm_pix_loss=True).to(dev)
    opt = pretrain.schedule.build_adamw(model, 1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    step = steps.TrainStep(model, model, opt, scaler, amp, 0.75, True, accum_iter, 1.0, dev)
    batches = [[torch.randn(8, 3, 64, 64, device=dev) for _ in range(accum_iter)] for _ in range(2)]
    return model, step, batches


def seeds(i: int, accum_iter: int = 2) -> list[int]:
    return [1000 * i + m for m in range(accum_iter)]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_step_with_the_kernels_does_not_sync(precision):
    _, step, batches = cuda_step(precision)
    pending = steps.Pending(8, torch.device("cuda"))
    for i in range(2):  # first calls: kernels compile, AdamW creates its state
        step(batches[i % 2], seeds(i), 1e-3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(2, 5):
            pending.add(i, step(batches[i % 2], seeds(i), 1e-3), 1e-3, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.tensor([n.loss for n in pending.read()])))


@pytest.mark.cuda
def test_cuda_training_loop_does_not_sync(tmp_path, monkeypatch):
    guard = SyncGuard()
    guard_the_loop(monkeypatch, guard)
    try:
        result = pretrain.train(tiny(tmp_path, device="cuda", decode="cpu", **GUARDED))
    finally:
        guard.active = False
    assert len(result.losses) == 6


@pytest.mark.cuda
def test_cuda_graph_step_equals_the_eager_step():
    model_e, eager, batches = cuda_step()
    model_g, graphed_step, _ = cuda_step()
    graphed = steps.GraphedStep(graphed_step)
    for group in eager.optimizer.param_groups:  # the captured step's AdamW settings (see fastmae/step.py)
        group["lr"], group["capturable"] = torch.tensor(1e-3, device="cuda"), True
    lrs = [1e-3, 2e-3, 5e-4, 1e-3]
    for i, lr in enumerate(lrs):
        a = eager(batches[i % 2], seeds(i), lr).clone()
        b = graphed(batches[i % 2], seeds(i), lr).clone()
        assert torch.equal(a, b), (i, a, b)
    for (name, p), q in zip(model_e.named_parameters(), model_g.parameters()):
        assert torch.equal(p, q), (name, (p - q).abs().max())
    for p, q in zip(model_e.parameters(), model_g.parameters()):
        if p.requires_grad:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(eager.optimizer.state[p][key], graphed_step.optimizer.state[q][key]), key
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = graphed(batches[0], seeds(9), 1e-3)  # a replay, its inputs and lr: no synchronization
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@pytest.mark.cuda
def test_cuda_graphs_training_matches_eager_and_resumes_exactly(tmp_path):
    cuda = dict(device="cuda", decode="cpu")  # the step does not depend on the input path
    eager = pretrain.train(tiny(tmp_path, "eager", max_steps=8, **cuda))
    straight = pretrain.train(tiny(tmp_path, "straight", cuda_graphs=True, max_steps=8, **cuda))
    pretrain.train(tiny(tmp_path, "split", cuda_graphs=True, max_steps=4, **cuda))
    resumed = pretrain.train(tiny(tmp_path, "split", cuda_graphs=True, max_steps=8, resume="auto", **cuda))
    assert resumed.losses == straight.losses[4:]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    # The same kernels in the same order; AdamW's float32 learning rate makes the last bits differ.
    torch.testing.assert_close([v for _, v in straight.losses], [v for _, v in eager.losses], rtol=1e-3, atol=0)
    state = ck.load_checkpoint(straight.checkpoint)
    assert all(type(g["lr"]) is float and not g["capturable"] for g in state["optimizer"]["param_groups"])


@pytest.mark.cuda
def test_cuda_compile_reduce_overhead_trains(tmp_path):
    cfg = tiny(tmp_path, device="cuda", decode="cpu", compile=True, compile_mode="reduce-overhead", max_steps=6)
    result = pretrain.train(cfg)
    assert all(torch.isfinite(torch.tensor([loss for _, loss in result.losses])))


@pytest.mark.cuda
def test_cuda_gpu_decode_reads_no_device_value(tmp_path):
    """The GPU input path: outside torchvision's JPEG decoder, turning a loader batch into views reads only the
    batch's host-side metadata."""
    from fastmae import data, gpu_data

    views = gpu_data.EncodedViews(data.EmbeddedImages(), 64, seed=0, length=8)
    batch = gpu_data.collate_encoded([views.sample(0, i) for i in range(8)])
    decoder = gpu_data.ViewDecoder(views, "cuda")
    decode = decoder.decode_jpegs

    def unguarded(files):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return decode(files)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    decoder.decode_jpegs = unguarded
    decoder(batch)  # first call: the views kernel compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = decoder(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.images.shape == (8, 3, 64, 64) and out.images.is_cuda
