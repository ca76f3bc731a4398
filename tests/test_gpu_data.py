"""The GPU input path (fastmae.gpu_data) against the CPU path (fastmae.data.RandomViews) for the same keys.

On the CPU the GPU decoder's stand-in is torchvision's CPU ``decode_jpeg``, which decodes the same pixels as
Pillow (both libjpeg-turbo, checked below), so the two paths differ only by their resamplers: PIL rounds each pass
to uint8, the GPU path does not. That difference is bounded by ``UINT8_TOL`` units of 255 (derived in
tests/test_resized_crop.py), the bound every comparison here uses.
"""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import data, gpu_data, pipeline
from tests.test_resized_crop import UINT8_TOL

STD = torch.tensor(data.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return data.EmbeddedImages().load(1).resize((77, 53), Image.BICUBIC)  # odd sizes


@pytest.fixture(scope="module")
def kinds(photo) -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, whether the GPU decoder takes it)."""
    grey16 = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)  # 16-bit grey
    return {
        "baseline_420.jpg": (encode(photo, quality=90), True),
        "progressive.jpg": (encode(photo, quality=90, progressive=True), True),
        "baseline_444.jpg": (encode(photo, quality=90, subsampling=0), True),
        "baseline_422.jpg": (encode(photo, quality=90, subsampling=1), True),
        "grey.jpg": (encode(photo.convert("L"), quality=90), False),
        "cmyk.jpg": (encode(photo.convert("CMYK"), quality=90), False),
        "rgb.png": (encode(photo, "PNG"), False),
        "grey16.png": (encode(grey16, "PNG"), False),
        "palette.png": (encode(photo.convert("P"), "PNG"), False),
    }


def test_headers_give_the_size_and_the_decoder(kinds, photo):
    for name, (buf, gpu) in kinds.items():
        assert gpu_data.probe(buf, name) == (photo.height, photo.width, gpu), name
    header = gpu_data.jpeg_header(kinds["progressive.jpg"][0])
    assert header.marker == 0xC2 and header.components[0][1:] == (2, 2)
    jpeg = kinds["baseline_420.jpg"][0]
    assert not gpu_data.gpu_decodable(gpu_data.jpeg_header(jpeg[:-100]), jpeg[:-100])  # truncated: Pillow decides
    assert gpu_data.jpeg_header(b"\xff\xd8\xff\xe0\x00") is None and gpu_data.jpeg_header(b"GIF89a") is None
    with pytest.raises(data.BadImageError, match="cannot read image 'x.jpg'"):
        gpu_data.probe(b"not an image", "x.jpg")


def test_the_cpu_stand_in_decodes_as_pillow(kinds):
    from torchvision.io import ImageReadMode, decode_jpeg

    for name, (buf, gpu) in kinds.items():
        if gpu:
            mine = decode_jpeg(torch.frombuffer(bytearray(buf), dtype=torch.uint8), mode=ImageReadMode.RGB)
            pillow = np.array(data.decode_image(buf, name))  # [H, W, 3]
            assert torch.equal(mine.permute(1, 2, 0), torch.from_numpy(pillow)), name


def make_folder(root: Path, files: dict[str, bytes]) -> data.FolderImages:
    for i, (name, buf) in enumerate(files.items()):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(buf)
    return data.FolderImages(root)


def both_paths(source, keys, img_size=24, seed=5, bad_images="skip", impl="auto"):
    """The CPU path's views and skips, and the GPU path's (CPU stand-in), for the same keys."""
    cpu = data.RandomViews(source, img_size, seed, bad_images=bad_images)
    cpu_views, cpu_bad = zip(*(cpu.sample(*k) for k in keys))
    enc = gpu_data.EncodedViews(source, img_size, seed, bad_images=bad_images)
    decoder = gpu_data.ViewDecoder(enc, "cpu", impl=impl)
    gpu = decoder(gpu_data.collate_encoded([enc.sample(*k) for k in keys]))
    return torch.stack(cpu_views), [b for bad in cpu_bad for b in bad], gpu, decoder


def assert_same_views(cpu, gpu, name=""):
    err = ((gpu.double() - cpu.double()) * STD * 255).abs().max().item()
    assert err <= UINT8_TOL, f"{name}: {err:.3f} units of 255 between the paths > {UINT8_TOL}"


def test_every_kind_of_file_gives_the_cpu_paths_view(tmp_path, kinds):
    """The same keys give the same boxes and flips; JPEGs go through the (stand-in) GPU decoder, the rest
    (greyscale, CMYK, PNG, 16-bit, palette) through Pillow, one by one."""
    source = make_folder(tmp_path, {name: buf for name, (buf, _) in kinds.items()})
    keys = [(e, i) for e in (0, 3) for i in range(len(source))]
    cpu, _, gpu, decoder = both_paths(source, keys)
    assert gpu.images.shape == cpu.shape and not gpu.bad
    assert_same_views(cpu, gpu.images)
    gpu_files = sum(gpu for _, gpu in kinds.values())
    assert (decoder.gpu_decoded, decoder.pillow_decoded) == (2 * gpu_files, 2 * (len(kinds) - gpu_files))


def test_the_kernel_under_the_interpreter_makes_the_same_views(tmp_path, kinds):
    source = make_folder(tmp_path, {name: kinds[name][0] for name in ("baseline_420.jpg", "cmyk.jpg", "rgb.png")})
    keys = [(1, i) for i in range(3)]
    cpu, _, gpu, _ = both_paths(source, keys, img_size=20, impl="triton")
    assert_same_views(cpu, gpu.images, "triton")


def test_bad_files_are_replaced_as_on_the_cpu_path(tmp_path, kinds):
    """A file without a readable header is skipped in the worker; a JPEG cut short (readable header, data that
    Pillow cannot decode) in the main process. Either way the next readable image takes its place with the key's
    random numbers, as on the CPU path, and the batch lists the same skipped files."""
    jpeg = kinds["baseline_420.jpg"][0]
    files = {"a_empty.jpg": b"", "b_cut.jpg": jpeg[: len(jpeg) // 2], "c_good.jpg": jpeg, "d_text.jpg": b"hello"}
    files |= {"e_cut.jpg": jpeg[:700], "f_good.png": kinds["rgb.png"][0]}
    source = make_folder(tmp_path, files)
    keys = [(2, i) for i in range(len(source))]
    cpu, cpu_bad, gpu, _ = both_paths(source, keys)
    assert_same_views(cpu, gpu.images)
    assert sorted(b[:2] for b in gpu.bad) == sorted(b[:2] for b in cpu_bad)  # (index, path); reasons may differ
    assert {Path(b.path).name for b in gpu.bad} == {"a_empty.jpg", "b_cut.jpg", "d_text.jpg", "e_cut.jpg"}
    enc = gpu_data.EncodedViews(source, 24, 5, bad_images="error")
    cut = next(i for i in range(len(source)) if source.path(i).endswith("b_cut.jpg"))
    batch = gpu_data.collate_encoded([enc.sample(0, cut)])  # the header reads: the worker serves it
    with pytest.raises(data.BadImageError, match="b_cut.jpg"):
        gpu_data.ViewDecoder(enc, "cpu")(batch)


def test_the_loader_stream_is_independent_of_workers(tmp_path, kinds):
    source = make_folder(tmp_path, {name: buf for name, (buf, _) in kinds.items()})
    streams = []
    for workers in (0, 2):
        parts = pipeline.build_pipeline(source, 16, decode="gpu", device=torch.device("cpu"), seed=3, length=12,
                                        batch_size=4, num_workers=workers)  # fmt: skip
        parts.sampler.set_epoch(1, start=4)  # resumed part-way: the first batch skipped
        streams.append([parts.finish(b).images for b in parts.loader])
    assert len(streams[0]) == 2 and all(torch.equal(a, b) for a, b in zip(*streams))
    cpu = pipeline.build_pipeline(source, 16, decode="auto", device=torch.device("cpu"), seed=3, length=12,
                                  batch_size=4, num_workers=0)  # fmt: skip
    assert cpu.decode == "cpu" and isinstance(cpu.dataset, data.RandomViews)
    cpu.sampler.set_epoch(1, start=4)
    for a, b in zip(streams[0], cpu.loader):
        assert_same_views(b.images, a)


# ------------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
def test_cuda_decoder_and_views_against_the_cpu_path(tmp_path, kinds):
    """nvJPEG's pixels are not libjpeg-turbo's (its IDCT and chroma upsampling differ): the boxes and flips are the
    same by construction, the decoded pixels close on average (≤ 2 units of 255 here)."""
    source = make_folder(tmp_path, {name: buf for name, (buf, _) in kinds.items()})
    keys = [(e, i) for e in range(3) for i in range(len(source))]
    cpu = data.RandomViews(source, 32, 5)
    cpu_views = torch.stack([cpu.view(*k) for k in keys])
    enc = gpu_data.EncodedViews(source, 32, 5)
    decoder = gpu_data.ViewDecoder(enc, "cuda")
    gpu = decoder(gpu_data.collate_encoded([enc.sample(*k) for k in keys]))
    assert gpu.images.is_cuda and gpu.images.dtype == torch.float32 and decoder.gpu_decoded == 3 * 4
    diff = ((gpu.images.cpu().double() - cpu_views.double()) * STD * 255).abs()
    assert diff.mean().item() <= 2.0
