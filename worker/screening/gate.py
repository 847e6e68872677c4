"""The quality gate: should this image be scored at all? Small, typed, pure functions.

Each check returns a :class:`Rejection` (a stable ``code`` plus a sentence that says what
is wrong and what to do) or ``None``. Header checks run before any pixel is decoded;
the size check runs on the decoded image. Decoding problems (``unreadable``,
``not_an_image``, ...) are raised by ``decode`` with the same codes.

Codes are stable: store them, filter on them, never parse the sentence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Code(StrEnum):
    # Gate rules (each can be turned off)
    not_radiograph = "not_radiograph"
    not_chest = "not_chest"
    lateral_view = "lateral_view"
    multi_frame = "multi_frame"
    too_small = "too_small"
    # Input that cannot be decoded (always on)
    unreadable = "unreadable"
    not_an_image = "not_an_image"
    too_large = "too_large"
    unsupported_syntax = "unsupported_syntax"
    bad_filename = "bad_filename"
    # The installation, not the file, is at fault: the study is `failed`, not `rejected`
    codec_missing = "codec_missing"


#: Codes that mean this installation could not process a good file (study status `failed`).
FAILED_CODES = frozenset({Code.codec_missing})

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL"})


def status_for(code: str) -> str:
    """The study status for a code: `failed` when the installation is at fault, else `rejected`."""
    return "failed" if code in FAILED_CODES else "rejected"


@dataclass(frozen=True)
class Rejection:
    code: Code
    message: str

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


@dataclass(frozen=True)
class GateRules:
    """Which rules are on. Built from the settings (CXR_GATE_*) by the caller."""

    not_radiograph: bool = True
    not_chest: bool = True
    lateral_view: bool = True
    multi_frame: bool = True
    too_small: bool = True
    min_size: int = 256
    chest_body_parts: frozenset[str] = field(
        default_factory=lambda: frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CXR"})
    )


def _shown(value: str) -> str:
    """A header value quoted for a message, shortened (it comes from the file)."""
    value = value if len(value) <= 40 else value[:37] + "..."
    return repr(value)


def check_modality(modality: str | None) -> Rejection | None:
    if not modality:
        return None
    if modality.strip().upper() in RADIOGRAPH_MODALITIES:
        return None
    return Rejection(
        Code.not_radiograph,
        f"Modality is {_shown(modality)}, not a radiograph (CR, DX or DR); send the chest X-ray itself, "
        "or set CXR_GATE_NOT_RADIOGRAPH=false if this modality is mislabelled",
    )


def _words(value: str) -> set[str]:
    return {w for w in re.split(r"[^A-Z]+", value.upper()) if w}


def check_body_part(body_part: str | None, chest_words: Iterable[str]) -> Rejection | None:
    if not body_part or not body_part.strip():
        return None
    if _words(body_part) & {w.upper() for w in chest_words}:
        return None
    return Rejection(
        Code.not_chest,
        f"BodyPartExamined is {_shown(body_part)}, not a chest; only chest radiographs are screened. "
        "If this site labels chests that way, add the word to CXR_GATE_CHEST_BODY_PARTS, "
        "or set CXR_GATE_NOT_CHEST=false",
    )


def check_view(view_position: str | None) -> Rejection | None:
    if not view_position:
        return None
    if view_position.strip().upper() not in LATERAL_VIEWS:
        return None
    return Rejection(
        Code.lateral_view,
        f"ViewPosition is {_shown(view_position)} (a lateral view); the model reads frontal (PA/AP) films only. "
        "Send the frontal film of the study, or set CXR_GATE_LATERAL_VIEW=false",
    )


def check_frames(frames: int | None) -> Rejection | None:
    if frames is None or frames <= 1:
        return None
    return Rejection(
        Code.multi_frame,
        f"the DICOM object holds {frames} frames; a chest radiograph is a single frame. Send each image "
        "as its own object, or set CXR_GATE_MULTI_FRAME=false to screen the first frame",
    )


def check_size(height: int, width: int, min_size: int) -> Rejection | None:
    if min(height, width) >= min_size:
        return None
    return Rejection(
        Code.too_small,
        f"the image is {width}x{height} pixels, under {min_size} px on its short side, too small to screen; "
        "send the full-resolution film (thumbnails and previews are not enough), "
        "or lower CXR_GATE_MIN_SIZE",
    )


def check_header(meta: Mapping[str, Any], rules: GateRules) -> Rejection | None:
    """Rules decided from the header alone, before any pixel is decoded. ``meta`` uses the
    study column names: modality, body_part, view_position, frames."""
    checks = (
        (rules.not_radiograph, lambda: check_modality(meta.get("modality"))),
        (rules.not_chest, lambda: check_body_part(meta.get("body_part"), rules.chest_body_parts)),
        (rules.lateral_view, lambda: check_view(meta.get("view_position"))),
        (rules.multi_frame, lambda: check_frames(meta.get("frames"))),
    )
    for enabled, check in checks:
        if enabled and (rejection := check()) is not None:
            return rejection
    return None


def check_image(shape: tuple[int, ...], rules: GateRules) -> Rejection | None:
    """Rules decided on the decoded (H, W) image."""
    if rules.too_small:
        return check_size(int(shape[0]), int(shape[1]), rules.min_size)
    return None
