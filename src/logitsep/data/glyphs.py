"""Printed characters (``glyphs``): a real dataset of thousands of classes, rendered offline from the CJK fonts of
Debian's font packages.

**Classes** are Han characters in a nested order, so that every ``k`` is a prefix: first the 1,711 characters
common to GB2312 level 1 and JIS X 0208 level 1, then the rest of JIS level 1 (2,965 in all), then JIS level 2
(6,355 in all); JIS order within each group. Class names are the characters. ``glyphs`` is k = 2,965;
``glyphs-K`` any ``K ≤ 6,355``.

**Examples** are the characters drawn by every installed face (a face of a ``.ttc`` collection counts as one)
that covers all k characters (its ``cmap``, read with fontTools), as ``size × size`` grayscale images (default 32):
white ink on black, scaled to fit the glyph's ink box, then a seeded augmentation per image: an affine jitter
(rotation ±7°, scale 0.85–1.05, shear ±0.12, shift ±6%), a stroke weight (thicker or thinner by one pixel at
4× resolution), a blur (Gaussian, radius up to 0.7 px) and noise (σ up to 8 grey levels). Train faces are drawn
``train_draws`` times each (default 2), valid and test faces once.

**Faces that look the same are one face**: each face renders 48 probe characters, and faces whose images differ
by less than ``DUPLICATE_DISTANCE`` (mean absolute difference in [0, 1]) from a face kept before are dropped
(Noto Sans CJK KR and HK next to JP, SC and TC of one weight; IPA Gothic and Takao Gothic; ...). So are faces that
FreeType cannot draw, or that draw blank images (their cmap maps the characters to empty outlines).

**Splits by font**: the kept faces are grouped into designs (the family name without region and weight words,
e.g. all weights of Noto Serif CJK), designs are shuffled with ``seed`` and dealt to test, valid and train until
test and valid each hold about 15% of the faces: no face, and no design, of the test split is seen in training.

Built once and cached as an arrays folder (uint8 ``[n, 1, size, size]``, ``classes.txt``) under
``$LOGITSEP_DATA/glyphs/<key>`` (the key hashes k, size, seed, the augmentation and every font file used), then
memory-mapped. ``make data`` installs the font packages (:data:`FONT_PACKAGES`) with apt when run as root;
without fonts the loader names them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.checks import check_positive_int
from ..core.extras import require
from ..core.files import write_json
from .arrays import load_arrays, write_arrays
from .splits import DatasetNotFoundError, Splits, data_root

#: Debian packages with CJK faces (``make data`` installs them as root).
FONT_PACKAGES = (
    "fonts-noto-cjk", "fonts-noto-cjk-extra", "fonts-ipafont-gothic", "fonts-ipafont-mincho",
    "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho", "fonts-ipamj-mincho", "fonts-takao-gothic",
    "fonts-takao-mincho", "fonts-vlgothic", "fonts-arphic-ukai", "fonts-arphic-uming", "fonts-arphic-bkai00mp",
    "fonts-arphic-bsmi00lp", "fonts-arphic-gbsn00lp", "fonts-arphic-gkai00mp", "fonts-wqy-microhei",
    "fonts-wqy-zenhei", "fonts-droid-fallback", "fonts-horai-umefont", "fonts-hanazono", "fonts-nanum",
    "fonts-nanum-extra", "fonts-baekmuk", "fonts-unfonts-core", "fonts-sawarabi-gothic", "fonts-sawarabi-mincho",
    "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi", "fonts-mplus", "fonts-migmix", "fonts-monapo",
    "fonts-kiloji", "fonts-seto", "fonts-konatu", "fonts-komatuna", "fonts-misaki", "fonts-lxgw-wenkai",
    "fonts-cwtex-ming", "fonts-cwtex-kai", "fonts-cwtex-heib", "fonts-cwtex-yen", "fonts-cwtex-fs",
    "fonts-cns11643-kai", "fonts-cns11643-sung", "fonts-morisawa-bizud-gothic", "fonts-morisawa-bizud-mincho",
    "fonts-smiley-sans", "fonts-aoyagi-kouzan-t", "fonts-aoyagi-soseki", "fonts-kouzan-mouhitsu",
    "fonts-dejima-mincho", "fonts-oradano-mincho-gsrr", "fonts-mmcedar", "fonts-umeplus", "fonts-klee",
    "fonts-yozvox-yozfont",
)
FONT_DIRS = ("/usr/share/fonts",)
FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
DEFAULT_K = 2965
MAX_K = 6355
DUPLICATE_DISTANCE = 0.02
PROBES = 48
VERSION = 2  # of the rendering: part of the cache key


# --------------------------------------------------------------------------------------------- the classes


def _decode(rows: range, encoding: str) -> list[str]:
    out = []
    for row in rows:
        for cell in range(1, 95):
            try:
                out.append(bytes([0xA0 + row, 0xA0 + cell]).decode(encoding))
            except UnicodeDecodeError:
                continue
    return out


def characters(k: int = MAX_K) -> list[str]:
    """The first ``k`` classes: GB2312 level 1 ∩ JIS level 1 (1,711), the rest of JIS level 1 (to 2,965), then
    JIS level 2 (to 6,355), JIS order within each group (enumerated with Python's ``euc_jp`` and ``gb2312``)."""
    k = check_positive_int(k, "k", "glyphs")
    if k > MAX_K:
        raise ValueError(f"glyphs: k must be at most {MAX_K} (JIS X 0208 levels 1 and 2), got {k}")
    level1, level2 = _decode(range(16, 48), "euc_jp"), _decode(range(48, 85), "euc_jp")
    gb1 = set(_decode(range(16, 56), "gb2312"))
    common = [c for c in level1 if c in gb1]
    return (common + [c for c in level1 if c not in gb1] + level2)[:k]


# ----------------------------------------------------------------------------------------------- the faces


@dataclass(frozen=True)
class Face:
    """One face: a font file and its index in a collection, its family and style, the characters it covers."""

    path: str
    index: int
    family: str
    style: str

    @property
    def label(self) -> str:
        return f"{self.family} {self.style}".strip()

    @property
    def design(self) -> str:
        """The family without region and weight words: the faces of one design go to one split."""
        words = re.sub(r"([a-z])([A-Z])", r"\1 \2", self.family).lower().replace("-", " ").split()
        drop = {"jp", "sc", "tc", "kr", "hk", "tw", "cn", "mono", "thin", "light", "extralight", "demilight",
                "regular", "medium", "semibold", "bold", "extrabold", "black", "heavy", "ultra", "w3", "w6", "p",
                "std", "pro", "pr6n", "pr6", "ex", "bizud", "ud"}
        return " ".join(w for w in words if w not in drop) or self.family.lower()


def font_files(dirs: Sequence[str] = FONT_DIRS) -> list[Path]:
    return sorted(p for d in dirs if Path(d).is_dir() for p in Path(d).rglob("*") if p.suffix.lower()
                  in FONT_SUFFIXES and p.is_file())


def _faces_of(path: Path, chars: Sequence[str]) -> list[tuple[Face, int]]:
    """Every face of a font file with the length of the longest prefix of ``chars`` its cmap covers (fontTools;
    no face for an unreadable file or table)."""
    ttlib = require("fontTools.ttLib")
    TTCollection, TTFont, TTLibError = ttlib.TTCollection, ttlib.TTFont, ttlib.TTLibError  # noqa: N806

    try:
        fonts = TTCollection(str(path), lazy=True).fonts if path.suffix.lower() in (".ttc", ".otc") \
            else [TTFont(str(path), lazy=True)]
    except (TTLibError, OSError, AssertionError, KeyError, ValueError):
        return []
    out = []
    for index, font in enumerate(fonts):
        try:
            names = font["name"]
            family = str(names.getDebugName(16) or names.getDebugName(1) or path.stem)
            style = str(names.getDebugName(17) or names.getDebugName(2) or "")
            cmap = font.getBestCmap() or {}
        except Exception:  # a broken table in a font file: the face is left out
            continue
        covered = next((i for i, c in enumerate(chars) if ord(c) not in cmap), len(chars))
        out.append((Face(str(path), index, family, style), covered))
    return out


def scan_faces(files: Sequence[Path], cache: Path | None = None) -> list[tuple[Face, int]]:
    """Every face of ``files`` with how many of the classes (a prefix of :func:`characters`) it covers; the
    parsing cached by file (path, size, mtime) in ``cache``."""
    chars = characters(MAX_K)
    known: dict[str, list] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            known = {}
    out, fresh = [], {}
    for path in files:
        st = path.stat()
        key = f"{path}:{st.st_size}:{st.st_mtime_ns}:{VERSION}"
        entries = [(Face(**f), n) for f, n in known[key]] if key in known else _faces_of(path, chars)
        fresh[key] = [(f.__dict__, n) for f, n in entries]
        out += entries
    if cache is not None and fresh != known:
        write_json(cache, fresh)
    return out


# ------------------------------------------------------------------------------------------------ rendering


def _font(face: Face, px: int):  # noqa: ANN202 - a PIL FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(face.path, px, index=face.index)


def render(face: Face, chars: Sequence[str], size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """``uint8 [len(chars), size, size]``: each character white on black, its ink box scaled to fill ``size - 4``
    pixels; with ``rng``, one seeded augmentation per image (module docstring)."""
    from PIL import Image, ImageDraw, ImageFilter

    scale = 4  # drawn at 4× and reduced: smooth edges, and room for the stroke change
    big = size * scale
    font = _font(face, int(big * 0.8))
    out = np.zeros((len(chars), size, size), dtype=np.uint8)
    for i, ch in enumerate(chars):
        canvas = Image.new("L", (2 * big, 2 * big), 0)
        stroke = 0
        if rng is not None:
            stroke = int(rng.integers(-1, 2))  # thinner, as drawn, thicker
        ImageDraw.Draw(canvas).text((big // 2, big // 2), ch, fill=255, font=font)
        if stroke > 0:
            canvas = canvas.filter(ImageFilter.MaxFilter(3))
        elif stroke < 0:
            canvas = canvas.filter(ImageFilter.MinFilter(3))
        box = canvas.getbbox()
        if box is None:  # an empty glyph (never for covered Han characters): a black image
            continue
        glyph = canvas.crop(box)
        w, h = glyph.size
        fit = (size - 4) * scale / max(w, h)
        if rng is not None:
            fit *= float(rng.uniform(0.85, 1.05))
        glyph = glyph.resize((max(1, round(w * fit)), max(1, round(h * fit))), Image.BILINEAR)
        tile = Image.new("L", (big, big), 0)
        tile.paste(glyph, ((big - glyph.size[0]) // 2, (big - glyph.size[1]) // 2))
        if rng is not None:
            angle = math.radians(float(rng.uniform(-7, 7)))
            shear = float(rng.uniform(-0.12, 0.12))
            dx, dy = (float(v) * big for v in rng.uniform(-0.06, 0.06, size=2))
            c, s = math.cos(angle), math.sin(angle)
            cx = cy = big / 2  # the inverse map of a rotation and shear about the centre, then a shift
            a, b, d, e = c, s + shear, -s, c
            tile = tile.transform((big, big), Image.AFFINE,
                                  (a, b, cx - a * cx - b * cy - dx, d, e, cy - d * cx - e * cy - dy), Image.BILINEAR)
            radius = float(rng.uniform(0, 0.7)) * scale
            if radius > 0.5:
                tile = tile.filter(ImageFilter.GaussianBlur(radius))
        small = np.asarray(tile.resize((size, size), Image.LANCZOS), dtype=np.float32)
        if rng is not None:
            small = small + rng.normal(0, float(rng.uniform(0, 8)), small.shape)
        out[i] = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return out


BLANK_LEVEL = 32  # a plain rendering whose brightest pixel is darker than this holds no glyph


def _render_job(args: tuple[Face, list[str], int, int | None]) -> np.ndarray | None:
    """One face's images, or None when FreeType cannot draw one of its glyphs (a broken hinting program)."""
    face, chars, size, seed = args
    try:
        return render(face, chars, size, None if seed is None else np.random.default_rng(seed))
    except OSError:
        return None


def distinct_faces(faces: Sequence[Face], chars: Sequence[str], size: int = 32,
                   distance: float = DUPLICATE_DISTANCE) -> tuple[list[Face], dict[str, str]]:
    """The faces that do not look like a face kept before them (mean absolute difference of their renderings of
    ``chars``, in [0, 1], at least ``distance``), and ``{dropped face: the face it duplicates}``."""
    kept: list[tuple[Face, np.ndarray]] = []
    dropped: dict[str, str] = {}
    for face in faces:
        img = _render_job((face, list(chars), size, None))
        if img is None or (img.reshape(len(img), -1).max(axis=1) < BLANK_LEVEL).any():
            dropped[face.label] = "(FreeType cannot draw its glyphs, or draws blank ones)"
            continue
        img = img.astype(np.float32) / 255
        twin = next((f for f, other in kept if float(np.abs(img - other).mean()) < distance), None)
        if twin is None:
            kept.append((face, img))
        else:
            dropped[face.label] = twin.label
    return [f for f, _ in kept], dropped


def split_faces(faces: Sequence[Face], seed: int, fraction: float = 0.15) -> dict[str, list[Face]]:
    """Designs shuffled with ``seed`` and dealt to test, then valid: each takes, in that order, every whole design
    that still fits in ``fraction`` of the faces; the rest (large families among them) train."""
    designs: dict[str, list[Face]] = {}
    for face in faces:
        designs.setdefault(face.design, []).append(face)
    if len(designs) < 3:
        raise ValueError(f"glyphs: the faces that cover these characters belong to {len(designs)} designs; splits "
                         "by font need at least 3 (install more fonts: make data)")
    order = [designs[n] for n in np.random.default_rng(seed).permutation(sorted(designs))]
    target = max(1, round(fraction * len(faces)))
    out: dict[str, list[Face]] = {"test": [], "valid": [], "train": []}
    for split in ("test", "valid"):
        for group in list(order):  # whole designs that fit, in the shuffled order; larger ones stay in train
            if len(out[split]) + len(group) <= target and len(order) > 1:
                out[split] += group
                order.remove(group)
    out["train"] = [f for group in order for f in group]
    return out


# --------------------------------------------------------------------------------------------------- building


def _missing_fonts_error(k: int, found: int) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"glyphs: {found} installed font face(s) cover the first {k} characters; the dataset needs CJK fonts: "
        f"`make data` (as root) installs them, or `apt-get install {' '.join(FONT_PACKAGES)}`")


def glyph_faces(k: int, fonts: Sequence[str | Path] | None = None) -> list[Face]:
    """The installed faces (or those of ``fonts``) that cover the first ``k`` characters, in file order."""
    k = check_positive_int(k, "k", "glyphs")
    files = [Path(f) for f in fonts] if fonts is not None else font_files()
    cache = data_root() / "glyphs" / "faces.json" if fonts is None else None
    return [face for face, covered in scan_faces(files, cache) if covered >= k]


def build_glyphs(out: Path, k: int, size: int, seed: int, train_draws: int, faces: Sequence[Face],
                 progress: bool | None = None, jobs: int | None = None) -> dict:
    """Render the dataset into the arrays folder ``out`` (temporary folder, fsync, rename); returns its
    description (the faces of each split, the duplicates dropped), also saved as ``faces.json``."""
    chars = characters(k)
    probes = [chars[i] for i in np.linspace(0, len(chars) - 1, min(PROBES, len(chars))).astype(int)]
    kept, dropped = distinct_faces(faces, probes)
    split = split_faces(kept, seed)
    jobs_list, where = [], []
    for name in ("train", "valid", "test"):
        draws = train_draws if name == "train" else 1
        for face in split[name]:
            for draw in range(draws):
                key = int.from_bytes(hashlib.sha256(f"{seed}:{face.label}:{draw}".encode()).digest()[:8], "little")
                jobs_list.append((face, chars, size, key))
                where.append(name)
    workers = jobs if jobs is not None else max(1, min(len(jobs_list), os.cpu_count() or 1))
    images: list[np.ndarray | None] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for img in tqdm(pool.map(_render_job, jobs_list), total=len(jobs_list), desc=f"rendering {k} glyphs",
                        unit="face", leave=False, dynamic_ncols=True,
                        disable=None if progress is None else not progress):
            images.append(img)
    failed = sorted({job[0].label for job, img in zip(jobs_list, images, strict=True) if img is None})
    for name in split:  # a face FreeType cannot draw every glyph of is left out of its split
        split[name] = [f for f in split[name] if f.label not in failed]
        if not split[name]:
            raise ValueError(f"glyphs: no face of the {name} split can be drawn (left out: {', '.join(failed)})")
    arrays = {}
    for name in ("train", "valid", "test"):
        parts = [img for img, w, job in zip(images, where, jobs_list, strict=True)
                 if w == name and job[0].label not in failed]
        arrays[name] = (np.concatenate(parts)[:, None], np.tile(np.arange(k, dtype=np.int64), len(parts)))
    info = {"k": k, "size": size, "seed": seed, "train_draws": train_draws, "version": VERSION,
            "faces": {name: [f.label for f in fs] for name, fs in split.items()},
            "designs": {name: sorted({f.design for f in fs}) for name, fs in split.items()},
            "duplicates_dropped": dropped, "render_failed": failed, "faces_covering": len(faces),
            "faces_distinct": len(kept)}
    write_arrays(out, arrays, chars, {"faces.json": info})
    return info


def load_glyphs(k: int = DEFAULT_K, size: int = 32, seed: int = 0, train_draws: int = 2,
                fonts: Sequence[str | Path] | None = None, progress: bool | None = None,
                name: str | None = None) -> Splits:
    """Printed characters (module docstring), built on first use and cached, then memory-mapped. ``fonts``:
    font files to use instead of every installed one."""
    k = check_positive_int(k, "k", "glyphs")
    size = check_positive_int(size, "size", "glyphs", minimum=8)
    train_draws = check_positive_int(train_draws, "train_draws", "glyphs")
    faces = glyph_faces(k, fonts)
    if len(faces) < 3:
        raise _missing_fonts_error(k, len(faces))
    digest = hashlib.sha256(json.dumps([k, size, seed, train_draws, VERSION, DUPLICATE_DISTANCE, PROBES,
                                        [(f.path, f.index, os.stat(f.path).st_size) for f in faces]]).encode())
    out = data_root() / "glyphs" / f"k{k}-s{size}-{digest.hexdigest()[:16]}"
    if not (out / "train_x.npy").is_file():
        build_glyphs(out, k, size, seed, train_draws, faces, progress)
    return load_arrays(out, name=name or ("glyphs" if k == DEFAULT_K and size == 32 else f"glyphs-{k}"))


def glyphs_info(splits: Splits) -> dict:
    """The ``faces.json`` of a loaded glyphs dataset (its faces per split, the duplicates dropped)."""
    folder = Path(splits.train_x.parts[0][0].filename).parent
    return json.loads((folder / "faces.json").read_text(encoding="utf-8"))


def sample_grid(splits: Splits, path: str | Path, faces_per_split: int = 4, chars: int = 16,
                scale: int = 2) -> Path:
    """A PNG of examples: for each split, the first image of ``faces_per_split`` of its faces (one row each),
    ``chars`` characters across; rows of different splits separated by a grey line."""
    from PIL import Image

    from ..core.files import atomic_write

    rows = []
    draws = glyphs_info(splits)["train_draws"]
    k = splits.num_classes
    for split in ("train", "valid", "test"):
        x, _ = splits.split(split)
        per_face = k * (draws if split == "train" else 1)  # a face's images: its draws, each k characters
        faces = len(x) // per_face
        for face in np.linspace(0, faces - 1, min(faces_per_split, faces)).astype(int):
            imgs = np.asarray(x[int(face) * per_face:int(face) * per_face + chars])[:, 0]
            rows.append(np.concatenate(list((imgs * 256).clip(0, 255).astype(np.uint8)), axis=1))
        rows.append(np.full((2, rows[-1].shape[1]), 128, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m logitsep.data.glyphs [--k K] [--size S] --grid PNG``: build (or load) the dataset, print its faces
    per split, and write a grid of samples."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m logitsep.data.glyphs", description=main.__doc__)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--grid", help="write a PNG grid of samples here")
    args = parser.parse_args(argv)
    data = load_glyphs(k=args.k, size=args.size)
    info = glyphs_info(data)
    for split in ("train", "valid", "test"):
        print(f"{split}: {len(info['faces'][split])} faces, {len(np.asarray(data.split(split)[1]))} images: "
              + ", ".join(info["faces"][split]))
    print(f"{info['faces_covering']} faces cover the {args.k} characters, {info['faces_distinct']} are distinct; "
          f"{len(info['duplicates_dropped'])} dropped as near-duplicates or undrawable")
    if args.grid:
        print(f"wrote {sample_grid(data, args.grid)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
