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


def test_panels_show_predictions_of_masked_patches_only():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16).clamp(-1.5, 1.5)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1  # every other patch removed
    pred = torch.randn(2, 16, 48)
    original, masked, predicted, pasted = visualize.reconstruction_panels(imgs, pred, mask, 4, norm_pix_loss=False)
    for panel in (original, masked, predicted, pasted):
        assert panel.shape == (2, 3, 16, 16) and panel.min() >= 0 and panel.max() <= 1
    removed = reference.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48), 4, 3, (4, 4)).bool()  # [2, 3, 16, 16]
    full = data.denormalize(reference.unpatchify(pred, 4, 3, (4, 4)))
    assert torch.equal(pasted[~removed], original[~removed])
    assert torch.equal(pasted[removed], full[removed])
    assert torch.equal(predicted[removed], full[removed])
    grey = torch.full_like(masked[removed], 0.5)
    assert torch.allclose(predicted[~removed], grey, atol=1e-6)  # the untrained outputs at visible patches: unseen
    assert torch.allclose(masked[removed], grey, atol=1e-6)
    assert torch.equal(masked[~removed], original[~removed])
    only_masked = pred[mask.bool()].view(2, 8, 48)  # what pred_masked_only=True returns, raster order
    for a, b in zip(
        visualize.reconstruction_panels(imgs, only_masked, mask, 4, False), (original, masked, predicted, pasted)
    ):
        assert torch.equal(a, b)


def test_grid_and_files(tmp_path):
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16)
    mask = torch.zeros(3, 16)
    mask[:, :12] = 1
    pred = torch.randn(3, 16, 48)
    path = visualize.save_reconstructions(tmp_path / "r.png", imgs, pred, mask, 4, True, step=192, loss=0.41234)
    img = Image.open(path)
    assert img.size == (4 * (128 + 4) + 4, 20 + 22 + 3 * (128 + 4) + 4)  # caption, titles, rows
    assert img.text == {"step": "192", "loss": "0.41234", "mask_ratio": "0.75"}
    bare = Image.open(visualize.save_reconstructions(tmp_path / "b.png", imgs, pred, mask, 4, True))
    assert bare.text == {"mask_ratio": "0.75"}
    caption = np.asarray(img.convert("L"))[:20]  # the caption is drawn: dark pixels above the titles
    assert (caption < 128).sum() > 50 and (np.asarray(bare.convert("L"))[: 20 - 2] < 128).sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "r.png"]
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
    single = np.asarray(visualize.loss_curve_image([5], [0.3]).convert("RGB")).astype(int)  # a single point draws too
    assert (abs(single - np.array([20, 60, 160])).sum(-1) < 30).sum() > 10
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


def dark_blue_pixels(img):
    arr = np.asarray(img.convert("RGB")).astype(int)
    return int((abs(arr - np.array([20, 60, 160])).sum(-1) < 30).sum())


def test_loss_curve_of_a_short_run_marks_every_step():
    steps, losses = [1, 2, 3, 4], [1.06, 1.2, 0.98, 1.11]
    auto = visualize.loss_curve_image(steps, losses)
    plain = visualize.loss_curve_image(steps, losses, markers=False)
    marked = visualize.loss_curve_image(steps, losses, markers=True)
    assert np.array_equal(np.asarray(auto), np.asarray(marked))  # few values: each one is marked
    assert dark_blue_pixels(marked) >= dark_blue_pixels(plain) + 4 * 15  # four dots of ~30 px, partly on the line
    many = list(range(1, 62))
    assert np.array_equal(
        np.asarray(visualize.loss_curve_image(many, [1.0] * 61)),
        np.asarray(visualize.loss_curve_image(many, [1.0] * 61, markers=False)),
    )


def test_progress_logs_lines_with_window_means_and_summary(tmp_path):
    import io

    log = visualize.MetricsLog(tmp_path, tensorboard=False)
    out = io.StringIO()
    progress = visualize.Progress(log, 0, 7, 4, 8, log_every=3, bar=False, memory=lambda: 12.0, stream=out)
    losses = [1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.25]
    for step, loss in enumerate(losses, 1):
        progress.update(step, loss, 0.1, 1.0, bad_images=1 if step == 5 else 0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # steps 3, 6 and the last, 7
    assert lines[0].startswith("step 3/7 (43%) | epoch 0.75 | loss 2.0000 | lr 0.1 | ")
    assert "img/s | eta 0:00:00 | peak mem 12 MiB" in lines[0] and "unreadable" not in lines[0]
    assert lines[1].startswith("step 6/7 (86%) | epoch 1.50 | loss 0.5000") and "1 unreadable images" in lines[1]
    assert [r["loss"] for r in log.records] == [2.0, 0.5, 0.25] and log.records[0]["step_losses"] == losses[:3]
    summary = progress.summary(7, tmp_path)
    assert "loss 2.0000 (steps 1–3) → 0.2500 (step 7)" in summary and "1 unreadable images skipped" in summary
    assert progress.losses == list(enumerate(losses, 1))
    path = log.save_loss_curve(tmp_path / "loss.png")
    assert "steps 1–7 (7 values)" in visualize.loss_curve_image(list(range(1, 8)), losses).info.get(
        "title", "steps 1–7 (7 values)"
    )
    assert path.exists()
    log.close()
