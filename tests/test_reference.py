"""The eager reference ops against independent, loop-by-loop computations of the spec's definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastmae import reference
from fastmae.masking import random_masking
from fastmae.pos_embed import sincos_2d


def test_pos_embed_matches_independent_float64_table():
    dim, g = 16, 5
    table = sincos_2d(dim, g)
    assert table.dtype == torch.float64 and table.shape == (1 + g * g, dim)
    assert torch.equal(table[0], torch.zeros(dim, dtype=torch.float64))
    quarter = dim // 4
    for row in range(g):
        for col in range(g):
            expect = []
            for pos in (col, row):  # first half: grid[0] (column index), second half: grid[1] (row index)
                omegas = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
                expect += [math.sin(pos * w) for w in omegas] + [math.cos(pos * w) for w in omegas]
            got = table[1 + row * g + col]
            assert torch.allclose(got, torch.tensor(expect, dtype=torch.float64), atol=1e-12, rtol=0)


def test_pos_embed_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 4)


@pytest.mark.parametrize("p,c", [(16, 3), (14, 1), (8, 3)])
def test_patchify_order_and_roundtrip(p, c):
    imgs = torch.randn(2, c, 2 * p, 3 * p)
    x = reference.patchify(imgs, p)
    assert x.shape == (2, 6, p * p * c)
    n, h, w, i, j, ch = 1, 1, 2, 3, p - 1, c - 1
    assert x[n, h * 3 + w, (i * p + j) * c + ch] == imgs[n, ch, h * p + i, w * p + j]
    assert torch.equal(reference.unpatchify(x, p, c, grid=(2, 3)), imgs)
    sq = torch.randn(2, c, 2 * p, 2 * p)
    assert torch.equal(reference.unpatchify(reference.patchify(sq, p), p, c), sq)


def test_masking_keeps_smallest_noise():
    noise = torch.rand(3, 10)
    ids_keep, mask, ids_restore = random_masking(3, 10, 0.7, noise=noise)
    assert ids_keep.shape == (3, 3) and mask.shape == (3, 10) and mask.dtype == torch.float32
    for n in range(3):
        order = sorted(range(10), key=lambda i: noise[n, i].item())
        assert ids_keep[n].tolist() == order[:3]
        assert mask[n].tolist() == [0.0 if i in order[:3] else 1.0 for i in range(10)]
        assert torch.equal(torch.argsort(ids_restore[n]), torch.argsort(noise[n]))


def test_patch_embed_matches_per_patch_loop():
    torch.manual_seed(0)
    n, c, p, d, g = 2, 3, 4, 5, 3
    imgs = torch.randn(n, c, g * p, g * p, dtype=torch.float64)
    weight = torch.randn(d, c, p, p, dtype=torch.float64)
    bias, cls = torch.randn(d, dtype=torch.float64), torch.randn(1, 1, d, dtype=torch.float64)
    pos = torch.randn(1, 1 + g * g, d, dtype=torch.float64)
    ids_keep = torch.tensor([[4, 0, 8], [2, 7, 3]])
    out = reference.patch_embed(imgs, ids_keep, weight, bias, pos, cls)
    assert out.shape == (n, 4, d)
    for b in range(n):
        assert torch.allclose(out[b, 0], cls[0, 0] + pos[0, 0])
        for k, idx in enumerate(ids_keep[b].tolist()):
            r, col = divmod(idx, g)
            patch = imgs[b, :, r * p : (r + 1) * p, col * p : (col + 1) * p].reshape(-1)  # (c, i, j) order
            expect = weight.reshape(d, -1) @ patch + bias + pos[0, 1 + idx]
            assert torch.allclose(out[b, 1 + k], expect)


def test_attention_matches_per_head_softmax():
    torch.manual_seed(0)
    b, n, h, d = 2, 5, 3, 4
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64)
    out = reference.attention(qkv, h)
    parts = qkv.view(b, n, 3, h, d)
    for head in range(h):
        q, k, v = parts[:, :, 0, head], parts[:, :, 1, head], parts[:, :, 2, head]
        expect = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
        assert torch.allclose(out[:, :, head * d : (head + 1) * d], expect)
    sdpa = F.scaled_dot_product_attention(*parts.permute(2, 0, 3, 1, 4).unbind(0), scale=0.3)
    assert torch.allclose(reference.attention(qkv, h, scale=0.3), sdpa.transpose(1, 2).reshape(b, n, h * d))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_matches_loop(norm_pix):
    torch.manual_seed(0)
    n, c, p, g = 2, 3, 2, 3
    imgs = torch.randn(n, c, g * p, g * p, dtype=torch.float64)
    pred = torch.randn(n, g * g, p * p * c, dtype=torch.float64)
    mask = (torch.rand(n, g * g) > 0.5).double()
    mask[0, 0] = 1
    total, count = 0.0, 0.0
    for b in range(n):
        for idx in range(g * g):
            r, col = divmod(idx, g)
            t = imgs[b, :, r * p : (r + 1) * p, col * p : (col + 1) * p].permute(1, 2, 0).reshape(-1)  # (i, j, c)
            if norm_pix:
                t = (t - t.mean()) / math.sqrt(t.var(unbiased=True).item() + 1e-6)
            total += mask[b, idx].item() * ((pred[b, idx] - t) ** 2).mean().item()
            count += mask[b, idx].item()
    loss = reference.masked_mse(pred, imgs, mask, p, norm_pix)
    assert math.isclose(loss.item(), total / count, rel_tol=1e-12)
    all_patches = reference.masked_mse(pred, imgs, None, p, norm_pix)
    assert torch.allclose(all_patches, reference.masked_mse(pred, imgs, torch.ones_like(mask), p, norm_pix))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_mse_of_the_masked_rows_equals_the_full_loss(norm_pix):
    """pred for the masked patches only, with ids naming them: the loss of the full prediction with the 0/1 mask."""
    torch.manual_seed(1)
    n, c, p, g = 2, 3, 4, 3
    imgs = torch.randn(n, c, g * p, g * p, dtype=torch.float64)
    full = torch.randn(n, g * g, p * p * c, dtype=torch.float64)
    mask = random_masking(n, g * g, 0.5).mask  # [N, L]
    ids = torch.argsort(mask, dim=1, descending=True, stable=True)[:, : int(mask[0].sum())]  # [N, M]
    rows = torch.gather(full, 1, ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]))  # [N, M, p²C]
    want = reference.masked_mse(full, imgs, mask.double(), p, norm_pix)
    torch.testing.assert_close(reference.masked_mse(rows, imgs, None, p, norm_pix, ids=ids), want, rtol=1e-12, atol=0)


def test_decoder_assembly_matches_loop():
    torch.manual_seed(0)
    n, num, keep, d = 2, 6, 3, 3
    noise = torch.rand(n, num)
    ids_keep, mask, ids_restore = random_masking(n, num, 0.5, noise=noise)
    x = torch.randn(n, 1 + keep, d)
    token, pos = torch.randn(1, 1, d), torch.randn(1, 1 + num, d)
    out = reference.decoder_assembly(x, ids_restore, token, pos)
    for b in range(n):
        assert torch.allclose(out[b, 0], x[b, 0] + pos[0, 0])
        for idx in range(num):
            kept = ids_keep[b].tolist()
            src = x[b, 1 + kept.index(idx)] if idx in kept else token[0, 0]
            assert mask[b, idx].item() == (0.0 if idx in kept else 1.0)
            assert torch.allclose(out[b, 1 + idx], src + pos[0, 1 + idx])
