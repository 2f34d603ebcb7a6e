"""PatchGrid: sizes, padding, split/merge, patch order, patch maps and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from paser.errors import ConfigError, PaserError
from paser.patches import PatchGrid

GRIDS = [(1, 1), (2, 3), (4, 4), (3, 1), (1, 5)]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_sizes_and_num_patches():
    grid = PatchGrid(4, 4)
    assert grid.num_patches == 16
    assert PatchGrid(2, 3).num_patches == 6
    assert grid.padded_size(225, 250) == (228, 252)
    assert grid.patch_size(225, 250) == (57, 63)
    assert grid.padded_size(224, 256) == (224, 256)
    assert PatchGrid(2, 3).padded_size(7, 7) == (8, 9)


@pytest.mark.parametrize(("rows", "cols"), GRIDS)
def test_split_merge_exact_inverse_4d_and_3d(rows, cols, gen):
    grid = PatchGrid(rows, cols)
    h, w = 3 * rows, 4 * cols
    images = torch.randn(2, 3, h * 2, w, generator=gen)
    patches = grid.split(images)
    assert patches.shape == (2 * grid.num_patches, 3, h * 2 // rows, w // cols)
    assert torch.equal(grid.merge(patches), images)

    labels = torch.randint(0, 5, (3, h, w * 2), generator=gen)
    label_patches = grid.split(labels)
    assert label_patches.shape == (3 * grid.num_patches, h // rows, w * 2 // cols)
    assert label_patches.dtype == torch.int64
    assert torch.equal(grid.merge(label_patches), labels)
    # merge then split is the identity too.
    assert torch.equal(grid.split(grid.merge(label_patches)), label_patches)


@pytest.mark.parametrize(("rows", "cols"), GRIDS)
def test_patch_order_row_major(rows, cols, gen):
    grid = PatchGrid(rows, cols)
    b, c, h, w = 3, 2, 2 * rows, 3 * cols
    x = torch.randn(b, c, h, w, generator=gen)
    patches = grid.split(x)
    ph, pw = h // rows, w // cols
    for img in range(b):
        for p in range(grid.num_patches):
            r, k = divmod(p, cols)
            expected = x[img, :, r * ph : (r + 1) * ph, k * pw : (k + 1) * pw]
            assert torch.equal(patches[img * grid.num_patches + p], expected)


def test_patch_order_hand_example():
    grid = PatchGrid(2, 2)
    x = torch.arange(16).reshape(1, 4, 4)
    patches = grid.split(x)
    assert patches.tolist() == [
        [[0, 1], [4, 5]],
        [[2, 3], [6, 7]],
        [[8, 9], [12, 13]],
        [[10, 11], [14, 15]],
    ]


def test_pad_crop_round_trip_non_divisible(gen):
    grid = PatchGrid(4, 4)
    x = torch.randn(2, 3, 225, 250, generator=gen)
    padded = grid.pad(x)
    assert padded.shape[-2:] == grid.padded_size(225, 250) == (228, 252)
    # No truncation: the original pixels are untouched, at the same coordinates.
    assert torch.equal(grid.crop(padded, 225, 250), x)
    assert torch.equal(grid.crop(grid.merge(grid.split(padded)), 225, 250), x)


def test_pad_modes_match_torch_pad(gen):
    grid = PatchGrid(4, 4)
    x = torch.randn(2, 3, 10, 13, generator=gen)  # -> 12 x 16: pads of 2 and 3 rows/cols
    for mode in ("reflect", "replicate"):
        assert torch.equal(grid.pad(x, mode=mode), F.pad(x, (0, 3, 0, 2), mode=mode))
    padded = grid.pad(x, mode="constant", value=-7.0)
    assert torch.equal(padded, F.pad(x, (0, 3, 0, 2), value=-7.0))


def test_pad_label_maps_and_long_reflect(gen):
    grid = PatchGrid(4, 4)
    labels = torch.randint(0, 3, (2, 10, 13), generator=gen)
    padded = grid.pad(labels)  # integer reflect (F.pad refuses it)
    assert padded.dtype == torch.int64 and padded.shape == (2, 12, 16)
    assert torch.equal(padded[:, 10, :13], labels[:, 8])  # mirror about the last row
    assert torch.equal(padded[:, :10, 13], labels[:, :, 11])
    ignored = grid.pad(labels, mode="constant", value=255)
    assert torch.equal(ignored[:, :10, :13], labels)
    assert (ignored[:, 10:] == 255).all() and (ignored[:, :, 13:] == 255).all()


def test_pad_index_mirrors_back_and_forth_like_numpy():
    """The gather behind :meth:`PatchGrid.pad` handles any pad, even longer than the side."""
    from paser.patches import _pad_index

    got = _pad_index(3, 16, "reflect", torch.device("cpu"))
    assert got.tolist() == np.pad(np.arange(3), (0, 13), mode="reflect").tolist()
    assert _pad_index(1, 4, "reflect", torch.device("cpu")).tolist() == [0, 0, 0, 0]


def test_pad_is_noop_when_divisible(gen):
    x = torch.randn(1, 1, 8, 8, generator=gen)
    assert PatchGrid(2, 4).pad(x) is x


def test_patch_map_hand_example():
    grid = PatchGrid(2, 2)
    values = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    out = grid.patch_map(values, 4, 6)
    assert out.shape == (2, 4, 6)
    assert out[0].tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [2, 2, 2, 3, 3, 3],
        [2, 2, 2, 3, 3, 3],
    ]
    assert torch.equal(out[1], out[0] + 4)


def test_patch_map_non_divisible_matches_pad_split_crop():
    grid = PatchGrid(2, 2)
    values = torch.tensor([[0.5, 1.5, 2.5, 3.5]])
    out = grid.patch_map(values, 5, 7)  # padded 6 x 8, patches 3 x 4
    assert out.shape == (1, 5, 7)
    assert out[0, 2, 3].item() == 0.5 and out[0, 3, 4].item() == 3.5
    assert out[0, 4, 6].item() == 3.5 and out[0, 0, 6].item() == 1.5
    # Same placement as filling the patches of the padded image and cropping.
    filled = grid.merge(values.reshape(-1, 1, 1).expand(-1, 3, 4))
    assert torch.equal(out, grid.crop(filled, 5, 7))


def test_grid_larger_than_image_is_a_clear_error():
    grid = PatchGrid(8, 8)
    with pytest.raises(ConfigError, match=r"8x8 is larger than the 5x20 image.*at most 5 rows"):
        grid.padded_size(5, 20)
    with pytest.raises(ConfigError, match="larger than"):
        grid.pad(torch.zeros(1, 1, 5, 20))
    with pytest.raises(ConfigError, match="larger than"):
        grid.split(torch.zeros(1, 4, 4))
    # patches of a fixed size (a run's tiles) cover a sliver of an image, padded
    tiles = PatchGrid(2, 2, patch=(64, 64))
    assert tiles.padded_size(64, 1) == (128, 128) and tiles.patch_size(1, 1) == (64, 64)


def test_split_non_divisible_names_shape_rule_and_padded_size():
    grid = PatchGrid(4, 4)
    with pytest.raises(ConfigError) as info:
        grid.split(torch.zeros(2, 3, 225, 250))
    message = str(info.value)
    assert "225x250" in message and "(2, 3, 225, 250)" in message
    assert "divisible by 4" in message and "228x252" in message
    assert isinstance(info.value, PaserError)


@pytest.mark.parametrize(("rows", "cols"), [(0, 2), (2, 0), (-1, 1), (2.0, 2), (True, 2)])
def test_invalid_grid(rows, cols):
    with pytest.raises(ConfigError, match="must be an integer >= 1"):
        PatchGrid(rows, cols)


def test_other_errors():
    grid = PatchGrid(2, 2)
    with pytest.raises(ConfigError, match="multiple of 4"):
        grid.merge(torch.zeros(6, 1, 2, 2))
    with pytest.raises(ConfigError, match=r"values must be \[B, 4\]"):
        grid.patch_map(torch.zeros(1, 3), 4, 4)
    with pytest.raises(ConfigError, match="cannot enlarge"):
        grid.crop(torch.zeros(1, 4, 4), 5, 4)
    with pytest.raises(ConfigError, match="pad mode"):
        grid.pad(torch.zeros(1, 3, 3), mode="wrap")
    with pytest.raises(ConfigError, match="expected"):
        grid.split(torch.zeros(4, 4))


def test_grid_is_frozen_and_hashable():
    grid = PatchGrid(2, 3)
    with pytest.raises(AttributeError):
        grid.rows = 4  # type: ignore[misc]
    assert {grid: 1}[PatchGrid(2, 3)] == 1
    assert str(grid) == "2x3"


def test_context_patches_carry_their_neighbours_and_centre_inverts():
    grid = PatchGrid(2, 2, halo=3)
    x = torch.rand(2, 1, 8, 8)
    ctx = grid.context(x)
    assert ctx.shape == (8, 1, 10, 10)
    assert torch.equal(grid.merge(grid.centre(ctx)), x)
    # patch 3 of image 1 (bottom right): its halo above and left is the real neighbours
    assert torch.equal(ctx[7, 0, :7, :7], x[1, 0, 1:, 1:])
    # ... and mirrored at the image border (reflect, without repeating the edge)
    assert torch.equal(ctx[7, 0, 7, :7], x[1, 0, 6, 1:])
    assert torch.equal(PatchGrid(2, 2).context(x), PatchGrid(2, 2).split(x))
    with pytest.raises(ConfigError, match="halo"):
        PatchGrid(2, 2, halo=-1)


def test_halo_edges_on_rectangles_and_images_no_larger_than_the_halo():
    grid = PatchGrid(1, 1, halo=2)
    assert grid.centre(torch.zeros(1, 1, 8, 12)).shape == (1, 1, 4, 8)  # rows and columns
    # a halo as large as the image: mirrored padding cannot reach, it repeats the edge
    small = PatchGrid(2, 2, halo=4)
    x = torch.rand(1, 1, 4, 4)
    ctx = small.context(x)
    assert ctx.shape == (4, 1, 10, 10)
    assert torch.equal(small.centre(ctx), small.split(x))
    # a grid wider than the image is said to be so, whatever its rows
    with pytest.raises(ConfigError, match="wide"):
        PatchGrid(1, 4).padded_size(8, 2)
