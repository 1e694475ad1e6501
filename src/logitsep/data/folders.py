"""Your own data as an image folder, decoded once into an arrays folder and memory-mapped from then on.

    PATH/<class name>/*.png|*.jpg|*.jpeg                    validation and test carved from it by seed, or
    PATH/train/<class name>/…, PATH/valid/…, PATH/test/…    (valid/ and test/ optional)

Class names are the folder names (sorted; the classes of ``train``); every image must have the size of the first
one; all grayscale images give ``[1, H, W]`` inputs, any colour image makes every image RGB ``[3, H, W]``. Images
are decoded with Pillow (:func:`logitsep.core.images.decode_image`), once: the arrays go to
``$LOGITSEP_DATA/folders/<key>/`` (the key hashes the folder's path and every file's name, size and modification
time, so any change decodes again), written in a temporary folder and renamed into place, then loaded as an arrays
folder (:mod:`.arrays`). Errors name the file or folder: a class folder without images, a file that is not a
``.png``/``.jpg``/``.jpeg`` image (hidden files are skipped), an unreadable image, an image of another size, a class
of ``valid``/``test`` that ``train`` does not have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.images import decode_image
from .arrays import SPLITS, load_arrays, write_arrays
from .splits import DatasetNotFoundError, Splits, data_root

EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def is_image_folder(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _listing(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """``split → class → image files`` (splits ``train``/``valid``/``test``, or ``train`` alone for class folders)."""
    split_layout = (folder / "train").is_dir()
    roots = {s: folder / s for s in SPLITS if (folder / s).is_dir()} if split_layout else {"train": folder}
    out: dict[str, dict[str, list[Path]]] = {}
    for split, root in roots.items():
        classes: dict[str, list[Path]] = {}
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                raise ValueError(f"{entry}: expected class folders in {root} (PATH/<class name>/*.png), "
                                 f"found a file")
            if entry.name != entry.name.strip() or "\n" in entry.name:
                raise ValueError(f"{entry}: a class name (folder name) must not start or end with spaces or hold "
                                 "a newline")
            files = []
            for path in sorted(entry.iterdir()):
                if path.name.startswith("."):
                    continue
                if path.suffix.lower() not in EXTENSIONS or not path.is_file():
                    raise ValueError(f"{path}: not an image file (a class folder holds .png, .jpg or .jpeg images)")
                files.append(path)
            if not files:
                raise ValueError(f"{entry}: class folder without images")
            classes[entry.name] = files
        if not classes:
            raise ValueError(f"{root}: no class folders (PATH/<class name>/*.png)")
        out[split] = classes
    return out


def _key(folder: Path, listing: dict[str, dict[str, list[Path]]]) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for split, classes in listing.items():
        for name, files in classes.items():
            for path in files:
                st = path.stat()
                digest.update(f"{split}/{name}/{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_all(listing: dict[str, dict[str, list[Path]]], progress: bool | None) -> tuple[dict, list[str]]:
    names = list(listing["train"])
    index = {n: i for i, n in enumerate(names)}
    for split, classes in listing.items():
        extra = [n for n in classes if n not in index]
        if extra:
            raise ValueError(f"{split}/ has classes that train/ does not: {', '.join(extra[:10])}")
    files = [(split, index[name], path) for split, classes in listing.items() for name, paths in classes.items()
             for path in paths]
    pixels, size, colour = [], None, False
    for _, _, path in tqdm(files, desc="decoding images", unit="image", leave=False, dynamic_ncols=True,
                           disable=None if progress is None else not progress):
        img = decode_image(path.read_bytes(), str(path), formats=("PNG", "JPEG"))
        if size is None:
            size = img.shape[:2]
        elif img.shape[:2] != size:
            raise ValueError(f"{path}: {img.shape[1]}x{img.shape[0]} pixels, but {files[0][2]} is "
                             f"{size[1]}x{size[0]}: every image must have one size")
        colour |= img.ndim == 3
        pixels.append(img)
    arrays: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for (split, label, _), img in zip(files, pixels, strict=True):
        if colour:
            img = np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img
            img = img.transpose(2, 0, 1)
        xs, ys = arrays.setdefault(split, ([], []))
        xs.append(img)
        ys.append(label)
    return {s: (np.stack(xs), np.asarray(ys, dtype=np.int64)) for s, (xs, ys) in arrays.items()}, names


def build_arrays(folder: Path, out: Path, progress: bool | None = None,
                 listing: dict[str, dict[str, list[Path]]] | None = None) -> Path:
    """Decode an image folder into the arrays folder ``out`` (temporary folder, fsync, rename)."""
    listing = listing if listing is not None else _listing(folder)
    arrays, names = _decode_all(listing, progress)
    return write_arrays(out, arrays, names)


def load_image_folder(folder: str | Path, seed: int = 0, progress: bool | None = None) -> Splits:
    """Load an image folder (see the module docstring): decoded once, then memory-mapped."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"no data folder {folder}")
    listing = _listing(folder)
    cache = data_root() / "folders" / _key(folder, listing)
    if not (cache / "train_x.npy").is_file():
        build_arrays(folder, cache, progress, listing)
    return load_arrays(cache, seed=seed, name=str(folder.resolve()))
