"""open -> gate -> decode -> gate -> preprocess -> infer -> explain for one file's bytes.

Shared by ``cxr predict`` and the Celery worker, so both decode, gate and score alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr.bundle import BundleMeta
from worker.screening.budget import DecodeBudget, TooLargeForBudget, decoded_bytes
from worker.screening.decode import ImageDecodeError, VoiOptions, decode, decode_pixels, open_image
from worker.screening.explain import gradcam, gradcam_from_features, save_heatmap
from worker.screening.content import polarity_scores, thumbnail
from worker.screening.gate import (
    POLARITY_THRESHOLD,
    Code,
    ContentCheck,
    GateRules,
    Rejection,
    check_content,
    check_header,
    check_image,
    header_says_chest,
    inverted_polarity,
    min_size_for,
    status_for,
)
from worker.screening.infer import calibrated
from worker.screening.model import LoadedModel
from worker.screening.preprocess import preprocess
from worker.screening.reliability import Reliability, assess

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str  # "done" | "rejected" (the file: see reject_code) | "failed" (this installation)
    reject_code: str | None = None  # a worker.screening.gate.Code when not done
    probabilities: dict[str, float] | None = None
    predicted_class: str | None = None
    risk: float | None = None
    flagged: bool | None = None
    heatmap_path: str | None = None
    # What the model knows it does not know (worker/screening/reliability.py); None when the
    # bundle has no statistics for it. ``uncertain``: at or above the bundle's threshold.
    ood_score: float | None = None
    uncertainty: float | None = None
    uncertain: bool | None = None
    error: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """What was done to the input on its way to the model ("<code>: <sentence>"): a negative
        PNG/JPEG inverted, a DICOM read without its Part 10 header."""
        return list(self.metadata.get("notes") or [])


def risk_and_flag(probs: dict[str, float], meta: BundleMeta) -> tuple[float, bool]:
    """Risk = 1 - P(Normal). Flagged when any class reaches its stored operating-point
    threshold; a bundle without thresholds flags any non-Normal prediction."""
    risk = 1.0 - probs["Normal"] if "Normal" in probs else max(probs.values())
    if meta.thresholds:
        flagged = any(probs.get(c, 0.0) >= t for c, t in meta.thresholds.items())
    else:
        flagged = max(probs, key=probs.__getitem__) != "Normal"
    return float(risk), bool(flagged)


@dataclass(frozen=True)
class ScreenOptions:
    """Everything about reading a file that is configurable (built from the settings by callers)."""

    max_pixels: int = 80_000_000
    gate: GateRules = field(default_factory=GateRules)
    voi: VoiOptions = field(default_factory=VoiOptions)
    heatmaps: str = "all"  # "all" | "flagged" | "none": which scored studies get a Grad-CAM
    engine: str = "torch"  # "torch" | "onnx" (onnxruntime on the CPU; Grad-CAM stays in torch)
    cache_dir: Path | None = None  # where the ONNX export is cached (by bundle sha256)
    threads: int = 1
    max_batch: int = 1  # > 1: concurrent screen() calls share forward passes (see batching.py)
    max_wait_ms: float = 50.0
    batch_eager: bool = True  # run a batch once nobody else is decoding (else wait max_wait_ms to fill it)
    decode_budget_bytes: int | None = None  # decoded bytes this process holds at once (see budget.py); None: unbounded

    #: Further checks of the decoded picture (gate.ContentCheck), run after the blank and polarity
    #: checks: the place where a learned out-of-distribution score plugs in.
    content_checks: tuple[ContentCheck, ...] = ()

    def for_input_size(self, input_size: int) -> "ScreenOptions":
        """These options with the gate's minimum size derived from a model's input size, unless
        it was set (CXR_GATE_MIN_SIZE)."""
        if self.gate.min_size is not None:
            return self
        return dataclasses.replace(self, gate=dataclasses.replace(self.gate, min_size=min_size_for(input_size)))


def ood_rejection(score: float | None, meta: BundleMeta) -> Rejection | None:
    """``not_chest`` when the film's out-of-distribution score is above the bundle's threshold."""
    threshold = meta.ood_threshold
    if score is None or threshold is None or score <= threshold:
        return None
    return Rejection(Code.not_chest, (
        f"the image does not look like the frontal chest radiographs the model was trained on "
        f"(out-of-distribution score {score:.0f} > {threshold:.0f}); send a frontal (PA/AP) chest film, "
        "or check the export (body part, polarity, cropping)"))


class Rejected(ImageDecodeError):
    """The gate said no: the file was read but is not to be screened. Carries what was learnt."""

    def __init__(self, rejection: Rejection, metadata: dict) -> None:
        super().__init__(rejection.code.value, rejection.message)
        self.metadata = metadata


def gated_pixels(data: bytes, options: ScreenOptions = ScreenOptions()) -> tuple[np.ndarray, dict]:
    """bytes -> (decoded (H, W) pixels in [0, 1], metadata), through the quality gate.

    The header rules run before any pixel is decoded; then the size, the blank check, for
    PNG and JPEG only the polarity (a negative is inverted and a note says so in
    ``metadata["notes"]`` with CXR_GATE_POLARITY=invert, or refused with ``reject``; a
    DICOM's Photometric Interpretation is authoritative, never inverted here), and last
    ``options.content_checks`` on the picture as the model will see it. Raises
    ImageDecodeError: the file cannot be read, or (as its subclass Rejected) it is read but
    not to be screened."""
    opened = open_image(data, max_pixels=options.max_pixels)
    if (rejection := check_header(opened.metadata, options.gate)) is not None:
        raise Rejected(rejection, opened.metadata)
    pixels = decode_pixels(opened, voi=options.voi)
    metadata = {**opened.metadata, "height": int(pixels.shape[0]), "width": int(pixels.shape[1])}
    if (rejection := check_image(pixels.shape, options.gate)) is not None:
        raise Rejected(rejection, metadata)
    thumb = thumbnail(pixels)  # shared by the blank and polarity checks
    if (rejection := check_content(pixels, options.gate, thumb=thumb)) is not None:  # blank_image
        raise Rejected(rejection, metadata)
    if opened.format in ("png", "jpeg") and options.gate.polarity != "off":
        score, best = polarity_scores(pixels, thumb)  # a film sent sideways is not a negative
        if score < -POLARITY_THRESHOLD and best < -POLARITY_THRESHOLD:
            if options.gate.polarity == "reject":
                raise Rejected(inverted_polarity(score), metadata)
            pixels = np.subtract(np.float32(1.0), pixels, dtype=np.float32)
            metadata["notes"] = [*metadata.get("notes", []), (
                f"polarity_inverted: the {opened.format.upper()} looked like a negative (polarity score "
                f"{score:.1f}) and was inverted before screening; export it with its photometric "
                "interpretation applied")]
    for check in options.content_checks:  # they see the picture as the model will
        if (rejection := check(pixels)) is not None:
            raise Rejected(rejection, metadata)
    return pixels, metadata


def model_input(data: bytes, meta: BundleMeta, *, max_pixels: int = 80_000_000, voi: VoiOptions = VoiOptions()
                ) -> tuple[np.ndarray, np.ndarray, dict]:
    """bytes -> (decoded pixels, model input (C, H, W), metadata), with no quality gate (the
    trainer and ``cxr evaluate`` go through :func:`gated_pixels` instead, as the service does).
    Raises ImageDecodeError."""
    decoded = decode(data, max_pixels=max_pixels, voi=voi)
    return decoded.pixels, to_model(decoded.pixels, meta), decoded.metadata


def to_model(pixels: np.ndarray, meta: BundleMeta) -> np.ndarray:
    return preprocess(pixels, input_size=meta.input_size, in_chans=meta.in_chans, mean=meta.mean, std=meta.std)


class _Once:
    """A computation run once, by the first thread that calls; the others wait for it and get
    the same result (or the same exception)."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self._compute = compute
        self._lock = threading.Lock()
        self._outcome: tuple[bool, Any] | None = None

    def __call__(self) -> Any:
        with self._lock:
            if self._outcome is None:
                try:
                    self._outcome = (True, self._compute())
                except Exception as e:
                    self._outcome = (False, e)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


class Screener:
    """A loaded model plus the steps around it."""

    def __init__(self, loaded: LoadedModel, options: ScreenOptions = ScreenOptions()) -> None:
        self.loaded = loaded
        self.meta = loaded.meta
        self.options = options = options.for_input_size(loaded.meta.input_size)
        self.onnx = None
        # Grad-CAM runs one batch at a time: concurrent backward passes through the shared model
        # from several worker threads crashed the process here (SIGSEGV). It is cheap (head only),
        # and runs in a screening thread while the batcher goes on with the next forward pass.
        self._cam_lock = threading.Lock()
        if options.engine == "onnx":
            from worker.screening.onnx_engine import OnnxEngine

            if loaded.device.type != "cpu":
                raise ValueError("CXR_ENGINE=onnx runs on the CPU; use CXR_ENGINE=torch with CXR_DEVICE=cuda")
            self.onnx = OnnxEngine(loaded.model, sha256=loaded.sha256, in_chans=self.meta.in_chans,
                                   input_size=self.meta.input_size, threads=options.threads,
                                   cache_dir=options.cache_dir or loaded.path.parent)
        elif options.engine != "torch":
            raise ValueError(f"unknown engine {options.engine!r}: use torch or onnx")
        self.run_forward = lambda x, want_cam: (self._step(x, [want_cam])[0], 1)
        # One budget per screener, so per process: the worker's threads and `cxr predict`'s share it.
        self.budget = DecodeBudget(options.decode_budget_bytes) if options.decode_budget_bytes else None
        self._decoding = 0  # screen() calls that have not reached the model yet
        self._decoding_lock = threading.Lock()
        if options.max_batch > 1:
            from worker.screening.batching import MicroBatcher

            self.run_forward = MicroBatcher(self._step, max_batch=options.max_batch,
                                            max_wait_ms=options.max_wait_ms,
                                            coming=(lambda: self._decoding) if options.batch_eager else (lambda: 1))

    def forward(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C, H, W) -> (logits, conv_head features or None), without gradients.

        On CUDA the input goes channels_last and the pass runs under AMP (bf16 where the GPU
        has it, else fp16); logits come back as float32. ``no_grad`` rather than
        ``inference_mode``: the features feed the head-only Grad-CAM, which needs autograd."""
        if self.onnx is not None:
            return self.onnx(x)
        model = self.loaded.model
        device = self.loaded.device
        tensor = torch.from_numpy(x)
        if device.type == "cuda":
            tensor = tensor.pin_memory().to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            amp = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        else:
            amp = contextlib.nullcontext()
        with torch.no_grad(), amp:
            if model.splits_at_last_conv:
                features = model.last_conv(tensor)  # kept for a Grad-CAM without a second pass
                return model.from_last_conv(features).float(), features.float()
            # A full-model Grad-CAM (computed in another thread) hooks the model's last
            # convolution: a forward pass must not run through those hooks meanwhile.
            with self._cam_lock:
                return model(tensor).float(), None

    def _step(self, x: np.ndarray, want_cam: list[bool]) -> list[tuple[np.ndarray, Callable | None]]:
        """The model's part for a batch: the forward pass and probabilities now; the Grad-CAMs
        the heatmap policy asks for later, in one backward pass through the head for the whole
        batch, run by the first caller that asks for its map (after storing its scores, say),
        in its own thread: the batcher goes on with the next batch meanwhile.

        Returns per row (probabilities, its Reliability (OOD score, uncertainty), None or a call
        that gives (its Grad-CAM map (H, W), Grad-CAM ms per map of the batch))."""
        logits, features = self.forward(x)
        probs = calibrated(logits, temperature=self.meta.temperature, bias=self.meta.bias)
        rows = list(probs)
        if features is not None:
            rel = assess(self.loaded.model, features, probs, ood=self.loaded.ood, temperature=self.meta.temperature,
                         bias=self.meta.bias, method=self.meta.uncertainty.get("method"))
        else:  # a backbone without conv_head: no pooled features from this pass
            rel = [Reliability(None, None)] * len(rows)
        need = [i for i, (p, want) in enumerate(zip(rows, want_cam)) if want and self._wants_cam(p)]
        if not need:
            return [(p, r, None) for p, r in zip(rows, rel)]

        def compute() -> tuple[dict[int, np.ndarray], float]:
            t = time.perf_counter()
            targets = [int(np.argmax(rows[i])) for i in need]
            model = self.loaded.model
            with self._cam_lock:
                if features is not None:
                    maps = gradcam_from_features(model, features[need], target_classes=targets, size=x.shape[2:])
                else:
                    maps = [gradcam(model, x[i], target_class=c) for i, c in zip(need, targets)]
            return dict(zip(need, maps)), (time.perf_counter() - t) * 1e3 / len(need)

        cams = _Once(compute)

        def cam_of(i: int) -> tuple[np.ndarray, float]:
            maps, per_map_ms = cams()
            return maps[i], per_map_ms

        return [(p, rel[i], partial(cam_of, i) if i in need else None) for i, p in enumerate(rows)]

    def _wants_cam(self, probs: np.ndarray) -> bool:
        if self.options.heatmaps == "all":
            return True
        if self.options.heatmaps == "flagged":
            return risk_and_flag(dict(zip(self.meta.classes, map(float, probs))), self.meta)[1]
        return False

    def screen(self, data: bytes, *, heatmap_to: Path | None = None,
               on_scored: Callable[[Outcome], None] | None = None) -> Outcome:
        """Score one file. Input problems come back as an Outcome, never as an exception.

        The Grad-CAM map (when the heatmap policy wants one and ``heatmap_to`` is given) comes
        from the batch's forward pass (its feature maps) and is computed for the whole batch in
        one backward pass through the head, in this thread, after ``on_scored``: drawing and
        writing it stay off the model's path. ``on_scored`` is called with the scores before
        the map is computed, so a caller can publish them early.

        With a decode budget, the file's decoded bytes (from its header) are held for the whole
        call, which waits until they fit; a file that alone exceeds the budget is rejected
        ``too_large`` without being decoded."""
        nbytes = decoded_bytes(data) if self.budget is not None else None
        try:
            with self.budget.hold(nbytes) if nbytes is not None else contextlib.nullcontext():
                return self._screen(data, heatmap_to=heatmap_to, on_scored=on_scored)
        except TooLargeForBudget as e:
            return Outcome(status=status_for(e.code), reject_code=e.code, error=f"{e.code}: {e.message}")

    def _screen(self, data: bytes, *, heatmap_to: Path | None, on_scored: Callable[[Outcome], None] | None) -> Outcome:
        t0 = time.perf_counter()
        with self._decoding_lock:
            self._decoding += 1
        try:
            pixels, metadata = gated_pixels(data, self.options)
            x = to_model(pixels, self.meta)
        except ImageDecodeError as e:
            return Outcome(status=status_for(e.code), reject_code=e.code, error=str(e),
                           metadata=getattr(e, "metadata", {}))
        finally:
            with self._decoding_lock:
                self._decoding -= 1
        t1 = time.perf_counter()
        want_cam = heatmap_to is not None and self.options.heatmaps != "none"
        (probs_arr, rel, cam_of), batch_size = self.run_forward(x[None], want_cam)
        t2 = time.perf_counter()
        far = ood_rejection(rel.ood_score, self.meta)
        if far is not None and not header_says_chest(metadata, self.options.gate):
            return Outcome(status=status_for(far.code), reject_code=far.code.value, error=str(far),
                           ood_score=rel.ood_score, metadata={**metadata, "ood_score": round(rel.ood_score, 3)})
        if far is not None:  # the DICOM header says chest: an unfamiliar rendering, screened and referred
            metadata = {**metadata, "notes": [*metadata.get("notes", []), (
                f"ood_exceeded: out-of-distribution score {rel.ood_score:.0f} is above the bundle's "
                f"{self.meta.ood_threshold:.0f}, but the DICOM header names the chest, so it was screened and "
                "marked uncertain; check how the film renders (window, photometric interpretation)")]}
        probs = {c: float(p) for c, p in zip(self.meta.classes, probs_arr)}
        predicted = max(probs, key=probs.__getitem__)
        risk, flagged = risk_and_flag(probs, self.meta)
        threshold = self.meta.uncertainty_threshold
        uncertain = None if rel.uncertainty is None or threshold is None else bool(rel.uncertainty >= threshold)
        if far is not None:
            uncertain = True
        known = {"ood_score": rel.ood_score, "uncertainty": rel.uncertainty, "uncertain": uncertain}
        heatmap_path = None
        timings = {"decode_preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "batch_size": batch_size}
        if on_scored is not None:
            on_scored(Outcome(status="done", probabilities=probs, predicted_class=predicted, risk=risk,
                              flagged=flagged, timings_ms={k: round(v, 2) for k, v in timings.items()},
                              metadata=metadata, **known))
        if cam_of is not None:
            cam, cam_ms = cam_of()  # this study's map, and its share of the batch's Grad-CAM time
            t3 = time.perf_counter()
            heatmap_path = str(save_heatmap(pixels, cam, heatmap_to))
            timings["gradcam"] = cam_ms + (time.perf_counter() - t3) * 1e3
        return Outcome(
            status="done",
            probabilities=probs,
            predicted_class=predicted,
            risk=risk,
            flagged=flagged,
            heatmap_path=heatmap_path,
            timings_ms={k: round(v, 2) for k, v in timings.items()},
            metadata=metadata,
            **known,
        )
