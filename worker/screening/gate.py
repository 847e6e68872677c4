"""The quality gate: should this image be scored at all? Small, typed, pure functions.

Each check returns a :class:`Rejection` (a stable ``code`` plus a sentence that says what
is wrong and what to do) or ``None``. Header checks run before any pixel is decoded;
the size and content checks run on the decoded image (:func:`check_image`, then
:func:`check_content`, where further :data:`ContentCheck` functions plug in, e.g. a learned
out-of-distribution score). Decoding problems (``unreadable``, ``not_an_image``, ...) are
raised by ``decode`` with the same codes. This enum is the one vocabulary of codes.

Codes are stable: store them, filter on them, never parse the sentence.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from cxr.settings import DEFAULT_CHEST_BODY_PARTS


class Code(StrEnum):
    # Gate rules (each can be turned off)
    not_radiograph = "not_radiograph"
    not_chest = "not_chest"
    lateral_view = "lateral_view"
    multi_frame = "multi_frame"
    too_small = "too_small"
    blank_image = "blank_image"
    inverted_polarity = "inverted_polarity"
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


#: The shortest acceptable side, as a fraction of the bundle's input size (see min_size_for).
MIN_SIZE_FRACTION = 0.5
DEFAULT_INPUT_SIZE = 224
#: Below this :func:`worker.screening.content.detail` a decoded picture is blank. The least
#: detail of any of 5,242 real films measured is 0.14 (README, *Quality gate*).
MIN_DETAIL = 0.05
#: A PNG/JPEG whose polarity score is under minus this is a negative (see content.polarity_score).
POLARITY_THRESHOLD = 2.0
POLARITY_MODES = ("invert", "reject", "off")


def min_size_for(input_size: int) -> int:
    """The shortest image side the gate accepts for a model reading ``input_size`` px:
    ``ceil(MIN_SIZE_FRACTION * input_size)`` (112 for 224). Anything the trainer's loader
    keeps passes (it applies the same gate); a smaller image would be upsampled more than 2x
    to fill the model's input, so it holds under a quarter of the detail the model reads."""
    return max(1, math.ceil(MIN_SIZE_FRACTION * input_size))


@dataclass(frozen=True)
class GateRules:
    """Which rules are on. Built from the settings (CXR_GATE_*) by the caller.

    ``min_size`` None: derived from the model bundle's input size (:func:`min_size_for`),
    which ``Screener`` fills in; without a bundle, from a 224 px input."""

    not_radiograph: bool = True
    not_chest: bool = True
    lateral_view: bool = True
    multi_frame: bool = True
    too_small: bool = True
    min_size: int | None = None
    chest_body_parts: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_CHEST_BODY_PARTS))
    not_chest_words: frozenset[str] = field(default_factory=lambda: NOT_CHEST_WORDS)
    blank_image: bool = True
    min_detail: float = MIN_DETAIL
    polarity: str = "invert"  # PNG/JPEG negatives: "invert" (and record it), "reject", or "off"

    def __post_init__(self) -> None:
        if self.polarity not in POLARITY_MODES:
            raise ValueError(f"polarity must be one of {', '.join(POLARITY_MODES)}, not {self.polarity!r}")

    @property
    def effective_min_size(self) -> int:
        return self.min_size if self.min_size is not None else min_size_for(DEFAULT_INPUT_SIZE)


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
    """The words of a header value, upper case, accents dropped (TÓRAX -> TORAX)."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", value) if not unicodedata.combining(c))
    return {w for w in re.split(r"[^A-Z]+", plain.upper()) if w}


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
        f"the image is {width}x{height} pixels, under {min_size} px on its short side, too small to screen "
        "(the model would have to enlarge it more than twice); send the full-resolution film "
        "(thumbnails and previews are not enough), or set CXR_GATE_MIN_SIZE",
    )


# Anatomy named by DICOM headers other than BodyPartExamined -----------------------------

NOT_CHEST_WORDS = frozenset({
    "KNEE", "KNEES", "HAND", "HANDS", "FOOT", "FEET", "SKULL", "HEAD", "BRAIN", "ABDOMEN", "ABDOMINAL", "ABD",
    "PELVIS", "PELVIC", "HIP", "HIPS", "SPINE", "CSPINE", "TSPINE", "LSPINE", "FEMUR", "TIBIA", "FIBULA",
    "ANKLE", "WRIST", "ELBOW", "SHOULDER", "HUMERUS", "FOREARM", "LEG", "ARM", "FINGER", "FINGERS", "THUMB",
    "TOE", "TOES", "HEEL", "CALCANEUS", "KUB", "SINUS", "SINUSES", "FACE", "FACIAL", "MANDIBLE", "DENTAL",
    "NECK", "CERVICAL", "LUMBAR", "SACRUM", "COCCYX", "EXTREMITY", "EXTREMITIES", "LIMB", "BREAST", "MAMMO",
    "MAMMOGRAPHY", "KNIE", "SCHAEDEL", "SCHADEL", "BECKEN", "WIRBELSAULE", "HUFTE", "GENOU", "PIED", "PIE", "CRANE",
    "BASSIN", "RODILLA", "MANO", "CRANEO", "CADERA", "COLUMNA", "GINOCCHIO", "CRANIO", "BACINO", "ANCA",
})
#: SNOMED CT and SNOMED-RT (SRT) codes of Anatomic Region Sequence items (PS3.16 CID 4031).
CHEST_CODES = frozenset({"43799004", "51185008", "39607008", "302551006", "T-D3000", "T-28000"})
NOT_CHEST_CODES = frozenset({
    "72696002", "85562004", "56459004", "89546000", "69536005", "818981001", "113345001", "12921003",
    "29836001", "421060004", "71341001", "12611008", "70258002", "74670003", "127949000", "16982005",
    "T-D9200", "T-D8700", "T-D9700", "T-11100", "T-D1100", "T-D4000", "T-D6000", "T-11500",
})
#: Fields read for anatomy when BodyPartExamined is empty, most specific first; the first with
#: a verdict decides.
ANATOMY_FIELDS = ("AnatomicRegionSequence", "ProtocolName", "SeriesDescription", "StudyDescription")


#: Chest words that only qualify another body part when one is named ("thoracic spine").
_CHEST_ADJECTIVES = frozenset({"THORACIC", "TORACICO", "THORAKAL"})


def _verdict(words: set[str], chest: set[str], not_chest: Iterable[str]) -> str | None:
    """'chest', or the first non-chest word found (when no chest noun is), or None."""
    if words & (chest - _CHEST_ADJECTIVES):
        return "chest"
    found = sorted(words & set(not_chest))
    if found:
        return found[0]
    return "chest" if words & chest else None


def anatomy_verdict(meta: Mapping[str, Any], chest_words: Iterable[str],
                    not_chest_words: Iterable[str] = NOT_CHEST_WORDS) -> tuple[str, str] | None:
    """(the header field that decided, ``"chest"`` or the body part it names) from
    BodyPartExamined, else the Anatomic Region Sequence (code meaning, or a SNOMED code),
    Protocol Name, Series Description or Study Description, in that order (PS3.3 C.7.3.1,
    C.8.4.6, C.7.2.1); None when no field names a body part. The first field that names the
    chest or another body part decides; one that names neither (e.g. "Routine") is passed
    over. ``meta["anatomy"]`` maps those keywords to their text (the sequence: a list of
    (code value, code meaning) pairs)."""
    chest = {w.upper() for w in chest_words}
    body_part = meta.get("body_part")
    if body_part and str(body_part).strip():
        return "BodyPartExamined", ("chest" if _words(str(body_part)) & chest else str(body_part))
    anatomy = meta.get("anatomy") or {}
    for keyword in ANATOMY_FIELDS:
        value = anatomy.get(keyword)
        if not value:
            continue
        if keyword == "AnatomicRegionSequence":
            verdict = None
            for code, meaning in value:
                v = _verdict(_words(meaning or ""), chest, not_chest_words)
                if v is None and code:
                    code = str(code).strip().upper()
                    v = "chest" if code in CHEST_CODES else ("a non-chest region" if code in NOT_CHEST_CODES
                                                             else None)
                verdict = verdict or v
        else:
            verdict = _verdict(_words(str(value)), chest, not_chest_words)
        if verdict is not None:
            return keyword, verdict
    return None


def header_says_chest(meta: Mapping[str, Any], rules: "GateRules") -> bool:
    """True when the DICOM header itself names the chest (see :func:`anatomy_verdict`)."""
    found = anatomy_verdict(meta, rules.chest_body_parts, rules.not_chest_words)
    return found is not None and found[1] == "chest"


def check_anatomy(meta: Mapping[str, Any], chest_words: Iterable[str],
                  not_chest_words: Iterable[str] = NOT_CHEST_WORDS) -> Rejection | None:
    """``not_chest`` when BodyPartExamined is empty and another header field names a body part
    that is not the chest (:func:`anatomy_verdict`); BodyPartExamined itself is
    :func:`check_body_part`'s."""
    if meta.get("body_part") and str(meta["body_part"]).strip():
        return None  # check_body_part decides
    found = anatomy_verdict(meta, chest_words, not_chest_words)
    if found is None or found[1] == "chest":
        return None
    keyword, verdict = found
    what = verdict if verdict.startswith("a ") else f"the {verdict.lower()}"
    return Rejection(
        Code.not_chest,
        f"BodyPartExamined is empty and {keyword} names {what}, not the chest; only chest radiographs "
        "are screened. If this is a chest film, correct the header at the modality or router, or set "
        "CXR_GATE_NOT_CHEST=false",
    )


def check_header(meta: Mapping[str, Any], rules: GateRules) -> Rejection | None:
    """Rules decided from the header alone, before any pixel is decoded. ``meta`` uses the
    study column names: modality, body_part, view_position, frames, and ``anatomy`` (see
    :func:`check_anatomy`)."""
    checks = (
        (rules.not_radiograph, lambda: check_modality(meta.get("modality"))),
        (rules.not_chest, lambda: check_body_part(meta.get("body_part"), rules.chest_body_parts)),
        (rules.not_chest, lambda: check_anatomy(meta, rules.chest_body_parts, rules.not_chest_words)),
        (rules.lateral_view, lambda: check_view(meta.get("view_position"))),
        (rules.multi_frame, lambda: check_frames(meta.get("frames"))),
    )
    for enabled, check in checks:
        if enabled and (rejection := check()) is not None:
            return rejection
    return None


def check_image(shape: tuple[int, ...], rules: GateRules) -> Rejection | None:
    """Rules decided on the decoded (H, W) image's size."""
    if rules.too_small:
        return check_size(int(shape[0]), int(shape[1]), rules.effective_min_size)
    return None


# What the picture shows ----------------------------------------------------------------

#: A check of the decoded picture: (H, W) float32 in [0, 1] (0 = black) -> a Rejection or None.
#: A learned out-of-distribution score plugs in here (``ScreenOptions.content_checks``).
ContentCheck = Callable[[np.ndarray], "Rejection | None"]


def check_blank(pixels: np.ndarray, min_detail: float = MIN_DETAIL, thumb: np.ndarray | None = None
                ) -> Rejection | None:
    """``blank_image`` when the decoded picture holds no radiograph: black, white, a uniform
    grey, uniform with noise, a gradient, or a small label on an empty field
    (:func:`worker.screening.content.detail` under ``min_detail``; ``thumb``: the picture's
    ``content.thumbnail`` when already made)."""
    from worker.screening.content import detail

    measured = detail(pixels, thumb)
    if measured >= min_detail:
        return None
    return Rejection(
        Code.blank_image,
        f"the decoded image is blank (detail {measured:.3f}, under {min_detail:g}: no usable contrast or "
        "structure, e.g. all black, a uniform grey or a gradient); nothing was scored. Check the export "
        "(window, bit depth, the right file) and send the radiograph again, or set CXR_GATE_BLANK_IMAGE=false",
    )


def check_content(pixels: np.ndarray, rules: GateRules, extra: Sequence[ContentCheck] = (),
                  thumb: np.ndarray | None = None) -> Rejection | None:
    """Rules decided on the decoded picture: blank first, then each ``extra`` check in order."""
    if rules.blank_image and (rejection := check_blank(pixels, rules.min_detail, thumb)) is not None:
        return rejection
    for check in extra:
        if (rejection := check(pixels)) is not None:
            return rejection
    return None


def inverted_polarity(score: float) -> Rejection:
    """The rejection for a negative PNG/JPEG when CXR_GATE_POLARITY=reject."""
    return Rejection(
        Code.inverted_polarity,
        f"the image looks like a negative (polarity score {score:.1f}: lungs bright, bone dark); export it "
        "again with its photometric interpretation applied (MONOCHROME1 inverted), or send the DICOM, "
        "or set CXR_GATE_POLARITY=invert to have it inverted and screened",
    )
