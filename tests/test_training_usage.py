"""training/pretrain.py as users run it: the original's command lines, logs in a file, bad images, warnings."""

import io
import json
import shlex
import string
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .test_data import write_bad_images
from .test_training import TINY, argv_of, one_thread, pretrain, tiny  # noqa: F401 (one_thread: autouse fixture)

# Verbatim from the original repository's PRETRAIN.md (facebookresearch/mae), as test data.
PRETRAIN_MD_COMMAND = r"""python submitit_pretrain.py \
    --job_dir ${JOB_DIR} \
    --nodes 8 \
    --use_volta32 \
    --batch_size 64 \
    --model mae_vit_large_patch16 \
    --norm_pix_loss \
    --mask_ratio 0.75 \
    --epochs 800 \
    --warmup_epochs 40 \
    --blr 1.5e-4 --weight_decay 0.05 \
    --data_path ${IMAGENET_DIR}"""

# main_pretrain.py's flags and defaults, read from its get_args_parser().
ORIGINAL_DEFAULTS = dict(
    batch_size=64, epochs=400, accum_iter=1, model="mae_vit_large_patch16", input_size=224, mask_ratio=0.75,
    norm_pix_loss=False, weight_decay=0.05, lr=None, blr=1e-3, min_lr=0.0, warmup_epochs=40,
    data_path="/datasets01/imagenet_full_size/061417/", output_dir="./output_dir", log_dir="./output_dir",
    device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=1, local_rank=-1,
    dist_on_itp=False, dist_url="env://",
)  # fmt: skip
# Where fastmae's default differs on purpose (the README lists each): the model's own size, the embedded images,
# CUDA when there is one, workers from the CPU count, TensorBoard under the output folder; the torchrun flags.
DELIBERATE = {"input_size", "data_path", "device", "num_workers", "log_dir"}
TORCHRUN_FLAGS = {"world_size", "local_rank", "dist_on_itp", "dist_url"}


def shell_words(command: str, env: dict) -> list[str]:
    """What a POSIX shell passes: line continuations joined, ${VARS} expanded, words split."""
    return shlex.split(string.Template(command.replace("\\\n", " ")).substitute(env))


def test_the_pretrain_md_command_line_parses_unchanged(tmp_path, capsys):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    env = {"JOB_DIR": str(tmp_path / "job"), "IMAGENET_DIR": str(tmp_path / "imagenet")}
    argv = shell_words(PRETRAIN_MD_COMMAND, env)
    assert argv[:2] == ["python", "submitit_pretrain.py"]
    cfg = pretrain.parse_args(argv[2:])
    assert (cfg.model, cfg.batch_size, cfg.norm_pix_loss, cfg.mask_ratio) == ("mae_vit_large_patch16", 64, True, 0.75)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.blr, cfg.weight_decay) == (800, 40, 1.5e-4, 0.05)
    assert cfg.data_path == env["IMAGENET_DIR"] and cfg.output_dir == env["JOB_DIR"]  # submitit's output is job_dir
    notes = capsys.readouterr().err.splitlines()
    assert [n.split(" is ")[0] for n in notes] == ["note: --job_dir", "note: --nodes", "note: --use_volta32"]
    assert "used as --output-dir" in notes[0] and all("torchrun" in n for n in notes[1:])


def test_every_flag_of_main_pretrain_is_accepted(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    given = dict(
        ORIGINAL_DEFAULTS, model="mae_vit_nano_patch8", input_size=32, batch_size=8, lr=1e-4, min_lr=1e-6,
        warmup_epochs=2, epochs=10, start_epoch=4, data_path=str(tmp_path / "data"), output_dir=str(tmp_path / "o"),
        log_dir=str(tmp_path / "tb"), device="cpu", seed=3, num_workers=0, world_size=2, local_rank=0,
    )  # fmt: skip
    argv = []
    for name, value in given.items():
        if isinstance(value, bool):
            argv += [f"--{name}"] if value else []
        elif value is not None:
            argv += [f"--{name}", str(value)]
    argv += ["--dist_on_itp", "--no_pin_mem"]
    cfg = pretrain.parse_args(argv)
    for name, value in given.items():
        if name not in TORCHRUN_FLAGS and name != "pin_mem":
            assert getattr(cfg, name) == value, name
    assert cfg.pin_mem is False and cfg.resume == ""
    notes = capsys.readouterr().err
    assert all(f"note: --{name} is set by torchrun" in notes for name in TORCHRUN_FLAGS)
    assert pretrain.parse_args(["--local-rank=1"]).model == "mae_vit_large_patch16"  # torch.distributed.launch


def test_defaults_are_the_original_scripts():
    cfg = pretrain.parse_args([])
    for name, value in ORIGINAL_DEFAULTS.items():
        if name in DELIBERATE | TORCHRUN_FLAGS:
            continue
        mine = getattr(cfg, name)
        if name == "output_dir":
            assert Path(mine) == Path(value)
        elif name == "resume":
            assert not mine  # None and '' both mean: no resume
        else:
            assert mine == value, name
    assert cfg.input_size is None and pretrain.fastmae.get_config(cfg.model).img_size == 224  # the model's: 224


def test_resume_empty_start_epoch_and_log_dir(tmp_path, monkeypatch):
    made = []

    class Writer:  # stands in for TensorBoard's SummaryWriter, which may be absent
        def __init__(self, log_dir):
            made.append(log_dir)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    cfg = tiny(tmp_path, resume="", start_epoch=2, max_steps=12, tensorboard=True, log_dir=str(tmp_path / "tb"))
    result = pretrain.train(cfg)
    assert [s for s, _ in result.losses] == [11, 12]  # epoch 2 starts at step 10 (5 steps/epoch)
    assert made == [str(tmp_path / "tb")]
    record = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 2.2 and record["lr"] == pytest.approx(pretrain.schedule.lr_at(2.0, 2e-3 * 8 / 256, 4, 1))


def test_log_lines_off_a_terminal_and_done_uses_the_logged_mean(tmp_path, capsys):
    code = pretrain.main(
        [*argv_of(TINY), "--output-dir", str(tmp_path / "run"), "--log-every", "2", "--max-steps", "5"]
    )
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("step ")]
    assert [line.split(" ")[1] for line in lines] == ["2/5", "4/5", "5/5"]
    for line in lines:
        for part in (" | epoch ", " | loss ", " | lr ", " img/s | eta ", " | peak mem "):
            assert part in line, (part, line)
    records = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert (
        records[0]["loss"] == pytest.approx(np.mean(records[0]["step_losses"])) and len(records[0]["step_losses"]) == 2
    )
    done = next(line for line in out if line.startswith("done:"))
    assert f"loss {records[0]['loss']:.4f} (steps 1–2) → {records[-1]['loss']:.4f} (step 5)" in done
    assert "\r" not in "".join(out)


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    pretrain.train(tiny(tmp_path, max_steps=3, progress=True))
    text = screen.getvalue()
    assert "\r" in text and "3/3" in text and "step 1/3 (" not in text  # tqdm's bar, no log lines


def image_folder_with_bad_files(root):
    """5 good images in class a, then class x of test_data.write_bad_images (3 unreadable among 7)."""
    (root / "train" / "a").mkdir(parents=True)
    for i in range(5):
        arr = np.random.default_rng(i).integers(0, 255, (40, 44, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "train" / "a" / f"{i}.png")
    return write_bad_images(root / "train" / "x")


def test_bad_images_do_not_stop_a_run_and_resume_stays_exact(tmp_path, capsys):
    kinds = image_folder_with_bad_files(tmp_path / "data")
    flags = dict(data_path=str(tmp_path / "data"), batch_size=2)  # 12 images: 3 steps per epoch
    straight = pretrain.train(tiny(tmp_path, "straight", max_steps=6, **flags))
    err = capsys.readouterr().err
    for name, bad in kinds.items():
        assert err.count(f"/train/x/{name} (") == (1 if bad else 0), name  # each bad file logged once, named
    assert "skipping unreadable image" in err and "BadImageError" not in err
    records = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["bad_images"] for r in records) == 2 * (3 + 2 + 1)  # 2 epochs; each bad file also re-tried
    pretrain.train(tiny(tmp_path, "split", max_steps=2, **flags))
    resumed = pretrain.train(tiny(tmp_path, "split", max_steps=6, resume="auto", **flags))
    assert resumed.losses == straight.losses[2:]


def test_bad_images_error_stops_naming_the_file(tmp_path, capsys):
    image_folder_with_bad_files(tmp_path / "data")
    argv = [*argv_of(TINY), "--data-path", str(tmp_path / "data"), "--batch-size", "2", "--output-dir", str(tmp_path)]
    assert pretrain.main([*argv, "--bad-images", "error"]) == 1  # met by the pictures' images, before step 1
    err = capsys.readouterr().err
    assert err.startswith("pretrain: error: cannot read image '") and "/train/x/b_truncated.jpg': " in err
    # In a loader worker (no picture at step 0 when starting at epoch 1): the same one line, no traceback.
    assert pretrain.main([*argv, "--bad-images", "error", "--start-epoch", "1", "--num-workers", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pretrain: error: cannot read image '") and err.count("\n") == 1, err
    assert any(f"/train/x/{name}': " in err for name in ("b_truncated.jpg", "c_empty.jpg", "d_text.jpg"))


def test_a_large_model_on_the_cpu_is_warned_about(tmp_path, capsys):
    warn = pretrain.cpu_size_warning
    assert warn(pretrain.parse_args(["--model", "mae_vit_nano_patch8", "--device", "cpu"])) is None
    assert "on the CPU" in warn(pretrain.parse_args(["--model", "mae_vit_base_patch16", "--device", "cpu"]))
    assert warn(pretrain.parse_args(["--device", "cpu"])).startswith("pretrain: warning: mae_vit_large_patch16")
    (tmp_path / "data" / "train" / "empty").mkdir(parents=True)  # fails right after the warning, before any model
    argv = ["--model", "mae_vit_base_patch16", "--device", "cpu", "--data-path", str(tmp_path / "data")]
    assert pretrain.main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert "warning: mae_vit_base_patch16 on the CPU" in capsys.readouterr().err


def test_pictures_carry_step_loss_and_mask_ratio(tmp_path):
    result = pretrain.train(tiny(tmp_path, max_steps=2))
    first, last = (Image.open(result.output_dir / f"recon-{s:08d}.png") for s in (0, 2))
    assert first.text["step"] == "0" and last.text["step"] == "2" and first.text["mask_ratio"] == "0.75"
    assert float(first.text["loss"]) > 0 and first.text["loss"] != last.text["loss"]
    curve = Image.open(result.output_dir / "loss.png")
    assert curve.text == {"first_step": "1", "last_step": "2", "values": "2"}
    assert torch.isfinite(torch.tensor(float(last.text["loss"])))
