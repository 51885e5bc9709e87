"""Training settings: one pydantic model, every default in one place, validated once on construction.

The ``-c`` YAML's keys and the ``geomask train`` flags are the field names. Unknown keys are errors
(``extra="forbid"``), so a misspelt setting never trains silently with its default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geomask.config import NormalizeConfig
from geomask.detect.architectures import ARCHS
from geomask.detect.checkpoint import check_inference
from geomask.errors import ConfigError, WeightsError

#: Training normalises as ``predict`` does by default, so a model sees the same pixel values in both.
NORMALIZE = NormalizeConfig()


class TrainSettings(BaseModel):
    """Every training knob, with its default in one place.

    Attributes:
        arch: Architecture (see :data:`geomask.detect.maskrcnn.ARCHS`).
        classes: Class names (used when labels carry no class field).
        class_field: Label attribute holding the class name, or ``None`` (one class).
        boxes_as_ellipses: Labels are boxes: train on the inscribed ellipse (see :mod:`geomask.labels`).
        chip_size_px: Chip side in pixels; becomes the model's tile size.
        gsd_m: Resample chips to this ground sample distance (metres); ``None``: native resolution.
        bands: 1-based bands in model order; ``None``: the first three.
        batch_size: Chips per iteration.
        iterations: Total optimiser steps.
        lr: Peak AdamW learning rate (linear warm-up, then cosine decay to 5 %).
        weight_decay: AdamW weight decay.
        warmup_iters: Warm-up length in iterations.
        positive_fraction: Share of chips centred near a label; the rest are anywhere (background).
        scale_jitter: Range of window-size factors (object size jitter).
        color_jitter: Strength of per-band gain, brightness and contrast jitter.
        min_area_px: Smallest training mask (chip pixels); smaller fragments are dropped.
        val_every: Iterations per epoch (validation, metrics, best checkpoint).
        checkpoint_every_s: Seconds between ``.last.pt`` checkpoints.
        max_minutes: Stop (cleanly, with checkpoints) after this long, even before ``iterations``.
        device: ``auto``, ``cpu``, ``cuda``...
        amp: Mixed precision. ``auto``: float16 + grad scaling on CUDA; bfloat16 autocast on a CPU with
            native bfloat16 (AVX-512 BF16 or AMX), else float32, because on other CPUs bf16 autocast is
            emulated and was measured 15x slower than float32 (BENCHMARKS.md). ``true`` forces autocast
            (bf16 on any CPU), ``false`` is float32 everywhere.
        threads: torch CPU threads (``None``: torch's default).
        seed: Random seed for chip sampling, augmentation and initialisation.
        init: Start from a geomask checkpoint path, ``coco``/``coco_v2`` (torchvision COCO, heads
            replaced for our classes), or ``None`` (from scratch).
        attribution: Credit for the training data, stored in the checkpoint.
        rois_per_image: RoIs sampled per chip for the box and mask heads (``None``: the architecture's).
            On CPU the mask head's cost grows with it and dominates an iteration; halving it nearly
            halves the time per iteration at little cost in accuracy.
        val_score_threshold: Score threshold for validation F1.
        log_every: Iterations between loss log lines.
        ema_decay: Keep an exponential moving average of the weights with this decay (e.g. 0.998, a
            horizon of ~500 iterations); validation and the written model use the average, which is
            steadier than the last step's weights when batches are small and noisy. ``None``: off.
        keep: Which weights ``output`` holds: ``best`` (best validation F1) or ``last`` (the weights
            at each validation, finally the last). Use ``last`` when the validation rasters are also
            your test set, so that choosing a checkpoint does not peek at the test.
        copy_paste: Probability per chip of Simple Copy-Paste (Ghiasi et al. 2021): a random subset of the
            labelled objects of another positive chip (any training raster, its own scale jitter, flip and
            rotation) is pasted on, occluding what it covers. Few labels then appear in many contexts.
        hue_jitter: Largest hue rotation as a fraction of the colour wheel (0.05: ±18°); 3-band chips only.
        saturation_jitter: Saturation factor drawn from ``[1 - s, 1 + s]``; 3-band chips only.
        blur: Probability per chip of a Gaussian blur (sigma 0.5–1.5 px): soft or resampled imagery.
        noise: Largest standard deviation of added Gaussian noise, in normalised pixel units (0..1).
        jpeg: Probability per chip of a JPEG round trip at quality 30–90: the blocky artefacts of
            compressed orthophotos and web tiles.
        hard_negatives: Probability per chip of a chip centred near a mined false positive: a place where
            the model being trained reported an object no label has (:mod:`geomask.detect.training.hard_negatives`).
        hard_negative_every: Iterations between mining passes (from the end of the warm-up).
        hard_negative_windows: Background windows read per mining pass.
        inference: Inference defaults written into every checkpoint of the run (keys of
            :data:`geomask.detect.checkpoint.INFERENCE_KEYS`), so ``--weights`` alone gives the card's
            settings; a config still overrides each.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "resnet18_fpn"
    classes: tuple[str, ...] = Field(("building",), min_length=1)
    class_field: str | None = None
    boxes_as_ellipses: bool = False
    chip_size_px: int = Field(256, ge=32, multiple_of=32)
    gsd_m: float | None = Field(0.3, gt=0.0)
    bands: tuple[int, ...] | None = None
    batch_size: int = Field(8, ge=1)
    iterations: int = Field(2000, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    positive_fraction: float = Field(0.8, ge=0.0, le=1.0)
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    color_jitter: float = 0.15
    min_area_px: int = 6
    val_every: int = Field(200, ge=1)
    checkpoint_every_s: float = 300.0
    max_minutes: float | None = None
    device: str = "auto"
    amp: bool | Literal["auto"] = "auto"
    threads: int | None = None
    seed: int = 0
    init: str | None = None
    rois_per_image: int | None = Field(None, ge=8)
    attribution: str = ""
    val_score_threshold: float = 0.5
    log_every: int = Field(10, ge=1)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="e.g. 0.998")
    keep: Literal["best", "last"] = "best"
    copy_paste: float = Field(0.0, ge=0.0, le=1.0, description="a probability per chip")
    hue_jitter: float = Field(0.0, ge=0.0, le=0.5, description="a fraction of the colour wheel")
    saturation_jitter: float = Field(0.0, ge=0.0, le=1.0)
    blur: float = Field(0.0, ge=0.0, le=1.0, description="a probability per chip")
    noise: float = Field(0.0, ge=0.0, le=0.5, description="a standard deviation in normalised pixel units")
    jpeg: float = Field(0.0, ge=0.0, le=1.0, description="a probability per chip")
    hard_negatives: float = Field(0.0, ge=0.0, le=1.0, description="a probability per chip")
    hard_negative_every: int = Field(50, ge=1)
    hard_negative_windows: int = Field(16, ge=1)
    inference: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        # A bad setting is a user's mistake: one ConfigError line naming it, as for the run config.
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ConfigError(_describe(err)) from None

    def replace(self, **changes: Any) -> TrainSettings:
        """Return a copy with ``changes`` applied and validated (``model_copy`` would skip validation)."""
        return TrainSettings(**{**self.model_dump(), **changes})

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; use one of {list(ARCHS)}")
        return arch

    @field_validator("scale_jitter")
    @classmethod
    def _ordered_jitter(cls, jitter: tuple[float, float]) -> tuple[float, float]:
        lo, hi = jitter
        if not 0.0 < lo <= hi:
            raise ValueError(f"must satisfy 0 < low <= high, got {jitter}")
        return jitter

    @model_validator(mode="after")
    def _known_inference_keys(self) -> TrainSettings:
        try:
            check_inference(self.inference)
        except WeightsError as err:
            raise ValueError(str(err)) from None
        return self


def _describe(err: ValidationError) -> str:
    problems = err.errors()
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        return f"unknown training setting(s) {unknown}; valid: {sorted(TrainSettings.model_fields)}"
    first = problems[0]
    where = ".".join(str(p) for p in first["loc"]) or "training settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    given = f" (got {first['input']!r})" if first["loc"] and first["type"] != "value_error" else ""
    return f"{where}: {message}{given}"
