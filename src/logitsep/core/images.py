"""Images in and out of logitsep's models: the one decoding path (PNG bytes or files, ``.npy`` arrays) and the
conversions between uint8 pixels and model inputs.

Convention of every image dataset here: a model input is ``pixel / 256`` (exact in float32), flattened for the
MLP (``[H·W]``) or ``[C, H, W]`` for a CNN. :func:`image_layout` reads ``(channels, H, W)`` off an input shape;
:func:`inputs_from_images` turns pixels into inputs and :func:`pixels_from_inputs` back.

Decoding refuses what it cannot read faithfully: not a PNG, a corrupt one, 16-bit or other unusual modes, and
(when a size is asked for) any other size, checked from the header before a pixel is decoded, so an image
that claims 100000×100000 pixels costs nothing. :class:`InvalidImage` (the bytes are not a readable PNG) and
:class:`UnsupportedImage` (a readable image this model cannot take) are both ``ValueError``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}  # 8-bit (or less) modes; 16-bit images are refused
_GRAY_MODES = {"1", "L", "LA"}


class InvalidImage(ValueError):
    """The bytes are not a readable PNG image."""


class UnsupportedImage(ValueError):
    """A readable image that the model cannot take (its size or its pixel format)."""


MAX_PNG_CHUNKS = 256  # chunks before IEND; an image of these sizes needs a handful


def _check_png_chunks(data: bytes, where: str) -> None:
    """Refuse a PNG of more than :data:`MAX_PNG_CHUNKS` chunks, counted from the chunk headers alone (a few
    hundred steps at most): 520,000 empty ancillary chunks in 6 MB held the decoder, and the event loop, for
    seconds."""
    offset, count = len(PNG_SIGNATURE), 0
    while offset + 8 <= len(data):
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise UnsupportedImage(f"{where}: unsupported PNG: more than {MAX_PNG_CHUNKS} chunks")
        length = int.from_bytes(data[offset:offset + 4], "big")
        if data[offset + 4:offset + 8] == b"IEND":
            return
        offset += 12 + length


def decode_image(data: bytes, where: str, size: tuple[int, int] | None = None, channels: int | None = None,
                 formats: tuple[str, ...] = ("PNG",)) -> np.ndarray:
    """Decode image bytes of one of ``formats`` (Pillow's names: ``"PNG"``, ``"JPEG"``) to ``uint8`` pixels:
    ``[H, W]`` for grayscale, ``[H, W, 3]`` for colour (alpha dropped, palettes expanded). ``size``
    (``(width, height)``): refuse any other size, checked before decoding. ``channels`` (1 or 3): convert to
    grayscale (Pillow's ITU-R 601 luma, rounded) or RGB; None keeps the image's own. ``where`` names the image in
    every error message."""
    from PIL import Image

    if formats == ("PNG",) and not data.startswith(PNG_SIGNATURE):
        raise InvalidImage(f"{where}: not a readable PNG image: not a PNG image, its PNG signature is missing")
    if data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data, where)
        if data[12:16] == b"IHDR" and len(data) > 24 and data[24] == 16:
            # Pillow opens a 16-bit colour PNG as 8-bit "RGB", silently dropping the low bytes: its IHDR tells
            raise UnsupportedImage(f"{where}: unsupported PNG mode: 16-bit (8-bit grayscale or RGB expected)")
    kind = "/".join(formats)
    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as img:
            if size is not None and img.size != tuple(size):
                raise UnsupportedImage(f"{where}: wrong image size {img.size[0]}x{img.size[1]}, the model takes "
                                       f"{size[0]}x{size[1]}")
            if img.mode not in PNG_MODES:
                raise UnsupportedImage(f"{where}: unsupported {kind} mode {img.mode!r} (8-bit grayscale or RGB "
                                       "expected)")
            img.load()
            mode = {1: "L", 3: "RGB"}.get(channels or 0, "L" if img.mode in _GRAY_MODES else "RGB")
            return np.asarray(img.convert(mode), dtype=np.uint8)
    except (InvalidImage, UnsupportedImage):
        raise
    except Image.DecompressionBombError as err:  # dimensions far beyond any model's: refused before decoding
        wanted = f", the model takes {size[0]}x{size[1]}" if size is not None else ""
        raise UnsupportedImage(f"{where}: wrong image size{wanted} ({err})") from None
    except Exception as err:  # any decoder failure on untrusted bytes is the input's fault
        raise InvalidImage(f"{where}: not a readable {kind} image (corrupt {kind}: {type(err).__name__}: {err})"
                           ) from None


def decode_png(data: bytes, where: str, size: tuple[int, int] | None = None,
               channels: int | None = None) -> np.ndarray:
    """:func:`decode_image` of PNG bytes (the service's and ``logitsep query``'s input)."""
    return decode_image(data, where, size, channels, ("PNG",))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of ``uint8 [H, W]`` or ``[H, W, 3]`` pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def read_images(path: str | Path) -> np.ndarray:
    """Images from a file: a ``.npy`` array (read with ``allow_pickle=False``; any batch ``[n, ...]``) or one
    ``.png`` (:func:`decode_png`; returned as ``[1, H, W]`` uint8 for grayscale, ``[1, H, W, 3]`` for colour).
    Missing file: ``FileNotFoundError``; unreadable or unsupported: ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no input file {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path}: not a readable .npy array of images ({err})") from err
    if suffix == ".png":
        return decode_png(path.read_bytes(), str(path))[None]
    raise ValueError(f"{path}: unsupported input file type {suffix or '(none)'!r}; give a .npy or a .png file")


def image_layout(input_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """``(channels, H, W)`` of the images a model of ``input_shape`` takes: ``[C, H, W]`` (a CNN), ``[H, W]``,
    or a flat ``[F]`` with ``F`` a square (the MLP: square grayscale images); None when it takes no images."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        return (1, side, side) if side * side == shape[0] else None
    return None


def inputs_from_images(images: np.ndarray, input_shape: Sequence[int]) -> Tensor:
    """Model inputs ``[n, *input_shape]`` (float32) from images.

    ``images``: uint8 pixels (scaled ``pixel/256``, the datasets' convention) or floats taken as already scaled
    inputs. Layouts: ``[n, *input_shape]`` as is (e.g. rows of a dataset saved with ``np.save``), or images
    ``[n, H, W]`` / ``[n, H, W, C]`` (C = 1, 3 or 4; alpha dropped) of the model's H×W; a flat input shape
    ``[F]`` means square grayscale images ``√F×√F``. Colour is turned into gray by ITU-R 601 luma
    (``0.299R + 0.587G + 0.114B``, as Pillow's ``convert("L")`` but without rounding); gray is repeated for
    3-channel models. Wrong size: ``ValueError`` naming the expected ``H×W``.
    """
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    shape = tuple(int(s) for s in input_shape)
    if images.dtype == np.uint8:
        a = images.astype(np.float32) / 256.0
    elif np.issubdtype(images.dtype, np.floating):
        a = images.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("images contain NaN or infinite values")
    else:
        raise TypeError(f"images must be uint8 pixels or floating-point inputs, got dtype {images.dtype}")
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"no images: got an array of shape {images.shape}")
    n = a.shape[0]
    if a.shape[1:] == shape:
        return torch.from_numpy(np.ascontiguousarray(a))
    layout = image_layout(shape)
    if layout is None:
        raise ValueError(f"inputs must have shape [n, {', '.join(map(str, shape))}], got {images.shape}")
    channels, height, width = layout
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3, 4)):
        raise ValueError(f"images must be [n, {height}, {width}] or [n, {height}, {width}, C] with C in 1, 3, 4 "
                         f"(or inputs [n, {', '.join(map(str, shape))}]), got shape {images.shape}")
    if a.shape[1:3] != (height, width):
        raise ValueError(f"images must be {height}×{width} pixels (H×W) for this model, "
                         f"got {a.shape[1]}×{a.shape[2]}")
    if a.ndim == 4 and a.shape[3] == 4:
        a = a[..., :3]
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if channels == 1 and a.ndim == 4:
        a = np.float32(0.299) * a[..., 0] + np.float32(0.587) * a[..., 1] + np.float32(0.114) * a[..., 2]
    if a.ndim == 3:
        a = a[:, None] if channels == 1 else np.repeat(a[:, None], channels, axis=1)
    else:
        if channels != 3:
            raise ValueError(f"cannot turn colour images into {channels}-channel inputs")
        a = a.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(a.reshape(n, *shape), dtype=np.float32))


def pixels_from_inputs(x: Tensor | np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """``uint8`` images ``[n, H, W]`` (or ``[n, H, W, 3]``) of model inputs: pixel = round(256·x) clipped to 255,
    the inverse of ``x = pixel/256``. ``ValueError`` for a model that takes no images."""
    layout = image_layout(input_shape)
    if layout is None:
        raise ValueError(f"inputs of shape {tuple(input_shape)} are not images ([C, H, W], [H, W] or a flat "
                         "square image)")
    channels, height, width = layout
    values = x.numpy() if isinstance(x, Tensor) else np.asarray(x)
    pixels = np.clip(np.rint(values.astype(np.float64) * 256.0), 0, 255).astype(np.uint8)
    if channels == 1:
        return pixels.reshape(len(pixels), height, width)
    return pixels.reshape(len(pixels), channels, height, width).transpose(0, 2, 3, 1)
