"""Every Triton launch of an MAE pretraining step at the paper's shapes, captured from fastmae's own launchers.

:func:`capture_mae` runs, for ViT-B/16, ViT-L/16 and ViT-H/14 at batch 256 (mask ratio 0.75), each fused op
forward and backward on CPU tensors inside :func:`tests.compile_harness.capture_launches`, so the recorded
launches (kernel, specialization, launch options, grid) are the launchers' own: nothing about tiles, configs or
argument values is restated here. What this module states is how MAE calls the ops:

* the inputs' shapes and layouts, built as the model builds them: masks from :func:`fastmae.masking.random_masking`
  (``ids_keep`` is a strided view of the shuffle), ``pred`` of the loss as ``decoder_pred(x)[:, 1:]`` (a view) or,
  with ``pred_masked_only`` (the training script's default), the masked rows only; gradients contiguous;
* two precision modes: ``amp``, MAE's recipe (fp32 parameters and images under bf16 autocast: the Linear outputs
  ``qkv``, fc1's, fc2's, ``proj``'s, ``decoder_embed(x)`` and ``decoder_pred(x)`` are bf16, the patch-embedding and
  decoder-input outputs fp32 because the positional tables are fp32, and so is the residual stream the LayerNorms
  add to, so are their gradients); ``bf16``, a bf16 model without autocast (everything bf16). Attention sees bf16
  ``qkv`` in both, so it is captured once per model.
* each LayerNorm as the blocks call it (:func:`fastmae.layers.add_norm`): ``plain`` (no residual add: a stack's
  first norm), ``residual`` (x + branch, x_new's own gradient coming back from the next add) and ``final`` (the
  encoder's last add and norm, output in the residual stream's dtype; the decoder's final norm, without an add, on
  the masked rows only as with ``pred_masked_only``); each GELU with fc1's bias (``bias``, the default) and without
  (``plain``).
* ``norm_pix_loss=True`` (the paper's recipe) for the loss, on both its full-prediction and masked-rows paths,
  eagerly (the forward forms the gradient) and as under ``torch.compile`` (``/compiled``: the backward recomputes
  it; ``masked_mse.form_gradient``);
* the input views of the GPU data path (``--decode gpu``): 256 views at the model's size, written in the model's
  input dtype (fp32 under autocast, bf16 for a bf16 model), of ImageNet-sized and of 12-megapixel photos.

The public ops are called, inside :func:`fastmae.kernels._common.recording_launches` (which lets them take CPU
tensors without the interpreter and read no values back); autocast is the tensors' device's. The views are made
by their launcher, which takes the decoded images as they come from the decoder. Launches that MAE
never makes but that the ops make for other callers (``imgs`` requiring grad: the patch embedding's image
gradient; a learned decoder ``pos_embed``) are captured too, tagged ``unused="unused in MAE"``.
"""

from __future__ import annotations

MODELS = {"vit_b16": "mae_vit_base_patch16", "vit_l16": "mae_vit_large_patch16", "vit_h14": "mae_vit_huge_patch14"}
MODES = ("bf16", "amp")
BATCH = 256
MASK_RATIO = 0.75
NORM_PIX_LOSS = True


def _empty(*shape, dtype, device, grad=False):
    """Uninitialized: values do not change the compiled code (shapes, strides and alignment do)."""
    import torch

    return torch.empty(*shape, dtype=dtype, device=device).requires_grad_(grad)


def _backward(outs, *inputs) -> None:
    """Run the backward of ``outs`` (a tensor or a tuple) for ``inputs`` (the gradients are returned, not
    accumulated: no copy of them is made)."""
    import torch

    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.empty(o.shape, dtype=o.dtype, device=o.device) if o.dim() else None for o in outs]
    torch.autograd.grad(outs, [t for t in inputs if t is not None and t.requires_grad], grads)


def _dtypes(mode: str):
    """(the residual stream's and the parameters' dtype, the Linear outputs' dtype) in ``mode``."""
    import torch

    return (torch.bfloat16 if mode == "bf16" else torch.float32), torch.bfloat16


def _patch_embed(cfg, masking, mode: str, img_grad: bool = False) -> None:
    import torch

    from fastmae.kernels.patch_embed import patch_embed

    dt, _ = _dtypes(mode)
    n, c, img, p, d = BATCH, cfg.in_chans, cfg.img_size, cfg.patch_size, cfg.embed_dim
    num_patches = (img // p) ** 2
    dev = masking.mask.device
    imgs = _empty(n, c, img, img, dtype=dt, device=dev, grad=img_grad)
    weight, bias = _empty(d, c, p, p, dtype=dt, device=dev, grad=True), _empty(d, dtype=dt, device=dev, grad=True)
    pos = _empty(1, 1 + num_patches, d, dtype=dt, device=dev)
    cls = _empty(1, 1, d, dtype=dt, device=dev, grad=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mode == "amp"):  # the GEMM's compute dtype
        out = patch_embed(imgs, masking.ids_keep, weight, bias, pos, cls)
    _backward(out, imgs, weight, bias, cls)


def _attention(tokens: int, dim: int, heads: int, device) -> None:
    import torch

    from fastmae.kernels.attention import attention

    qkv = _empty(BATCH, tokens, 3 * dim, dtype=torch.bfloat16, device=device, grad=True)  # [B, N, 3·D], qkv Linear's
    _backward(attention(qkv, heads), qkv)


def _loss(cfg, masking, mode: str, rows: bool, compiled: bool = False) -> None:
    from unittest import mock

    import torch

    from fastmae.kernels import masked_mse as module
    from fastmae.kernels.masked_mse import masked_mse

    if compiled:  # what tracing under torch.compile decides, without tracing
        with mock.patch.object(module, "form_gradient", lambda: False):
            _loss(cfg, masking, mode, rows)
        return

    dt, lt = _dtypes(mode)
    n, c, img, p = BATCH, cfg.in_chans, cfg.img_size, cfg.patch_size
    num_patches = (img // p) ** 2
    dev = masking.mask.device
    imgs = _empty(n, c, img, img, dtype=dt, device=dev)
    if rows:
        masked = num_patches - masking.ids_keep.shape[1]
        ids = torch.argsort(masking.mask, dim=1, descending=True, stable=True)[:, :masked]  # [N, M]
        pred = _empty(n, masked, p * p * c, dtype=lt, device=dev, grad=True)  # [N, M, p²C]
        _backward(masked_mse(pred, imgs, None, p, NORM_PIX_LOSS, ids=ids), pred)
    else:
        full = _empty(n, 1 + num_patches, p * p * c, dtype=lt, device=dev, grad=True)  # [N, 1+L, p²C]
        _backward(masked_mse(full[:, 1:, :], imgs, masking.mask, p, NORM_PIX_LOSS), full)


def _decoder_input(cfg, masking, mode: str, pos_grad: bool = False) -> None:
    from fastmae.kernels.decoder_assembly import decoder_assembly

    pt, lt = _dtypes(mode)
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    kept, dd, dev = masking.ids_keep.shape[1], cfg.decoder_embed_dim, masking.mask.device
    x = _empty(BATCH, 1 + kept, dd, dtype=lt, device=dev, grad=True)  # [N, 1+K, Dd], decoder_embed's
    token = _empty(1, 1, dd, dtype=pt, device=dev, grad=True)
    pos = _empty(1, 1 + num_patches, dd, dtype=pt, device=dev, grad=pos_grad)
    _backward(decoder_assembly(x, masking.ids_restore, token, pos), x, token, pos)


def _layer_norm(dim: int, rows: int, mode: str, variant: str, device) -> None:
    from fastmae.kernels.layer_norm import layer_norm

    xt, lt = _dtypes(mode)
    x = _empty(BATCH, rows, dim, dtype=xt, device=device, grad=True)  # [B, N, D], the residual stream
    branch = None if variant == "plain" else _empty(BATCH, rows, dim, dtype=lt, device=device, grad=True)
    weight, bias = (_empty(dim, dtype=xt, device=device, grad=True) for _ in range(2))
    # y: what the next Linear takes (the autocast dtype, which the op picks itself under CUDA autocast), for the
    # encoder's final norm the residual stream's dtype
    out_dtype = xt if variant == "final" else lt
    out = layer_norm(x, weight, bias, branch, 1e-6, out_dtype)
    _backward(out[1] if variant == "final" else out, x, branch, weight, bias)


def _gelu(hidden: int, rows: int, mode: str, variant: str, device) -> None:
    from fastmae.kernels.gelu import gelu

    pt, lt = _dtypes(mode)
    x = _empty(BATCH, rows, hidden, dtype=lt, device=device, grad=True)  # [B, N, hidden], fc1's output
    bias = _empty(hidden, dtype=pt, device=device, grad=True) if variant == "bias" else None  # fc1's bias
    _backward(gelu(x, bias), x, bias)


def _block_ops(cfg, kept: int, masked: int, mode: str, device, rec) -> None:
    """The LayerNorms and GELUs of the encoder's and the decoder's blocks (and their final norms)."""
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    stacks = (("enc", cfg.embed_dim, 1 + kept), ("dec", cfg.decoder_embed_dim, 1 + num_patches))
    for seq, dim, rows in stacks:
        with rec.tagged(seq=seq):
            for variant in ("plain", "residual", "final") if seq == "enc" else ("plain", "residual"):
                with rec.tagged(op="layer_norm", variant=variant):
                    _layer_norm(dim, rows, mode, variant, device)
            for variant in ("bias", "plain"):
                with rec.tagged(op="gelu", variant=variant):
                    _gelu(int(dim * cfg.mlp_ratio), rows, mode, variant, device)
    with rec.tagged(op="layer_norm", seq="dec", variant="final"):  # the final norm, of the masked rows only
        _layer_norm(cfg.decoder_embed_dim, masked, mode, "plain", device)


# The input views: a batch of ImageNet-sized photos (the usual pixel blocks) and one of 12-MP photos (shrunk more
# than 4×: the wide pixel blocks), each cropped whole.
VIEW_SOURCES = {"500x375": (375, 500), "4000x3000": (3000, 4000)}


def _views(cfg, mode: str, source: str, device) -> None:
    import torch

    from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fastmae.kernels import resized_crop as rc

    h, w = VIEW_SOURCES[source]
    image = torch.empty(3, h, w, dtype=torch.uint8, device=device)  # decoded [3, H, W], read by every view
    flips = [i % 2 == 1 for i in range(BATCH)]
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32  # the model's input dtype (fp32 under autocast)
    # the launcher itself: the public function refuses CPU tensors outside the interpreter
    rc._launch_fwd([image] * BATCH, [[0, 0, h, w]] * BATCH, flips, cfg.img_size, IMAGENET_MEAN, IMAGENET_STD, dtype)


def run_mae(rec, models: list[str] | None = None, device: str = "cpu") -> None:
    """Make every launch of an MAE step for ``models`` (keys of MODELS) on ``device``, tagging them on ``rec`` (a
    :class:`tests.compile_harness.LaunchRecorder`) with ``op``, ``model``, ``mode`` (and ``seq``, ``variant``,
    ``unused``). Launches that MAE never makes are made last and dropped when they repeat one of its own (same code
    and grid)."""
    import torch

    from fastmae.configs import get_config
    from fastmae.kernels._common import recording_launches
    from fastmae.masking import random_masking

    torch.manual_seed(0)
    with recording_launches():
        for model in models or list(MODELS):
            cfg = get_config(MODELS[model])
            num_patches = (cfg.img_size // cfg.patch_size) ** 2
            masking = random_masking(BATCH, num_patches, MASK_RATIO, device)
            kept = masking.ids_keep.shape[1]
            first = len(rec.launches)
            with rec.tagged(model=model):
                for mode in MODES:
                    with rec.tagged(mode=mode):
                        with rec.tagged(op="patch_embed"):
                            _patch_embed(cfg, masking, mode)
                        _block_ops(cfg, kept, num_patches - kept, mode, device, rec)
                        for compiled in (False, True):
                            for rows in (False, True):
                                variant = ("rows" if rows else "full") + ("/compiled" if compiled else "")
                                with rec.tagged(op="masked_mse", variant=variant):
                                    _loss(cfg, masking, mode, rows, compiled)
                        with rec.tagged(op="decoder_assembly"):
                            _decoder_input(cfg, masking, mode)
                        for source in VIEW_SOURCES:
                            with rec.tagged(op="resized_crop", seq=source):
                                _views(cfg, mode, source, masking.mask.device)
                with rec.tagged(mode="bf16/amp"):
                    with rec.tagged(op="attention", seq="enc"):
                        _attention(1 + kept, cfg.embed_dim, cfg.num_heads, device)
                    with rec.tagged(op="attention", seq="dec"):
                        _attention(1 + num_patches, cfg.decoder_embed_dim, cfg.decoder_num_heads, device)
            used = {ln.key_grid() for ln in rec.launches[first:]}
            extra_from = len(rec.launches)
            with rec.tagged(model=model, unused="unused in MAE"):
                for mode in MODES:
                    with rec.tagged(mode=mode):
                        with rec.tagged(op="patch_embed"):
                            _patch_embed(cfg, masking, mode, img_grad=True)
                        with rec.tagged(op="decoder_assembly"):
                            _decoder_input(cfg, masking, mode, pos_grad=True)
            rec.drop(i for i in range(extra_from, len(rec.launches)) if rec.launches[i].key_grid() in used)


def capture_mae(models: list[str] | None = None, arch: int = 90) -> list:
    """The launches (:class:`tests.compile_harness.Launch`) of :func:`run_mae` on CPU tensors, captured for
    ``sm_<arch>``; to run where kernels are compiled, not interpreted (see :func:`collect`)."""
    from tests.compile_harness import capture_launches

    with capture_launches(arch) as rec:
        run_mae(rec, models)
    return rec.launches


def collect(models: list[str] | None = None, jobs: int | None = None, cache=None) -> list[tuple]:
    """``(launch, figures)`` for every MAE launch (see :func:`tests.static_analysis.summarize`), compiled for
    sm_90a (cached). ``figures`` is ``{"error": ...}`` for a launch that did not compile."""
    from tests.compile_harness import capture_in_subprocess, compile_launches
    from tests.static_analysis import summarize

    launches = capture_in_subprocess("tests.mae_launches:capture_mae", models=models)
    artifacts = compile_launches(launches, jobs=jobs, cache=cache)
    out = []
    for launch, art in zip(launches, artifacts):
        figures = {"error": art["error"]} if "error" in art else summarize(launch, art)
        if "compile_s" in art:
            figures["compile_s"], figures["cached"] = art["compile_s"], art["cached"]
        out.append((launch, figures))
    return out


def _join(values) -> str:
    return "+".join(dict.fromkeys(v for v in values if v))


def label(launches: list) -> str:
    """A readable name for launches that share one compiled kernel: ``op.kernel[models,modes,seqs,variants,wXsY]``,
    from the tags of those MAE makes itself (of all, marked ``unused in MAE``, when it makes none)."""
    used = [ln for ln in launches if not ln.tags.get("unused")] or launches
    first = used[0]
    parts = [_join(ln.tags.get(k) for ln in used) for k in ("model", "mode", "seq", "variant")]
    parts.append(f"w{first.options['num_warps']}s{first.options['num_stages']}")
    if used is launches and first.tags.get("unused"):
        parts.append(first.tags["unused"])
    ops = _join(ln.tags.get("op") for ln in used)
    return f"{ops}.{first.kernel.lstrip('_')}[{','.join(p for p in parts if p)}]"


def group(results: list[tuple], by=lambda launch: launch.key()) -> dict[str, list[tuple]]:
    """``results`` (``(launch, figures)`` pairs) grouped by ``by`` (default: the compiled kernel), in first-seen
    order, under their :func:`label`."""
    groups: dict = {}
    for launch, figures in results:
        groups.setdefault(by(launch), []).append((launch, figures))
    out: dict = {}
    for members in groups.values():
        name = label([ln for ln, _ in members])
        if name in out:
            raise ValueError(f"two different kernels are both named {name}")
        out[name] = members
    return out
