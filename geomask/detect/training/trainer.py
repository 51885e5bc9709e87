"""The training loop: a :class:`Trainer` owning the model, optimiser, weight average and best score.

Validation is by file (whole rasters, normally a whole area held out), never by random chips: chips
of one area are strongly correlated, and a random split would measure memory, not generalisation.
Every ``val_every`` iterations (one "epoch") the model is scored on a fixed grid of validation
chips (F1 at mask IoU 0.5, one-to-one); the best model (or, with ``keep="last"``, the latest) is
written to ``output`` (the moving average of the weights when ``ema_decay`` is set); the full training
state goes to ``output.last.pt`` every ``checkpoint_every_s`` seconds so a run can be stopped any
time and resumed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geomask.detect.architectures import build_model, count_parameters
from geomask.detect.base import ModelHints
from geomask.detect.checkpoint import CheckpointMeta, check_inference, load_checkpoint, save_checkpoint
from geomask.detect.maskrcnn import MaskRCNNDetector, resolve_device
from geomask.detect.training.augment import Chip
from geomask.detect.training.chips import ChipReader, ChipSampler, Spot, TrainRaster, chip_target, open_rasters, validation_chips
from geomask.detect.training.hard_negatives import false_positives
from geomask.detect.training.settings import NORMALIZE, TrainSettings
from geomask.detect.training.validation import evaluate_chips
from geomask.detect.training.weights import Ema, init_weights
from geomask.errors import ConfigError, LabelError, WeightsError
from geomask.labels import expand_paths

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run did (also written into the checkpoint's ``training`` metadata)."""

    output: Path
    iterations: int
    seconds: float
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainData:
    """The rasters a run trains and validates on, opened once, and the class names of their labels."""

    train: list[TrainRaster]
    val: list[TrainRaster]
    train_paths: list[str]
    val_paths: list[str]
    classes: tuple[str, ...]


def load_data(
    images: Sequence[str],
    labels: Sequence[str],
    val_images: Sequence[str] | None,
    val_labels: Sequence[str] | None,
    settings: TrainSettings,
) -> TrainData:
    """Expand the paths, split off the validation rasters and open both sets with their labels.

    Raises:
        ConfigError: No raster is left for training. LabelError: no label overlaps the training rasters.
    """
    all_images = expand_paths(images)
    if val_images is None:
        val_list = _default_holdout(all_images)
    else:  # an empty list: no validation, every raster trains (a shipped model's final run)
        val_list = expand_paths(val_images) if val_images else []
        if not val_list and settings.keep == "best":
            raise ConfigError("without validation rasters there is no best checkpoint; add --keep last")
    train_list = [p for p in all_images if p not in val_list]
    if not train_list:
        raise ConfigError("every image is a validation image; give --val-images that leave some images for training")
    label_list = expand_paths(labels)
    log.info("training on %d rasters, validating on %d: %s", len(train_list), len(val_list), [Path(p).name for p in val_list])
    train_rasters = open_rasters(train_list, label_list, settings)
    if sum(len(r.labels) for r in train_rasters) == 0:
        raise LabelError(f"no label overlaps the training rasters; check that {label_list[:3]} cover {train_list[:3]}")
    val_rasters = open_rasters(val_list, expand_paths(val_labels) if val_labels else label_list, settings) if val_list else []
    return TrainData(train_rasters, val_rasters, train_list, val_list, tuple(train_rasters[0].labels.classes))


def _default_holdout(images: Sequence[str]) -> list[str]:
    """Hold out the last folder's rasters when images span several folders (areas), else the last raster."""
    if len(images) < 2:
        return []
    folders = sorted({str(Path(p).parent) for p in images})
    if len(folders) > 1:
        return [p for p in images if str(Path(p).parent) == folders[-1]]
    return [images[-1]]


def lr_factor(it: int, s: TrainSettings) -> float:
    """Return the learning-rate multiplier at iteration ``it``: linear warm-up, then cosine decay to 5 %."""
    if it < s.warmup_iters:
        return 0.1 + 0.9 * it / s.warmup_iters
    t = min(1.0, (it - s.warmup_iters) / max(1, s.iterations - s.warmup_iters))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))


def native_bf16_cpu() -> bool:
    """Return whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tiles), as torch reports it.

    Other x86 CPUs emulate bf16 matrix products, and autocast there was measured 15x slower than
    float32 (AMD EPYC with AVX2 only, 2026-12-03, BENCHMARKS.md). torch's probes are private
    (``torch.cpu._is_*_supported``); where a torch lacks them the answer is ``False``: float32 is
    never the slow choice.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype training uses for the ``amp`` setting on ``device``, or ``None`` (float32).

    ``auto``: float16 on CUDA, bfloat16 on a CPU with native bf16 (:func:`native_bf16_cpu`), else float32.
    ``True``: float16 on CUDA, bfloat16 on any other device. ``False``: float32.
    """
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.float16
    if amp == "auto" and not native_bf16_cpu():
        log.info("amp: auto: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), training in float32; amp: true forces bf16")
        return None
    return torch.bfloat16


class Trainer:
    """One training run's state, advanced by :meth:`run`; checkpoints go to ``output`` and ``output.last.pt``.

    The model is built on construction (after the caller seeded torch), then :meth:`start` loads the
    resumed state or the initial weights; everything the loop changes lives on the instance.
    """

    def __init__(self, settings: TrainSettings, data: TrainData, output: Path, command: str = ""):
        self.settings, self.data, self.output, self.command = settings, data, output, command
        self.last_path = output.with_name(output.name + ".last.pt")
        self.log_path = output.with_name(output.name + ".log.jsonl")
        self.device = resolve_device(settings.device)
        self.model = build_model(settings.arch, len(data.classes), settings.chip_size_px)
        if settings.rois_per_image is not None:
            self.model.roi_heads.fg_bg_sampler.batch_size_per_image = settings.rois_per_image
        self.model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.autocast_dtype = autocast_dtype(settings.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.reader = ChipReader(data.train, settings.chip_size_px, settings.min_area_px)
        self.sampler = ChipSampler(self.reader, settings, np.random.default_rng(settings.seed))  # and the mined spots
        self.ema: Ema | None = None
        self.iteration, self.best_f1, self.elapsed0 = 0, -1.0, 0.0
        self.best_metrics: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.hardware = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
            if self.device.type == "cpu"
            else torch.cuda.get_device_name(self.device)
        )

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and written: the moving average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    def start(self, resume: bool) -> None:
        """Load the state of ``output.last.pt`` (``resume``) or the ``init`` weights, then set up the average."""
        s = self.settings
        state: dict[str, Any] = {}
        if resume:
            state = self._resume()
        elif s.init:
            init_weights(self.model, s.init, len(self.data.classes), s.arch)
        self.ema = Ema(self.model, s.ema_decay) if s.ema_decay is not None else None
        if "ema" in state and self.ema is None:
            raise ConfigError(f"{self.last_path} was trained with a weight average; pass --ema (ema_decay) again to resume it")
        if self.ema is not None and "ema" in state:
            self.ema.load(state["ema"], int(state.get("ema_steps", 0)))
        log.info(
            "model %s: %.1f M parameters on %s (%d threads)",
            s.arch,
            count_parameters(self.model) / 1e6,
            self.device,
            torch.get_num_threads(),
        )

    def _resume(self) -> dict[str, Any]:
        ckpt = load_checkpoint(self.last_path)
        if ckpt.meta is None or ckpt.train_state is None:
            raise WeightsError(f"{self.last_path} holds no training state; start without --resume")
        if ckpt.meta.arch != self.settings.arch:
            raise WeightsError(
                f"{self.last_path} was trained as {ckpt.meta.arch!r}, not {self.settings.arch!r}; pass --arch {ckpt.meta.arch}"
            )
        self.model.load_state_dict(ckpt.state_dict)
        state = ckpt.train_state
        self.opt.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.best_f1 = float(state.get("best_f1", -1.0))
        self.elapsed0 = float(state.get("elapsed_s", 0.0))
        self.best_metrics = {k: float(v) for k, v in dict(state.get("best_metrics", {})).items()}
        self.sampler.rng = np.random.default_rng(self.settings.seed + self.iteration)
        self.sampler.add_hard_negatives([Spot(int(k), float(r), float(c)) for k, r, c in state.get("hard_negatives", [])])
        log.info("resumed from %s at iteration %d (best val F1 %.3f)", self.last_path, self.iteration, self.best_f1)
        return state

    def meta(self, metrics: dict[str, float], it: int, seconds: float) -> CheckpointMeta:
        """Describe the model of iteration ``it`` for its checkpoint."""
        s = self.settings
        return CheckpointMeta(
            arch=s.arch,
            classes=self.data.classes,
            tile_size_px=s.chip_size_px,
            gsd_m=s.gsd_m,
            bands=tuple(self.data.train[0].bands),
            normalize_mode=NORMALIZE.mode,
            percentiles=NORMALIZE.percentiles,
            attribution=s.attribution,
            metrics=metrics,
            inference=check_inference(s.inference),
            training={
                "iterations": it,
                "seconds": round(seconds, 1),
                "device": str(self.device),
                "hardware": self.hardware,
                "threads": torch.get_num_threads(),
                "precision": str(self.autocast_dtype or torch.float32).removeprefix("torch."),
                "images": [Path(p).name for p in self.data.train_paths],
                "val_images": [Path(p).name for p in self.data.val_paths],
                "settings": json.dumps(s.model_dump(mode="json")),
                "command": self.command,
                "torch": str(torch.__version__),
            },
        )

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def validate(self, val_chips: Sequence[Chip], it: int, seconds: float) -> dict[str, float]:
        """Score the validated weights, keep the best score, and write ``output`` as ``keep`` says."""
        s = self.settings
        if not val_chips:
            metrics = {"iteration": float(it)}
            save_checkpoint(self.output, self.meta(metrics, it, seconds), self.eval_model.state_dict())
            return metrics
        amp = self.autocast_dtype is not None
        det = MaskRCNNDetector(
            self.eval_model, list(self.data.classes), ModelHints(), "training", self.device, s.val_score_threshold, 0.5, amp
        )
        metrics = evaluate_chips(det, val_chips, s.batch_size)
        metrics["iteration"] = float(it)
        self.model.train()
        if metrics["val_f1"] > self.best_f1:
            self.best_f1, self.best_metrics = metrics["val_f1"], dict(metrics)
            if s.keep == "best":
                save_checkpoint(self.output, self.meta(metrics, it, seconds), self.eval_model.state_dict())
                log.info("new best val F1 %.3f at iteration %d -> %s", self.best_f1, it, self.output)
        if s.keep == "last":
            save_checkpoint(self.output, self.meta(metrics, it, seconds), self.eval_model.state_dict())
        return metrics

    def save_last(self, it: int, seconds: float) -> None:
        """Write the resumable state (weights, optimiser, average, best score) to ``output.last.pt``."""
        state: dict[str, Any] = {
            "optimizer": self.opt.state_dict(),
            "iteration": it,
            "best_f1": self.best_f1,
            "elapsed_s": seconds,
            "best_metrics": self.best_metrics,
            "hard_negatives": [[p.raster, p.row, p.col] for p in self.sampler.hard],
        }
        if self.ema is not None:
            state.update(ema=self.ema.model.state_dict(), ema_steps=self.ema.steps)
        # The metadata describes *this* model: its latest validation, not the best one's (none when the
        # validated weights were the average, not these).
        latest = self.history[-1] if self.ema is None and self.history and self.history[-1].get("iteration") == it else {}
        save_checkpoint(self.last_path, self.meta(latest, it, seconds), self.model.state_dict(), train_state=state)

    def step(self, chips: Sequence[Chip], lr: float) -> tuple[float, dict[str, torch.Tensor]]:
        """Take one optimiser step on ``chips`` at learning rate ``lr``; return the loss and its parts."""
        imgs = [torch.from_numpy(c.pixels).to(self.device) for c in chips]
        targets = [{k: v.to(self.device) for k, v in chip_target(c).items()} for c in chips]
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self._autocast():
            losses = self.model(imgs, targets)
        loss = torch.stack([v.float() for v in losses.values()]).sum()
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.opt.step()
        self.iteration += 1
        if self.ema is not None:
            self.ema.update(self.model)
        return float(loss.detach()), losses

    def run(self, t_start: float) -> TrainResult:
        """Train until ``iterations`` (or ``max_minutes`` after ``t_start``), validating every ``val_every``."""
        s, data = self.settings, self.data
        sampler = self.sampler
        val_chips = validation_chips(ChipReader(data.val, s.chip_size_px, s.min_area_px)) if data.val else []
        log.info("%d validation chips", len(val_chips))
        self.model.train()
        start_it = self.iteration
        last_save = time.perf_counter()
        window: list[float] = []
        deadline = None if s.max_minutes is None else t_start + s.max_minutes * 60
        while self.iteration < s.iterations:
            chips = [sampler.sample() for _ in range(s.batch_size)]
            factor = lr_factor(self.iteration, s)
            value, losses = self.step(chips, s.lr * factor)
            it = self.iteration
            if not math.isfinite(value):
                raise ConfigError(f"training loss became {value} at iteration {it}; lower --lr or disable amp")
            window.append(value)
            if s.hard_negatives > 0 and it >= s.warmup_iters and it % s.hard_negative_every == 0:
                self.mine()
            now = time.perf_counter()
            seconds = self.elapsed0 + now - t_start
            if it % s.log_every == 0 or it == s.iterations:
                record = {"iteration": it, "seconds": round(seconds, 1), "lr": s.lr * factor, "loss": float(np.mean(window))}
                record.update({k: round(float(v.detach()), 4) for k, v in losses.items()})
                self._write_log(record)
                log.info("it %d  loss %.3f  (%.3f it/s)", it, record["loss"], (it - start_it) / max(1e-9, now - t_start))
                window = []
            stop = deadline is not None and now >= deadline
            if it % s.val_every == 0 or it == s.iterations or stop:
                metrics = self.validate(val_chips, it, seconds)
                self.history.append(metrics)
                self._write_log({"epoch": it // s.val_every, **metrics})
                log.info("epoch %d: %s", it // s.val_every, {k: round(v, 3) for k, v in metrics.items()})
                self.save_last(it, seconds)
                last_save = now
            elif now - last_save >= s.checkpoint_every_s:
                self.save_last(it, seconds)
                last_save = now
            if stop:
                log.info("stopping at iteration %d: max_minutes %.1f reached", it, s.max_minutes or 0.0)
                break
        seconds = self.elapsed0 + time.perf_counter() - t_start
        return TrainResult(self.output, self.iteration, seconds, self.best_metrics, self.history)

    def mine(self) -> None:
        """Find where the model reports objects no label has, and let the sampler centre chips there."""
        s, sampler = self.settings, self.sampler
        windows = [sampler.background_window() for _ in range(s.hard_negative_windows)]
        spots = false_positives(self.model, self.reader, windows, s.val_score_threshold, self.device, self._autocast)
        sampler.add_hard_negatives(spots)
        self._write_log({"iteration": self.iteration, "hard_negatives_found": len(spots), "hard_negative_pool": len(sampler.hard)})
        log.info("mined %d false positives in %d windows (pool %d)", len(spots), len(windows), len(sampler.hard))

    def _write_log(self, record: dict[str, Any]) -> None:
        # One JSON line per record beside the output, for plots; appended, so a resumed run continues it.
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def train(
    images: Sequence[str],
    labels: Sequence[str],
    output: str | Path,
    settings: TrainSettings,
    val_images: Sequence[str] | None = None,
    val_labels: Sequence[str] | None = None,
    resume: bool = False,
    command: str = "",
) -> TrainResult:
    """Train a Mask R-CNN and write the best (or, with ``settings.keep == "last"``, the latest) checkpoint to ``output``.

    Args:
        images: Raster paths or globs.
        labels: Vector label paths or globs (any OGR format and CRS).
        output: Best-model checkpoint path; ``output.last.pt`` holds the resumable state and
            ``output.log.jsonl`` the losses and metrics.
        settings: Training settings (validated when they were built).
        val_images: Validation rasters (paths or globs); excluded from training. ``None``: hold out the
            rasters of the last folder when images come from several folders, else the last raster.
            ``[]``: no validation; every raster trains (needs ``settings.keep == "last"``).
        val_labels: Labels for validation (default: ``labels``).
        resume: Continue from ``output.last.pt``.
        command: Command line, recorded in the checkpoint.

    Raises:
        ConfigError: Invalid settings. LabelError: unusable labels. WeightsError: bad init/resume file.
    """
    t_start = time.perf_counter()
    out = Path(output)
    if not out.parent.exists():
        raise ConfigError(f"output folder {out.parent} does not exist; create it first")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    data = load_data(images, labels, val_images, val_labels, settings)
    trainer = Trainer(settings, data, out, command)
    trainer.start(resume)
    return trainer.run(t_start)
