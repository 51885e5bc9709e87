"""Training a Mask R-CNN on GeoTIFFs and vector labels (imports torch).

One module per role: ``settings`` (the validated knobs), ``chips`` (rasters, chip reads, sampling),
``augment`` (geometry, colour, copy-paste, photometrics), ``validation`` (F1 through
:mod:`geomask.evaluate`'s matcher), ``weights`` (initialisation, moving average) and ``trainer`` (the
loop and its checkpoints).
"""

from __future__ import annotations

from geomask.detect.training.settings import TrainSettings
from geomask.detect.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "TrainSettings", "Trainer", "train"]
