"""What a request may carry, checked before the service does any work: a class id, a threshold, base64 PNG
images of the model's size (decoded by :func:`logitsep.core.images.decode_png`, the one decoding path).

Every refusal is a :class:`BadInput` carrying the HTTP status the API answers with: 400 for bytes that are not a
readable PNG or base64, 422 for a well-formed request the model cannot take.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from ..core.checks import check_class
from ..core.checks import check_threshold as _threshold_value
from ..core.checks import check_top_k as _top_k_value
from ..core.images import InvalidImage, UnsupportedImage, decode_png

MAX_IMAGES = 1024  # images per /ingest request (inclusive)
# What :func:`decode_base64` accepts, as a pattern for the API schema (and its validation): an optional
# ``data:...,`` prefix, then non-empty padded base64 (standard alphabet, no whitespace).
BASE64_PATTERN = (r"^(?:data:[^,]*,)?(?:[A-Za-z0-9+/]{4})*"
                  r"(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)$")


class BadInput(ValueError):
    """A request the service refuses; ``status`` is the HTTP status the API answers with."""

    status = 422

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


def check_class_id(class_id: object, num_classes: int) -> int:
    """A class id: an ``int`` (not a ``bool``) in ``[0, k)`` (:func:`logitsep.core.checks.check_class`). An integer
    outside the range is a 404 (no such class: enrollment changes ``k`` at run time, so the schema cannot bound
    it), anything else a 422."""
    try:
        return check_class(class_id, num_classes, name="class_id")
    except (TypeError, ValueError) as err:
        missing = isinstance(class_id, int) and not isinstance(class_id, bool)
        raise BadInput(str(err), 404 if missing else 422) from None


def check_threshold(threshold: object) -> float:
    """A finite number (not a ``bool``)."""
    try:
        return _threshold_value(threshold)
    except ValueError as err:
        raise BadInput(str(err)) from None


def check_top_k(top_k: object) -> int | None:
    """None or a positive integer."""
    try:
        return _top_k_value(top_k)
    except ValueError as err:
        raise BadInput(str(err)) from None


def decode_base64(text: object, where: str) -> bytes:
    """The bytes of a base64 string (an optional ``data:image/png;base64,`` prefix is allowed)."""
    if not isinstance(text, str):
        raise BadInput(f"{where}: expected a base64 string, got {type(text).__name__}", 400)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(f"{where}: malformed base64 ({err})", 400) from None
    if not data:
        raise BadInput(f"{where}: empty image", 400)
    return data


def decode_images(pngs: list[bytes], layout: tuple[int, int, int], name: str = "images") -> np.ndarray:
    """All images of a request as one ``uint8`` array ``[n, H, W]`` (or ``[n, H, W, 3]``) of the model's
    ``layout`` = ``(channels, H, W)``; raises on the first bad one (nothing is kept). At most
    :data:`MAX_IMAGES`. Errors name the image as ``name[i]`` (or ``name`` alone for a single ``"image"``)."""
    if not pngs:
        raise BadInput(f"{name}: no images given")
    if len(pngs) > MAX_IMAGES:
        raise BadInput(f"{name}: too many images in one request: {len(pngs)} (at most {MAX_IMAGES})")
    channels, height, width = layout

    def one(i: int, data: bytes) -> np.ndarray:
        where = name if name == "image" else f"{name}[{i}]"
        try:
            return decode_png(data, where, size=(width, height), channels=1 if channels == 1 else 3)
        except InvalidImage as err:
            raise BadInput(str(err), 400) from None
        except UnsupportedImage as err:
            raise BadInput(str(err), 422) from None

    return np.stack([one(i, data) for i, data in enumerate(pngs)])
