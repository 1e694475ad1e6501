"""Printed characters (``glyphs``): the nested character sets, font coverage, near-duplicate faces counted once,
splits by font, seeded rendering, the cache; a small version built from a few of Debian's CJK font files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from logitsep.data import DatasetNotFoundError, dataset_name, load_dataset
from logitsep.data.glyphs import (
    FONT_PACKAGES,
    Face,
    characters,
    distinct_faces,
    glyph_faces,
    glyphs_info,
    load_glyphs,
    render,
    sample_grid,
    split_faces,
)

# small fonts of six packages `make data` installs: IPAex Gothic and Mincho, IPA Gothic (which IPAex Gothic
# nearly duplicates), VL Gothic, Sawarabi Gothic, Hanazono Mincho, Kiloji (a hand-written face)
FONTS = [
    "/usr/share/fonts/opentype/ipaexfont-gothic/ipaexg.ttf",
    "/usr/share/fonts/opentype/ipaexfont-mincho/ipaexm.ttf",
    "/usr/share/fonts/opentype/ipafont-gothic/ipag.ttf",
    "/usr/share/fonts/truetype/vlgothic/VL-Gothic-Regular.ttf",
    "/usr/share/fonts/truetype/sawarabi-gothic/sawarabi-gothic-medium.ttf",
    "/usr/share/fonts/truetype/hanazono/HanaMinA.ttf",
    "/usr/share/fonts/truetype/kiloji/kiloji.ttf",
]


def _fonts() -> list[str]:
    missing = [f for f in FONTS if not os.path.isfile(f)]
    if missing:
        message = f"{len(missing)} test fonts missing ({missing[0]}, ...): `make data` installs them, as root"
        if os.environ.get("CI"):
            pytest.fail(message + " — required in CI")
        pytest.skip(message)
    return FONTS


def test_the_classes_are_nested_han_sets() -> None:
    full = characters()
    assert len(full) == 6355 == len(set(full))
    assert characters(1711) == full[:1711] and characters(2965) == full[:2965]
    for c in full[:1711]:  # in GB2312 level 1 (rows 16-55) and in JIS X 0208 level 1 (rows 16-47)
        gb, jis = c.encode("gb2312"), c.encode("euc_jp")
        assert 16 <= gb[0] - 0xA0 <= 55 and 16 <= jis[0] - 0xA0 <= 47, c
    for c in full[1711:2965]:
        assert 16 <= c.encode("euc_jp")[0] - 0xA0 <= 47
    for c in full[2965:]:
        assert 48 <= c.encode("euc_jp")[0] - 0xA0 <= 84
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in full)  # CJK unified ideographs
    with pytest.raises(ValueError, match="at most 6355"):
        characters(6356)
    assert dataset_name("glyphs-500") == "glyphs-500"
    with pytest.raises(ValueError, match="unknown dataset 'glyph'"):
        dataset_name("glyph")


def test_faces_cover_duplicates_and_splits() -> None:
    faces = glyph_faces(200, _fonts())
    assert len(faces) == len(FONTS)  # each covers the first 200 characters
    chars = characters(48)
    kept, dropped = distinct_faces(faces, chars)
    assert "IPAGothic Regular" in dropped and dropped["IPAGothic Regular"] == "IPAexGothic Regular"
    assert len(kept) == len(faces) - len(dropped) >= 5
    again, _ = distinct_faces([*kept, kept[0]], chars)  # the same face twice is one face
    assert again == kept
    split = split_faces(kept, seed=0, fraction=0.2)
    labels = {name: {f.label for f in fs} for name, fs in split.items()}
    assert not labels["test"] & labels["train"] and not labels["valid"] & labels["train"]
    assert not labels["test"] & labels["valid"] and sum(map(len, labels.values())) == len(kept)
    designs = {name: {f.design for f in fs} for name, fs in split.items()}
    assert not designs["test"] & designs["train"]  # no design of the test faces is seen in training
    with pytest.raises(ValueError, match="at least 3"):
        split_faces(kept[:2], seed=0)


def test_rendering_is_seeded_and_fills_the_image() -> None:
    face = glyph_faces(10, _fonts()[:1])[0]
    plain = render(face, characters(10), 24)
    assert plain.shape == (10, 24, 24) and plain.dtype == np.uint8
    ink = plain > 128
    rows, cols = np.flatnonzero(ink.any(axis=(0, 2))), np.flatnonzero(ink.any(axis=(0, 1)))
    assert rows.min() <= 3 and rows.max() >= 20 and cols.min() <= 3 and cols.max() >= 20  # scaled to fill
    a = render(face, characters(10), 24, np.random.default_rng(5))
    b = render(face, characters(10), 24, np.random.default_rng(5))
    c = render(face, characters(10), 24, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, plain)


def test_a_small_glyphs_dataset_is_built_once_and_split_by_font(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LOGITSEP_DATA", str(tmp_path))
    data = load_glyphs(k=30, size=16, fonts=_fonts(), train_draws=2, progress=False)
    info = glyphs_info(data)
    assert data.name == "glyphs-30" and data.num_classes == 30 and data.class_names == characters(30)
    assert data.input_shape == (1, 16, 16) and data.on_disk
    n_faces = {s: len(info["faces"][s]) for s in ("train", "valid", "test")}
    assert len(data.train_y) == 30 * 2 * n_faces["train"] and len(data.test_y) == 30 * n_faces["test"]
    assert np.array_equal(np.asarray(data.test_y)[:30], np.arange(30))
    assert not set(info["faces"]["test"]) & set(info["faces"]["train"])
    assert info["duplicates_dropped"] == {"IPAGothic Regular": "IPAexGothic Regular"}
    built = sorted(p for p in (tmp_path / "glyphs").iterdir() if p.is_dir())
    before = (built[0] / "train_x.npy").stat().st_mtime_ns
    again = load_glyphs(k=30, size=16, fonts=_fonts(), train_draws=2, progress=False)  # from the cache
    assert (built[0] / "train_x.npy").stat().st_mtime_ns == before
    assert np.array_equal(np.asarray(again.valid_x), np.asarray(data.valid_x))
    assert json.loads((built[0] / "faces.json").read_text())["k"] == 30
    png = sample_grid(data, tmp_path / "grid.png", faces_per_split=2, chars=10, scale=1)
    from PIL import Image

    rows = sum(min(2, n) for n in n_faces.values())
    with Image.open(png) as img:  # up to 2 faces per split (16 px), two grey separators of 2 px; 10 characters
        assert img.size == (160, rows * 16 + 2 * 2)
    with pytest.raises(DatasetNotFoundError, match="fonts-noto-cjk"):
        load_glyphs(k=30, fonts=[])
    assert FONT_PACKAGES[0] == "fonts-noto-cjk"


def test_glyphs_k_through_the_registry(tmp_path: Path, monkeypatch) -> None:
    """``load_dataset("glyphs-K")`` reaches load_glyphs with k = K (fonts given as a keyword here)."""
    monkeypatch.setenv("LOGITSEP_DATA", str(tmp_path))
    data = load_dataset("glyphs-12", size=12, fonts=_fonts(), progress=False)
    assert data.num_classes == 12 and data.name == "glyphs-12" and data.input_shape == (1, 12, 12)


def test_face_design_names() -> None:
    def face(family: str) -> Face:
        return Face("x.ttf", 0, family, "Regular")

    assert face("Noto Sans CJK JP").design == face("Noto Sans CJK SC").design == "noto sans cjk"
    assert face("IPAexGothic").design != face("IPAexMincho").design
