"""Run configuration: pydantic models loaded from YAML, validated once, every default in one place.

Below the CLI, functions take plain typed arguments; only the pipeline and ``workflows`` read these
models. Unknown keys are errors (``extra="forbid"``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pyproj import CRS
from pyproj.exceptions import CRSError

from geomask.errors import ConfigError, first_line

DEFAULT_DETECTOR = "geomask.detect.maskrcnn:build"


class _Model(BaseModel):
    # strict: a value's type is checked as written (``size_px: "512"`` is an error, not silently 512); an
    # integer is still a valid float, and sequences (tuples) may be written as YAML lists.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NormalizeConfig(_Model):
    """How raw pixel values become ``[0, 1]`` floats, identically for every tile of a raster.

    ``auto`` uses the full range for uint8 data and sampled percentiles for anything else (16-bit,
    float): never a blind ``/255``. ``percentile`` always samples; ``range`` maps the dtype's range;
    ``none`` passes values through as float32 (for detectors that normalise themselves).
    """

    mode: Literal["auto", "range", "percentile", "none"] = "auto"
    percentiles: tuple[float, float] = Field((2.0, 98.0), strict=False)  # a YAML list; the numbers stay strict
    sample_windows: int = Field(16, ge=1, le=1024)
    sample_size_px: int = Field(512, ge=16)

    @model_validator(mode="after")
    def _check_percentiles(self) -> NormalizeConfig:
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        return self


class RasterConfig(_Model):
    """Which bands to read, at which ground sample distance."""

    bands: list[int] | None = Field(None, description="1-based band indexes in model order; None = model's or first 3")
    gsd_m: float | None = Field(None, gt=0, description="resample to this ground sample distance; None = model's or native")
    max_resample_factor: float = Field(
        4.0, ge=1.0, description="refuse a working grid more than this many times finer (4x this, coarser) than the source"
    )
    expand_gray: bool = True
    normalize: NormalizeConfig = NormalizeConfig()


class TilingConfig(_Model):
    """Tile size and overlap in working-grid pixels (overlap may be given in metres instead)."""

    size_px: int | None = Field(None, ge=16, description="None = the model's tile size, else 512")
    overlap_px: int | None = Field(None, ge=1, description="None = size_px // 8")
    overlap_m: float | None = Field(None, gt=0)
    aoi: str | None = Field(None, description="OGR vector file: only tiles touching it are read, only objects touching it kept")
    skip_empty: bool = Field(True, description="plan no tile that provably holds no valid pixel (sparse blocks, overviews)")
    scan_mask: bool = Field(False, description="with skip_empty, scan the full-resolution mask when the file gives no cheaper evidence")

    @model_validator(mode="after")
    def _check(self) -> TilingConfig:
        if self.overlap_px is not None and self.overlap_m is not None:
            raise ValueError("give tiling.overlap_px or tiling.overlap_m, not both")
        if self.size_px is not None and self.overlap_px is not None and self.overlap_px >= self.size_px:
            raise ValueError(
                f"tiling.overlap_px ({self.overlap_px}) must be less than tiling.size_px ({self.size_px}); "
                f"try overlap_px: {self.size_px // 8}"
            )
        return self


class DetectorConfig(_Model):
    """The detector: an importable ``package.module:factory`` called with ``options`` as keywords."""

    factory: str = DEFAULT_DETECTOR
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(4, ge=1)


class MergeConfig(_Model):
    """Cross-tile merge: two border instances of neighbouring tiles are one object when the
    intersection over the smaller of their areas inside the shared zone reaches ``ios_threshold``."""

    ios_threshold: float = Field(0.5, gt=0.0, le=1.0)


ShapeMethodName = Literal["pixel", "simplify", "orthogonal", "circle", "smooth"]


class ShapeClassConfig(_Model):
    """Per-class override of :class:`ShapeConfig`; a key left out (``None``) keeps the general setting."""

    method: ShapeMethodName | None = None
    tolerance_m: float | None = Field(None, gt=0.0)
    simplify_m: float | None = Field(None, gt=0.0)
    diagonals: bool | None = None
    circles: bool | None = None
    max_area_change: float | None = Field(None, gt=0.0, le=1.0)


class ShapeConfig(_Model):
    """The shape stage after the merge (``geomask.shape``): how outlines are regularised, and the gate.

    ``pixel`` keeps the exact pixel-edge trace. A reshaped outline is kept only when it stays within
    ``tolerance_m`` of the mask outline, changes the area by at most ``max_area_change`` and overlaps
    no neighbour the mask did not overlap; otherwise the outline simplified by ``simplify_m`` is kept.
    ``classes`` overrides any of these per class name (or class id as text).
    """

    method: ShapeMethodName = "pixel"
    tolerance_m: float | None = Field(None, gt=0.0, description="gate distance; None = 3 working pixels")
    simplify_m: float | None = Field(None, gt=0.0, description="Douglas-Peucker tolerance; None = 1 working pixel")
    diagonals: bool = False
    circles: bool = True
    max_area_change: float = Field(0.2, gt=0.0, le=1.0)
    classes: dict[str, ShapeClassConfig] = Field(default_factory=dict)


class VectorizeConfig(_Model):
    simplify_tolerance_m: float = Field(0.0, ge=0.0)
    min_area_m2: float = Field(0.0, ge=0.0)
    shape: ShapeConfig = ShapeConfig()


class ExportConfig(_Model):
    geojson_crs: str | None = Field("EPSG:4326", description="RFC 7946; None keeps the raster's CRS")
    layer: str = Field("instances", min_length=1)

    @field_validator("geojson_crs")
    @classmethod
    def _check_crs(cls, value: str | None) -> str | None:
        """Refuse an unknown CRS when the config is loaded, not after every tile has been processed."""
        if value is not None:
            try:
                CRS.from_user_input(value)
            except CRSError:
                raise ValueError(
                    f"{value!r} is not a CRS pyproj knows; use e.g. EPSG:4326 (RFC 7946), or null to keep the raster's CRS"
                ) from None
        return value


class DaskConfig(_Model):
    address: str | None = Field(None, description="scheduler address; None starts a LocalCluster")
    cluster: str | None = Field(None, description="cluster file (configs/cluster-slurm.yaml): workers run as batch jobs geomask submits")
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    gpu: bool = Field(False, description="tag inference tasks with resources={'GPU': 1}")
    tiles_per_task: int = Field(16, ge=1)
    retries: int = Field(2, ge=0)
    dashboard: bool = True
    stall_timeout_s: float = Field(600.0, ge=0, description="stop (exit 5) when no task finished for this long; 0 = never")

    @model_validator(mode="after")
    def _one_cluster(self) -> DaskConfig:
        if self.address is not None and self.cluster is not None:
            raise ValueError("dask.address and dask.cluster both name a cluster; give one (--scheduler or --cluster)")
        return self


class Config(_Model):
    raster: RasterConfig = RasterConfig()
    tiling: TilingConfig = TilingConfig()
    detector: DetectorConfig = DetectorConfig()
    merge: MergeConfig = MergeConfig()
    vectorize: VectorizeConfig = VectorizeConfig()
    export: ExportConfig = ExportConfig()
    dask: DaskConfig = DaskConfig()


def _describe(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {loc!r}; check the spelling against configs/default.yaml"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"].endswith("_type") and isinstance(first["input"], str):  # strict types: "512" is not 512
        msg = f"{msg}, got the text {first['input']!r}; write the value without quotes"
    return f"{source}: {loc}: {msg}" if loc else f"{source}: {msg}"


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a :class:`Config`, raising :class:`ConfigError` with one line."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file (a config, a cluster file), raising :class:`ConfigError` with one line."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}; check the path") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({first_line(err)}); fix the syntax") from None


def load_config(path: str | Path | None = None) -> Config:
    """Load a YAML config file (``None`` gives the defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    data = read_yaml(p, "config")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections (raster, tiling, ...), got {type(data).__name__}")
    return config_from_dict(data, str(p))


def merge_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Return ``config`` with dotted-key ``overrides`` (``{"tiling.size_px": 256}``) applied and revalidated."""
    data = config.model_dump()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(data, "command line")


def dump_config(config: Config) -> str:
    """Serialise a config to YAML (the resolved config written beside every output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
