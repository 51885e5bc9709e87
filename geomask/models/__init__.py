"""What ships with geomask: the bundled models, and how the built-in detector's options name them.

Torch-free, so the CLI and the run store can resolve ``--weights`` and hash a shipped model without
loading a deep-learning stack. The detector protocol (:mod:`geomask.detect.base`) knows nothing of
these files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geomask.config import DEFAULT_DETECTOR
from geomask.errors import DetectorError

MODELS_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = "buildings_r18.pt"  # what the built-in Mask R-CNN loads when no weights are given
BUNDLED_MODELS = {"buildings": BUNDLED_MODEL, "trees": "trees_r18.pt"}  # `weights: trees` names a shipped model


def bundled_model_path(weights: str | None) -> Path | None:
    """Return the file of a shipped model named by ``weights`` (``None`` → the default), else ``None``."""
    if weights is None:
        return MODELS_DIR / BUNDLED_MODEL
    name = BUNDLED_MODELS.get(weights)
    return MODELS_DIR / name if name is not None else None


def _no_files(options: Mapping[str, Any]) -> list[Path]:
    return []


@dataclass(frozen=True)
class DetectorOptions:
    """How a detector's options are set from ``geomask predict``'s flags and identified in a run folder.

    Attributes:
        flags: Options the command line may set (``--weights``, ``--device``); any other detector
            refuses them, since their meaning is the built-in detector's.
        path_flags: Flags holding a file path, made absolute so that workers started elsewhere find it.
        implied_files: The files an option set loads without naming them (a shipped model by name or
            by default), hashed with the files the options do name.
    """

    flags: frozenset[str] = frozenset()
    path_flags: frozenset[str] = frozenset()
    implied_files: Callable[[Mapping[str, Any]], list[Path]] = field(default=_no_files)

    def with_flags(self, options: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``options`` with the command-line flags that were ``given`` (not ``None``) applied.

        Raises:
            DetectorError: A flag this detector does not take was given.
        """
        given = {k: v for k, v in given.items() if v is not None}
        refused = sorted(set(given) - self.flags)
        if refused:
            flags = "/".join(f"--{k}" for k in refused)
            raise DetectorError(f"{flags} apply to the built-in detector only; pass options to yours in the config")
        out = dict(options)
        for key, value in given.items():
            if key not in self.path_flags:
                out[key] = value
            elif isinstance(value, list | tuple):  # a repeatable flag: each path on its own
                out[key] = [_absolute(v) for v in value]
            else:
                out[key] = _absolute(value)
        return out

    def model_files(self, options: Mapping[str, Any]) -> list[Path]:
        """Return the files whose content identifies the model: those implied, then every option naming a file.

        An option holding a list (an ensemble's members) names each of its files, in order.
        """
        values = [v for _, value in sorted(options.items()) for v in as_list(value)]
        named = [Path(v) for v in values if isinstance(v, str | os.PathLike) and Path(v).is_file()]
        return [p for p in self.implied_files(options) if p.is_file()] + named


def as_list(value: Any) -> list[Any]:
    """Return an option that takes one value or several (``ensemble``) as a list: ``None`` → ``[]``, a scalar → ``[it]``."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _absolute(value: Any) -> Any:
    """Return ``value`` as an absolute path when it names a file (workers may run elsewhere), else unchanged."""
    return str(Path(value).resolve()) if isinstance(value, str | os.PathLike) and Path(value).is_file() else value


def _maskrcnn_files(options: Mapping[str, Any]) -> list[Path]:
    # A shipped model is named, not given as a path: a new release may ship new weights under that name.
    shipped = bundled_model_path(options.get("weights"))
    named = [bundled_model_path(m) for m in as_list(options.get("ensemble")) if isinstance(m, str)]
    return ([shipped] if shipped is not None else []) + [p for p in named if p is not None]


#: The ONNX Runtime detector (torch-free): what the built-in detector's factory becomes for ``.onnx`` weights.
ONNX_DETECTOR = "geomask.detect.onnxrt:build"

#: The option rules of detectors geomask ships; a detector not listed gets the generic rules.
DETECTORS: dict[str, DetectorOptions] = {
    DEFAULT_DETECTOR: DetectorOptions(frozenset({"weights", "device", "ensemble"}), frozenset({"weights", "ensemble"}), _maskrcnn_files),
    ONNX_DETECTOR: DetectorOptions(frozenset({"weights", "device"}), frozenset({"weights"})),
}


def resolve_factory(factory: str, options: Mapping[str, Any]) -> str:
    """Return the factory that really builds ``factory`` with ``options``: the ONNX detector for ``.onnx`` weights.

    The choice is made here, before anything is imported, so that ``--weights model.onnx`` never
    imports the torch detector's module (and torch with it).

    Raises:
        DetectorError: ``.onnx`` weights with ensemble members (the ONNX detector runs one model).
    """
    weights = options.get("weights")
    if factory == DEFAULT_DETECTOR and isinstance(weights, str | os.PathLike) and str(weights).lower().endswith(".onnx"):
        if options.get("ensemble"):
            raise DetectorError("ensembles run .pt checkpoints; ONNX weights run alone: drop --ensemble or pass the .pt weights")
        return ONNX_DETECTOR
    return factory


def detector_options(factory: str) -> DetectorOptions:
    """Return the option rules of the detector ``factory`` builds (generic rules for a detector geomask does not ship)."""
    return DETECTORS.get(factory, DetectorOptions())
