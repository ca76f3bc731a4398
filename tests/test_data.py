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
        streams.append(torch.cat([batch.images for batch in loader]))
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


def write_bad_images(folder):
    """The files a real dataset holds now and then, next to good ones: returns {name: is_unreadable}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    good.save(folder / "a_good.jpg")
    blob = (folder / "a_good.jpg").read_bytes()
    (folder / "b_truncated.jpg").write_bytes(blob[: len(blob) // 2])
    (folder / "c_empty.jpg").write_bytes(b"")
    (folder / "d_text.jpg").write_text("this is not an image\n")
    cmyk = Image.fromarray(rng.integers(0, 255, (40, 48, 4), dtype=np.uint8), mode="CMYK")
    cmyk.save(folder / "e_cmyk.jpg")
    deep = (rng.random((40, 48)) * 20000 + 20000).astype(np.uint16)  # 16-bit grey, mid-range values
    Image.fromarray(deep).save(folder / "f_16bit.png")
    good.save(folder / "g_good.png")
    return {"a_good.jpg": False, "b_truncated.jpg": True, "c_empty.jpg": True, "d_text.jpg": True,
            "e_cmyk.jpg": False, "f_16bit.png": False, "g_good.png": False}  # fmt: skip


class OneImage:
    """A source of ``length`` copies of image ``i`` of ``source``."""

    def __init__(self, source, i, length):
        self.source, self.i, self.length = source, i, length

    def __len__(self):
        return self.length

    def load(self, _):
        return self.source.load(self.i)


def test_read_image_decodes_cmyk_and_16_bit_and_names_bad_files(tmp_path):
    kinds = write_bad_images(tmp_path / "train" / "x")
    for name, bad in kinds.items():
        path = tmp_path / "train" / "x" / name
        if bad:
            with pytest.raises(data.BadImageError, match=f"cannot read image '.*{name}': ") as info:
                data.read_image(path)
            assert info.value.path == str(path) and info.value.reason
            continue
        img = data.read_image(path)
        assert img.mode == "RGB" and img.size == (48, 40), name
    cmyk = data.read_image(tmp_path / "train" / "x" / "e_cmyk.jpg")
    assert np.array_equal(
        np.asarray(cmyk), np.asarray(Image.open(tmp_path / "train" / "x" / "e_cmyk.jpg").convert("RGB"))
    )
    deep = np.asarray(Image.open(tmp_path / "train" / "x" / "f_16bit.png"), dtype=np.float64)
    grey = np.asarray(data.read_image(tmp_path / "train" / "x" / "f_16bit.png"), dtype=np.float64)
    assert np.abs(grey[..., 0] - deep / 257).max() <= 0.5 and (grey[..., 0] == grey[..., 2]).all()
    assert 70 < grey.mean() < 160  # not the white picture a plain convert("RGB") gives


def test_unreadable_images_are_replaced_by_the_next_readable_one(tmp_path):
    kinds = write_bad_images(tmp_path / "train" / "x")
    src = data.open_source(tmp_path)
    names = [p.rsplit("/", 1)[1] for p in src.paths]
    assert names == sorted(kinds)
    ds = data.RandomViews(src, img_size=16, seed=5)
    for index, name in enumerate(names):
        view, skipped = ds.sample(2, index)
        if kinds[name]:  # the same random numbers applied to the next readable image
            nxt = next(i for i in range(index, len(names)) if not kinds[names[i]])
            assert [b.index for b in skipped] == list(range(index, nxt))
            assert all(b.path.endswith(names[b.index]) and b.reason for b in skipped)
            good = data.RandomViews(OneImage(src, nxt, len(names)), img_size=16, seed=5)
            assert torch.equal(view, good.view(2, index))
        else:
            assert skipped == []
        assert torch.equal(view, ds.sample(2, index)[0])  # still a pure function of (seed, epoch, index)
    strict = data.RandomViews(src, img_size=16, seed=5, bad_images="error")
    with pytest.raises(data.BadImageError, match="b_truncated.jpg"):
        strict[(0, 1)]
    with pytest.raises(ValueError, match="bad_images must be one of"):
        data.RandomViews(src, img_size=16, bad_images="ignore")


def test_loader_reports_bad_images_the_same_for_any_worker_count(tmp_path):
    write_bad_images(tmp_path / "train" / "x")
    ds = data.RandomViews(data.open_source(tmp_path), img_size=16, seed=1)
    runs = []
    for workers in (0, 2):
        sampler = data.ResumableDistributedSampler(ds, seed=0)
        sampler.set_epoch(3)
        batches = list(data.build_loader(ds, sampler, batch_size=3, num_workers=workers, pin_memory=False))
        runs.append(batches)
    assert len(runs[0]) == 2  # 7 images, 2 full batches of 3
    for a, b in zip(*runs):
        assert torch.equal(a.images, b.images) and a.bad == b.bad
    shown = [bad for batch in runs[0] for bad in batch.bad]
    assert all(isinstance(bad, data.BadImage) for bad in shown)
    assert {bad.index for bad in shown} <= {1, 2, 3}


def test_center_views_skip_bad_images(tmp_path):
    write_bad_images(tmp_path / "train" / "x")
    src = data.open_source(tmp_path)
    seen = []
    views = data.center_views(src, 16, 7, on_bad=seen.append)
    assert views.shape == (7, 3, 16, 16) and torch.isfinite(views).all()
    assert sorted({b.index for b in seen}) == [1, 2, 3]
    with pytest.raises(data.BadImageError, match="b_truncated.jpg"):
        data.center_views(src, 16, 7, bad_images="error")
