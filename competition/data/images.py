"""Reading images: any common format to RGB uint8."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` from any common image: grayscale is repeated, alpha dropped, 16-bit scaled."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise OSError(f"image file is empty (0 bytes): {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise OSError(f"cannot decode image (corrupt or unsupported format): {path}")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise OSError(f"unsupported image dtype {image.dtype}: {path}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class MissingImagesError(FileNotFoundError):
    """Images a data set names are not where its root says (a wrong ``--data-root`` / ``data.root``)."""


DECODED = 16  # images decoded by check_images (spread over the set); every name is checked to exist


def check_images(
    root: str | os.PathLike, names: list[str], source: str, root_flag: str, allowed_missing: float = 0.0
) -> tuple[int, tuple[int, int] | None]:
    """Before any work: every image ``source`` names exists under ``root`` (at most a share
    ``allowed_missing`` may be absent, with a warning) and ``DECODED`` of them, spread over the set, decode.
    Returns how many exist and the first decoded image's ``(height, width)``. ``root_flag`` names the setting
    to fix (``--data-root``, ``data.root``)."""
    import warnings

    if not names:
        raise MissingImagesError(f"{source} names no images")
    root = Path(root)
    missing = [n for n in names if not (root / n).is_file()]
    shown = f"{missing[:3]}{' ...' if len(missing) > 3 else ''}"
    if len(missing) > allowed_missing * len(names):
        hint = f" ({root} does not exist)" if not root.is_dir() else ""
        raise MissingImagesError(
            f"{len(missing)} of the {len(names)} images named by {source} are not under {root} ({root_flag})"
            f"{hint}: {shown}"
        )
    if missing:
        warnings.warn(f"{len(missing)} of the {len(names)} images named by {source} are missing: {shown}",
                      stacklevel=2)  # fmt: skip
    present = sorted(set(names) - set(missing))
    shape, bad = None, []
    for name in present[:: max(1, len(present) // DECODED)][:DECODED]:
        try:
            image = read_image(root / name)
        except OSError as exc:
            bad.append(str(exc))
            continue
        shape = shape or image.shape[:2]
    if bad:
        raise OSError(f"{len(bad)} of the images tried do not decode: {bad[:3]}")
    return len(present), shape
