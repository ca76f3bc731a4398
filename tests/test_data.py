"""Pretraining data: embedded images, random views, ImageFolder, resumable sampler."""

from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import data


def test_embedded_images_ship_with_notice():
    root = resources.files("fastmae.assets")
    notice = (root / "NOTICE").read_text()
    src = data.EmbeddedImages()
    assert len(src) == 7
    total = 0
    for name in data.EMBEDDED_NAMES:
        assert f"{name}.jpg" in notice
        total += len((root / f"{name}.jpg").read_bytes())
        img = src.load(data.EMBEDDED_NAMES.index(name))
        assert img.mode == "RGB" and min(img.size) == 256
    assert 100_000 < total < 250_000


def test_views_have_the_right_shape_and_statistics():
    ds = data.RandomViews(data.EmbeddedImages(), img_size=48, seed=0, length=21)
    assert len(ds) == 21
    batch = torch.stack([ds[(0, i)] for i in range(21)])
    assert batch.shape == (21, 3, 48, 48) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    # ImageNet-normalized natural images: values within the range of normalized [0, 1] pixels, not all equal
    assert batch.min() >= (0 - 0.485) / 0.229 - 1e-4 and batch.max() <= (1 - 0.406) / 0.225 + 1e-4
    assert batch.std() > 0.3


def test_views_differ_but_are_reproducible():
    ds = data.RandomViews(data.EmbeddedImages(), img_size=32, seed=3, length=14)
    a, b = ds[(0, 2)], ds[(1, 2)]
    assert not torch.equal(a, b)  # another epoch: another view of the same image
    assert not torch.equal(ds[(0, 2)], ds[(0, 9)])  # index 9 is the same image (9 mod 7), another crop
    assert torch.equal(a, ds[(0, 2)])  # a pure function of (seed, epoch, index)
    other = data.RandomViews(data.EmbeddedImages(), img_size=32, seed=4, length=14)
    assert not torch.equal(a, other[(0, 2)])
    assert torch.equal(ds[2], ds[(0, 2)])


def test_crop_box_stays_inside_and_covers_the_scale_range():
    rng = np.random.default_rng(0)
    areas, flips = [], 0
    for _ in range(2000):
        top, left, h, w = data.crop_box(200, 300, rng)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300 and h > 0 and w > 0
        areas.append(h * w / (200 * 300))
        flips += w / h > 4 / 3 + 0.02 or w / h < 3 / 4 - 0.02
    assert min(areas) < 0.25 and max(areas) > 0.8 and flips == 0  # 0.89 is the largest 4:3 box in 3:2
    assert data.crop_box(10, 1000, np.random.default_rng(0))[2:] == (10, 13)  # fallback: centred, ratio-clamped


def test_sampler_partitions_and_resumes_mid_epoch():
    ds = data.RandomViews(data.EmbeddedImages(), img_size=8, length=20)
    shares = []
    for rank in range(2):
        s = data.ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=1)
        s.set_epoch(3)
        keys = list(s)
        assert len(keys) == len(s) == 10 and all(e == 3 for e, _ in keys)
        shares.append([i for _, i in keys])
        s.set_epoch(3, start=4)
        assert [i for _, i in s] == shares[-1][4:] and len(s) == 6
    assert sorted(shares[0] + shares[1]) == list(range(20))
    s = data.ResumableDistributedSampler(ds, num_replicas=2, rank=0, seed=1)
    s.set_epoch(4)
    assert [i for _, i in s] != shares[0]  # reshuffled every epoch
    with pytest.raises(ValueError, match="start"):
        s.set_epoch(0, start=11)


def test_loader_stream_is_independent_of_workers():
    ds = data.RandomViews(data.EmbeddedImages(), img_size=16, seed=0, length=12)
    streams = []
    for workers in (0, 2):
        sampler = data.ResumableDistributedSampler(ds, seed=0)
        loader = data.build_loader(ds, sampler, batch_size=4, num_workers=workers, pin_memory=False)
        sampler.set_epoch(1, start=4)
        streams.append(torch.cat(list(loader)))
    assert streams[0].shape == (8, 3, 16, 16)
    assert torch.equal(streams[0], streams[1])


def make_folder(root, sizes):
    for cls, count in sizes.items():
        (root / "train" / cls).mkdir(parents=True)
        for i in range(count):
            arr = np.random.default_rng(i).integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / "train" / cls / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_source(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 2})
    src = data.open_source(tmp_path)
    assert len(src) == 5
    ds = data.RandomViews(src, img_size=24, seed=0)
    assert len(ds) == 5 and ds[(0, 4)].shape == (3, 24, 24)
    assert data.center_views(src, 24, 8).shape == (5, 3, 24, 24)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        data.FolderImages(tmp_path / "missing")
    with pytest.raises(ValueError, match="no train/ folder"):
        data.FolderImages(tmp_path)
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.FolderImages(tmp_path)


def test_denormalize_inverts_normalization():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8))
    x = data.to_model_input(img)
    back = data.denormalize(x)
    assert torch.allclose(back * 255, torch.from_numpy(np.array(img)).permute(2, 0, 1).float(), atol=1e-3)
