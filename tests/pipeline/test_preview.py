"""`pipeline preview`: PCA pictures of targets, and the PNGs for a store and for a student checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.errors import UsageError
from pipeline.data.store import TargetStore
from pipeline.preview import (fit_pca, parse_rows, pca_colours, preview_size, run_preview, store_panels,
                              target_panel)

pytestmark = [pytest.mark.timeout(300)]


def png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_pca_colours_follow_the_main_direction_and_share_the_targets_scale():
    rng = np.random.default_rng(0)
    ramp = np.linspace(-1, 1, 16)
    direction = rng.normal(size=8)
    tokens = ramp[:, None] * direction[None, :] * 5 + rng.normal(scale=0.01, size=(16, 8))
    basis = fit_pca(tokens)
    colours = pca_colours(tokens, basis)
    assert colours.dtype == np.uint8 and colours.shape == (16, 3)
    red = colours[:, 0].astype(int)
    assert abs(red[-1] - red[0]) == 255 and np.all(np.diff(red) * np.sign(red[-1] - red[0]) >= 0)
    # A prediction equal to the target gets the target's colours; one twice as spread is clipped to the range.
    assert np.array_equal(pca_colours(tokens.copy(), basis), colours)
    assert pca_colours(tokens * 2, basis).min() == 0 and pca_colours(tokens * 2, basis).max() == 255
    # SVD's arbitrary signs are fixed (largest loading positive), so a target always gets the same colours.
    components = basis.components
    assert np.all(components[np.arange(3), np.abs(components).argmax(axis=1)] > 0)


def test_square_grids_become_pictures_and_single_tokens_bar_strips():
    rng = np.random.default_rng(1)
    grid, _ = target_panel(rng.normal(size=(36, 5)), "grid")
    assert grid.kind == "grid" and grid.data.shape[0] == grid.data.shape[1] and grid.data.shape[0] % 6 == 0
    bars, basis = target_panel(rng.normal(size=(1, 12)), "bars")
    assert bars.kind == "bars" and basis is None and bars.data.shape == (12,)


def test_rows_are_parsed_and_checked():
    assert parse_rows("0,5,9", 10) == [0, 5, 9]
    assert parse_rows("0-2,9", 10) == [0, 1, 2, 9]
    with pytest.raises(UsageError, match="0..9"):
        parse_rows("3,10", 10)
    with pytest.raises(UsageError, match="row numbers"):
        parse_rows("a", 10)


def test_store_preview_is_a_png_with_a_row_per_sample(demo_store, demo_dir, tmp_path):
    out = tmp_path / "preview.png"
    size = run_preview(str(demo_store), "0,5,9", str(out), shards=str(demo_dir / "shards"))
    assert size == preview_size(3, 1 + 3) == png_size(out)  # image + depth, seg, gen
    with Image.open(out) as image:
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 1000  # photos and PCA grids, not blank


def test_store_preview_refuses_shards_that_do_not_hold_the_rows(demo_store, demo_dir, tmp_path):
    one = str(sorted((demo_dir / "shards").glob("*.tar"))[0])
    with pytest.raises(UsageError, match="not among --shards"):
        run_preview(str(demo_store), "39", str(tmp_path / "p.png"), shards=one)


def test_store_preview_shows_each_sample_the_targets_of_its_own_image(grown_dir):
    # Samples 40..43 of the grown store: `again` (sample 0's image), `words` (no image), `mirrored` (a new image,
    # at target row 48) and `again` once more (a repeated key).
    store = TargetStore(str(grown_dir / "store"))
    first, again, words, mirrored, repeated = store_panels(store, [0, 40, 41, 42, 43],
                                                           shards=str(grown_dir / "shards"))
    assert again[0].title == "row 40, target row 0\nagain" and mirrored[0].title == "row 42, target row 48\nmirrored"
    assert np.array_equal(np.asarray(again[0].data), np.asarray(first[0].data))
    for i in range(1, 4):  # depth, gen, seg
        assert again[i].kind == first[i].kind != "empty" and np.array_equal(again[i].data, first[i].data)
        assert mirrored[i].kind != "empty" and not np.array_equal(mirrored[i].data, first[i].data)
        assert words[i].kind == repeated[i].kind == "empty" and "no target row" in words[i].title


def test_store_preview_rows_are_the_samples_of_the_index(grown_dir, tmp_path):
    out = tmp_path / "preview.png"
    assert run_preview(str(grown_dir / "store"), "43", str(out)) == preview_size(1, 1 + 3) == png_size(out)
    with pytest.raises(UsageError, match=r"0\.\.43 \(not \[44\]\)"):  # the arrays are longer: 49 target rows
        run_preview(str(grown_dir / "store"), "44", str(tmp_path / "p.png"))


@pytest.mark.slow
def test_checkpoint_preview_shows_target_and_prediction_per_task(demo_checkpoint, demo_store, tmp_path):
    out = tmp_path / "predicted.png"
    size = run_preview(str(demo_store), "0,12", str(out), checkpoint=str(demo_checkpoint))
    assert size == preview_size(2, 1 + 2 * 3) == png_size(out)  # image + (target, prediction) x 3 tasks
