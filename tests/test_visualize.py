"""Reconstruction grids and loss curves."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import data, reference, visualize


def test_unnormalize_patches_inverts_the_loss_target():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16)
    target = reference.patchify(imgs, 4)  # [2, 16, 48]
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    normalized = (target - mean) / (var + 1e-6) ** 0.5  # what the model learns to predict with norm_pix_loss
    assert torch.allclose(visualize.unnormalize_patches(normalized, imgs, 4), target, atol=1e-5)


def test_panels_paste_visible_patches_and_grey_out_masked():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16).clamp(-1.5, 1.5)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1  # every other patch removed
    pred = torch.randn(2, 16, 48)
    original, masked, recon, pasted = visualize.reconstruction_panels(imgs, pred, mask, 4, norm_pix_loss=False)
    for panel in (original, masked, recon, pasted):
        assert panel.shape == (2, 3, 16, 16) and panel.min() >= 0 and panel.max() <= 1
    removed = reference.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), 4, 3, (4, 4)).bool()  # [2, 3, 16, 16]
    assert torch.equal(pasted[~removed], original[~removed])
    assert torch.equal(pasted[removed], recon[removed])
    assert torch.allclose(masked[removed], torch.full_like(masked[removed], 0.5), atol=1e-6)
    assert torch.equal(masked[~removed], original[~removed])
    assert torch.allclose(recon, data.denormalize(reference.unpatchify(pred, 4, 3, (4, 4))))


def test_grid_and_files(tmp_path):
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16)
    mask = (torch.rand(3, 16) > 0.25).float()
    path = visualize.save_reconstructions(tmp_path / "r.png", imgs, torch.randn(3, 16, 48), mask, 4, True)
    img = Image.open(path)
    assert img.size == (4 * (128 + 4) + 4, 22 + 3 * (128 + 4) + 4)
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]
    with pytest.raises(ValueError, match="one title per column"):
        visualize.grid_image([imgs.clamp(0, 1)], titles=("a", "b"))


def test_loss_curve_draws_the_falling_line(tmp_path):
    steps = list(range(1, 201))
    losses = [1.0 / (1 + 0.05 * s) + 0.01 * np.sin(s) for s in steps]
    path = visualize.save_loss_curve(tmp_path / "loss.png", steps, losses)
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    dark_blue = (abs(arr - np.array([20, 60, 160])).sum(-1) < 30).nonzero()
    assert len(dark_blue[0]) > 200
    # the smoothed line starts high on the left and ends low on the right (image rows grow downwards)
    left = dark_blue[0][dark_blue[1] < dark_blue[1].min() + 10].mean()
    right = dark_blue[0][dark_blue[1] > dark_blue[1].max() - 10].mean()
    assert left < right - 100
    visualize.loss_curve_image([5], [0.3])  # a single point draws too
    with pytest.raises(ValueError, match="as many steps as losses"):
        visualize.loss_curve_image([1, 2], [0.3])


def test_nice_ticks_and_smooth():
    assert visualize.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert visualize.nice_ticks(0.37, 2.1, 4) == [0.5, 1.0, 1.5, 2.0]
    assert visualize.smooth([1.0, 2.0, 6.0, 3.0], 1) == pytest.approx([1.5, 3.0, 11 / 3, 4.5])
    assert visualize.smooth([4.0, 5.0], 0) == [4.0, 5.0]
    with pytest.raises(ValueError, match="finite"):
        visualize.nice_ticks(0, float("nan"))


def test_metrics_log_resume_drops_steps_past_the_checkpoint(tmp_path):
    import importlib.util
    import json

    log = visualize.MetricsLog(tmp_path, tensorboard=True)
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert (log.tb is not None) == has_tb  # TensorBoard is used exactly when it is installed
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step, "lr": 0.1, "img_per_s": 5.0, "grad_norm": 1.0, "peak_mem_mb": 1})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a record cut short by a kill
    log = visualize.MetricsLog(tmp_path, resume_step=3, tensorboard=False)
    assert [r["step"] for r in log.records] == [1, 2, 3]
    log.write({"step": 4, "loss": 0.2})
    assert log.save_loss_curve(tmp_path / "loss.png").exists()
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    fresh = visualize.MetricsLog(tmp_path, resume_step=None, tensorboard=False)
    assert fresh.records == [] and fresh.save_loss_curve(tmp_path / "x.png") is None
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
