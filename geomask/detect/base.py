"""The public detector contract.

A detector takes a batch of tiles (normalised pixels, validity mask and the tile's windows) and
returns, for each tile, the instances it found, in *global* pixel coordinates of the working grid
(the tile's ``read`` window offset added), masks cropped to their boxes. Users bring their own
models by writing a factory that returns an object with this shape and naming it
``package.module:factory`` on the command line (``--detector``) or in the config
(``detector: {factory: ..., options: {...}}``); the factory is called with ``options`` as keywords.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from geomask.errors import DetectorError
from geomask.instances import Instance
from geomask.models import resolve_factory
from geomask.tiling import Tile


@dataclass(frozen=True)
class TileImage:
    """One tile ready for a detector.

    Attributes:
        tile: The tile (its ``read`` window gives the global offset of ``pixels``).
        pixels: Float32 ``(bands, h, w)`` normalised to ``[0, 1]`` (0 where invalid).
        valid: Bool ``(h, w)``; ``False`` on nodata. Instances never include invalid pixels.
    """

    tile: Tile
    pixels: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ModelHints:
    """Settings a model was trained with, so users need not repeat them (all optional).

    ``channels`` is the number of bands a tile must have (``None``: any). The pipeline checks it
    against each raster's band selection before reading a tile, so a wrong ``raster.bands`` stops
    a job in one line instead of failing every tile. ``min_area_m2``, ``simplify_tolerance_m`` and
    ``shape`` are the polygon settings the model's card was measured with; they fill the config's
    ``vectorize`` settings left at their defaults (``shape`` names a polygon method, kept for the
    polygon stage that reads it).
    """

    tile_size_px: int | None = None
    gsd_m: float | None = None
    bands: tuple[int, ...] | None = None
    normalize_mode: str | None = None
    percentiles: tuple[float, float] | None = None
    channels: int | None = None
    min_area_m2: float | None = None
    simplify_tolerance_m: float | None = None
    shape: str | None = None


@dataclass(frozen=True)
class ModelCard:
    """What a model's file says about it, for the run report: its measured accuracy and where that is written.

    A detector reports the numbers its file carries (a checkpoint's ``metrics``, an ONNX export's
    metadata), never numbers of its own, and names the file and field they come from so that a reader
    can check them. A detector without a ``card`` attribute has an empty one (:func:`model_card`).

    Attributes:
        metrics: As stored, e.g. ``heldout_f1``, ``heldout_precision``, ``val_f1``.
        source: Where they come from (file and field), or ``""`` when nothing is stated.
        attribution: Credit owed to the training data's authors.
    """

    metrics: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    attribution: str = ""


def model_card(detector: object) -> ModelCard:
    """Return ``detector``'s :class:`ModelCard` (its optional ``card`` attribute), else an empty one."""
    card = getattr(detector, "card", None)
    return card if isinstance(card, ModelCard) else ModelCard()


@runtime_checkable
class Detector(Protocol):
    """What the pipeline needs from a model.

    Attributes:
        name: Short identifier written into every output feature's provenance (``model`` field).
        classes: Class names; an instance's ``class_id`` indexes this sequence.
        hints: Training-time settings, or an empty :class:`ModelHints`.
    """

    name: str
    classes: Sequence[str]
    hints: ModelHints

    def detect(self, batch: Sequence[TileImage]) -> list[list[Instance]]:
        """Return the instances of each tile in ``batch``, in global working-grid pixels."""
        ...


def load_detector(factory: str, options: dict[str, Any] | None = None) -> Detector:
    """Import ``package.module:callable`` and call it with ``options`` to build a detector."""
    factory = resolve_factory(factory, options or {})  # `.onnx` weights: the torch-free detector
    module_name, sep, attr = factory.partition(":")
    if not sep or not module_name or not attr:
        raise DetectorError(f"detector factory {factory!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if getattr(err, "name", None) in ("torch", "torchvision"):  # a torch-free install given .pt weights
            raise DetectorError(
                f"cannot import detector module {module_name!r} ({err}): .pt weights need torch; "
                "install it (`pip install torch torchvision`) or export ONNX weights (`geomask export-model`) and pass the .onnx file"
            ) from None
        raise DetectorError(f"cannot import detector module {module_name!r} ({err}); is it installed or on PYTHONPATH?") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise DetectorError(f"{module_name!r} has no callable {attr!r}; check detector.factory")
    try:
        detector = func(**(options or {}))
    except TypeError as err:
        raise DetectorError(f"detector factory {factory} rejected its options {sorted(options or {})}: {err}") from None
    if not isinstance(detector, Detector):
        raise DetectorError(f"{factory} returned {type(detector).__name__}, which lacks name/classes/hints/detect()")
    return detector
