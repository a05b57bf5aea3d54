"""Tests for minimm/vit.py: patches, the encoder's shapes and position interpolation, preprocessing of every
Pillow mode, both resize policies, and the errors load_image gives for files that are not images."""
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from minimm.vit import (PAD_FILL, POS_INIT_STD, ViT, ViTConfig, interpolate_pos_emb, load_image, patchify,
                        preprocess, sincos_2d, to_tensor, unpatchify)

SMALL = dict(image_size=24, patch_size=6, n_layer=2, n_head=3, n_embd=36)


def test_patchify_shapes_and_round_trip():
    images = torch.randn(3, 3, 18, 30)
    patches = patchify(images, 6)
    assert patches.shape == (3, 15, 108)  # grid 3 x 5, each patch 3 * 6 * 6
    # patch (row 1, column 2) is the 7th in row-major order and holds that square, flattened (3, ps, ps)
    assert torch.equal(patches[:, 7], images[:, :, 6:12, 12:18].reshape(3, -1))
    assert torch.equal(unpatchify(patches, 6, 18, 30), images)


def test_patchify_rejects_sizes_that_are_not_a_multiple():
    with pytest.raises(ValueError, match="patch_size=6"):
        patchify(torch.zeros(1, 3, 20, 18), 6)


def test_linear_patch_embedding_is_a_strided_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, kernel_size=5, stride=5)
    images = torch.randn(2, 3, 15, 25)
    by_conv = conv(images).flatten(2).transpose(1, 2)  # (B, P, C)
    by_linear = patchify(images, 5) @ conv.weight.reshape(10, -1).T + conv.bias
    torch.testing.assert_close(by_linear, by_conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_vit_output_shape(batch):
    model = ViT(ViTConfig(**SMALL))
    out = model(torch.randn(batch, 3, 24, 24))
    assert out.shape == (batch, 16, 36)
    assert torch.isfinite(out).all()


def test_vit_patches_see_each_other_but_not_other_images():
    torch.manual_seed(0)
    model = ViT(ViTConfig(**SMALL)).eval()
    images = torch.randn(3, 3, 24, 24)
    out = model(images)
    torch.testing.assert_close(model(images[1:2]), out[1:2], rtol=1e-4, atol=1e-5)
    changed = images.clone()
    changed[:, :, 18:, 18:] += 1.0  # only the last patch
    out2 = model(changed)
    assert not torch.allclose(out2[:, 0], out[:, 0])  # not causal: the first patch sees the last one


def test_vit_backward_reaches_every_parameter():
    model = ViT(ViTConfig(**SMALL))
    model(torch.randn(2, 3, 24, 24)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_position_interpolation_other_sizes_run():
    model = ViT(ViTConfig(**SMALL))
    assert model(torch.randn(2, 3, 36, 36)).shape == (2, 36, 36)
    assert model(torch.randn(1, 3, 12, 30)).shape == (1, 10, 36)  # not square, smaller and larger


def test_position_interpolation_is_identity_at_trained_size():
    grid = torch.randn(4, 5, 7)
    torch.testing.assert_close(interpolate_pos_emb(grid, 4, 5), grid.reshape(20, 7), rtol=0, atol=0)
    # the short-cut is not hiding a difference: bilinear resizing to the same size changes nothing
    same = nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=(4, 5), mode="bilinear",
                                     align_corners=False)[0].permute(1, 2, 0)
    torch.testing.assert_close(same, grid)
    resized = interpolate_pos_emb(grid, 7, 3)
    assert resized.shape == (21, 7)
    constant = interpolate_pos_emb(torch.full((4, 5, 2), 0.3), 9, 2)
    torch.testing.assert_close(constant, torch.full((18, 2), 0.3))


def test_vit_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=50, patch_size=8)
    with pytest.raises(ValueError, match="n_head"):
        ViTConfig(n_embd=100, n_head=3)
    assert ViTConfig().n_patches == 36


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    p_transparent = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p_transparent.info["transparency"] = 0
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, rng.integers(0, 256, size=(20, 30), dtype=np.uint8)])),
        "LA": Image.fromarray(rgb[..., :2].copy()),
        "L": Image.fromarray(rgb[..., 0]),
        "P": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "P+transparency": p_transparent,
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, size=(20, 30)).astype(np.uint16)),
        "I": Image.fromarray(rng.integers(0, 65536, size=(20, 30)).astype(np.int32)),
        "1": Image.fromarray(rgb[..., 0] > 127),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
@pytest.mark.parametrize("resize", ["pad", "crop"])
def test_preprocess_every_mode(mode, resize):
    image = _mode_images()[mode]
    assert image.mode == mode.split("+")[0]
    x = preprocess(image, 14, resize)
    assert x.shape == (3, 14, 14) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.std() > 0.1  # the picture survived: not a constant image


def test_transparent_pixels_come_out_white():
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent except one opaque blue column
    rgba[:, 6, :] = (0, 0, 255, 255)
    x = preprocess(Image.fromarray(rgba), 10, "crop")
    assert torch.equal(x[:, :, 0], torch.ones(3, 10))
    la = Image.fromarray(np.zeros((9, 9, 2), dtype=np.uint8))
    assert torch.equal(preprocess(la, 9, "crop"), torch.ones(3, 9, 9))
    p = Image.new("P", (9, 9), 3)
    p.info["transparency"] = 3
    assert torch.equal(preprocess(p, 9, "crop"), torch.ones(3, 9, 9))


def test_16_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 64, 257 * 200, 65535]], dtype=np.uint16).repeat(4, axis=0)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):
        x = preprocess(image, 4, "crop")
        expected = torch.tensor([0, 64, 200, 255]) / 127.5 - 1
        torch.testing.assert_close(x[0, 0], expected)
        torch.testing.assert_close(x[2, 3], expected)


def test_cmyk_and_1_bit_colours():
    assert torch.equal(preprocess(Image.new("CMYK", (5, 5), (0, 0, 0, 0)), 5), torch.ones(3, 5, 5))
    bits = Image.new("1", (5, 5), 0)
    bits.putpixel((2, 2), 1)
    x = preprocess(bits, 5, "crop")
    assert x[:, 2, 2].tolist() == [1.0, 1.0, 1.0] and x[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]


def test_resize_policies_on_a_wide_image():
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    padded = preprocess(wide, 12, "pad")
    grey = torch.tensor(PAD_FILL) / 127.5 - 1
    torch.testing.assert_close(padded[:, 0, 6], grey)  # bands above and below the picture
    torch.testing.assert_close(padded[:, 11, 6], grey)
    torch.testing.assert_close(padded[:, 6, 0], torch.tensor([1.0, -1.0, -1.0]))
    cropped = preprocess(wide, 12, "crop")
    torch.testing.assert_close(cropped, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 12, 12))
    with pytest.raises(ValueError, match="resize"):
        preprocess(wide, 12, "stretch")


def test_crop_keeps_the_centre():
    tall = np.zeros((30, 10, 3), dtype=np.uint8)
    tall[10:20] = 255  # the centre square is white, the ends black
    assert torch.equal(preprocess(Image.fromarray(tall), 10, "crop"), torch.ones(3, 10, 10))


def test_load_image_matches_preprocess(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(21, 17, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    pixels = load_image(path, 13, "pad")
    assert pixels.shape == (13, 13, 3) and pixels.dtype == np.uint8
    with Image.open(path) as image:
        torch.testing.assert_close(to_tensor(pixels[None])[0], preprocess(image, 13, "pad"))


def _broken_files(tmp_path):
    buf = tmp_path / "whole.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    return [tmp_path / "missing.png", truncated, text, empty]


def test_load_image_errors_name_the_file(tmp_path):
    for path in _broken_files(tmp_path):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            load_image(path, 16)


def test_to_tensor_from_memmap_and_tensor(tmp_path):
    pixels = np.lib.format.open_memmap(tmp_path / "px.npy", mode="w+", dtype=np.uint8, shape=(3, 5, 7, 3))
    pixels[:] = np.arange(3 * 5 * 7 * 3).reshape(pixels.shape) % 256
    pixels.flush()
    readonly = np.load(tmp_path / "px.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = to_tensor(readonly)
    assert x.shape == (3, 3, 5, 7)
    assert x[1, 2, 3, 4] == float(readonly[1, 3, 4, 2]) / 127.5 - 1
    torch.testing.assert_close(to_tensor(torch.from_numpy(np.array(readonly))), x)
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(x)


def test_sincos_positions_are_distinct_and_local():
    table = sincos_2d(6, 6, 32)  # (gh, gw, C)
    assert table.shape == (6, 6, 32)
    flat = table.reshape(36, 32)
    distance = torch.cdist(flat, flat)  # (36, 36)
    assert (distance + torch.eye(36) * 1e3).min() > 0.1  # every cell has its own vector
    # the first half encodes the row only, the second the column only
    torch.testing.assert_close(table[:, 0, :16], table[:, 5, :16])
    torch.testing.assert_close(table[0, :, 16:], table[5, :, 16:])
    # nearer cells have nearer vectors along a row and along a column
    assert distance[0, 1] < distance[0, 2] < distance[0, 5]
    assert distance[0, 6] < distance[0, 12] < distance[0, 30]
    odd = sincos_2d(3, 4, 30)  # any width: 15 channels for the row, 15 for the column
    assert odd.shape == (3, 4, 30) and len(torch.unique(odd.reshape(12, 30), dim=0)) == 12


def test_initial_positions_are_as_loud_as_the_patches():
    """At init the positions and the patch content must both be legible: neither drowns the other."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=48, patch_size=8, n_layer=2, n_head=4, n_embd=64))
    assert vit.pos_emb.std().item() == pytest.approx(POS_INIT_STD, rel=1e-4)
    images = (torch.rand(8, 3, 48, 48) * 2 - 1) * 0.6  # pixel values of std ~0.35, like the bundled scenes
    content = vit.patch_embed(patchify(images, 8))  # (B, P, C)
    ratio = content.std().item() / vit.pos_emb.std().item()
    assert 0.5 < ratio < 3, ratio  # with N(0, 0.02) weights the content would be ~0.1x the positions
