"""Which files of a folder are images: one rule for every front end that walks folders (``detect``,
``extract-regions``, ``evaluate --images``, the demo and visualisers).

A file is taken when its extension is one Pillow can open - the common photo formats of
:data:`regionclip.data.images.IMAGE_EXTENSIONS` plus whatever the Pillow plugins registered *now* read
(``.jfif``, ``.jpe``, ``.apng``, ``.qoi``, ``.avif`` with Pillow >= 11.3, ``.heic`` once pillow-heif's opener is
registered...) - except formats that are documents or scientific containers, not photos. Decoding goes through the
same Pillow, so a file taken here and unreadable is reported by name, never skipped. Every other file is skipped
with one summary line naming a few of them, so a photo in an unexpected format is never lost without a word.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

from PIL import Image

from .images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

# Pillow formats that open but are not photos (or need an external program / an unregistered handler to decode)
_NOT_PHOTOS = {"EPS", "PDF", "MPEG", "BUFR", "GRIB", "HDF5", "WMF", "FITS"}


def image_extensions() -> tuple[str, ...]:
    """The extensions taken from folders (lower case, with the dot), see the module docstring."""
    Image.init()  # load every installed plugin's registration
    pillow = {ext.lower() for ext, fmt in Image.registered_extensions().items()
              if fmt in Image.OPEN and fmt not in _NOT_PHOTOS}
    return tuple(IMAGE_EXTENSIONS) + tuple(sorted(pillow - set(IMAGE_EXTENSIONS)))


def scan_folder(folder: Union[str, os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(images, skipped files) directly inside ``folder``, both sorted by name; sub-folders are not entered."""
    exts = set(image_extensions())
    images: list[Path] = []
    skipped: list[Path] = []
    for f in sorted(Path(folder).iterdir()):
        if not f.is_file():
            continue
        (images if f.suffix.lower() in exts else skipped).append(f)
    return images, skipped


def folder_images(folder: Union[str, os.PathLike]) -> list[Path]:
    """The images of ``folder`` (may be empty: the caller says what is missing); skipped files are summarised in
    one warning."""
    images, skipped = scan_folder(folder)
    if skipped:
        names = ", ".join(f.name for f in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        logger.warning("%s: %d file(s) skipped, not an image format Pillow reads here: %s", folder, len(skipped), names)
    return images


def list_images(path: Union[str, os.PathLike]) -> list[Path]:
    """Images of a folder (sorted by name, known extensions) or a single file."""
    p = Path(path)
    if p.is_dir():
        files = folder_images(p)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}, ...) in folder {p}")
        return files
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"no such image or folder: {p}")
