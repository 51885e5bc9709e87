"""Many inputs per job: paths, glob patterns, ``.txt`` list files and STAC items in; one output layout out."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from geomask import remote
from geomask.errors import ExportError, RasterReadError
from geomask.export import DRIVERS, check_writable
from geomask.remote import is_remote

GLOB_CHARS = frozenset("*?[")


def _expand_one(spec: str, base: str | None = None) -> list[Path]:
    if base is not None and is_remote(base):  # an entry of a remote list: beside the list unless it is remote itself
        spec = remote.join(base, spec)
    if is_remote(spec):
        return _expand_remote(spec)
    text = spec if base is None or Path(spec).is_absolute() else str(Path(base) / spec)
    if GLOB_CHARS & set(spec):
        found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not found:
            raise RasterReadError(f"no file matches {spec!r}; check the pattern (quote it so the shell passes it on)")
        return found
    path = Path(text)
    if path.is_dir():
        raise RasterReadError(f"input {text!r} is a folder, not a raster; give its files, e.g. '{path / '*.tif'}' (quoted)")
    if not path.is_file():
        raise RasterReadError(f"input {text!r} does not exist; check the path")
    return [path]


def _expand_remote(spec: str) -> list[Path]:
    """Return GDAL paths for a URL or ``/vsi*`` path; an ``s3://`` glob is listed (it is read when planned, not here).

    Only ``s3://`` paths are globbed: an HTTP URL has no listing, and its ``?`` starts a query (a signed URL).
    """
    url = remote.url_of(spec)
    if not url.startswith(remote.S3_SCHEME) or not GLOB_CHARS & set(url):
        return [Path(remote.gdal_path(spec))]
    found = remote.glob_s3(spec)
    if not found:
        raise RasterReadError(f"no object matches {remote.url_of(spec)!r}; check the bucket and the pattern (quote it)")
    return [Path(remote.gdal_path(url)) for url in found]


def _read_text(spec: str) -> str:
    """The text of a small input file (a ``.txt`` list, a STAC JSON): local, or on S3 or HTTP."""
    return remote.read_text(spec) if is_remote(spec) else Path(spec).read_text()


# Media types of the assets a STAC item may hand to GDAL as a raster (any GeoTIFF profile, JPEG 2000).
RASTER_MEDIA_TYPES = ("image/tiff", "image/jp2", "image/vnd.stac.geotiff")


def _stac_items(spec: str) -> list[Any]:
    """Read a STAC item or item collection (a local file or a URL) with pystac; a bad one is one line."""
    try:
        import pystac
    except ImportError:
        raise RasterReadError(f"input {spec} is JSON (a STAC item?): reading STAC needs pystac; `pip install pystac`") from None
    try:
        data = json.loads(_read_text(spec))
    except ValueError as err:
        raise RasterReadError(f"input {spec} is not valid JSON ({err}); give a STAC item or item collection") from None
    except OSError as err:
        raise RasterReadError(f"cannot read input {spec} ({err.strerror or err}); check the path and its permissions") from None
    kind = data.get("type") if isinstance(data, dict) else None
    try:
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(data).items)
        elif kind == "Feature":
            items = [pystac.Item.from_dict(data)]
        else:
            raise ValueError(f"its type is {kind!r}")
    except Exception as err:  # noqa: BLE001 - pystac raises many types (STACTypeError is not a STACError): all mean "not STAC"
        raise RasterReadError(
            f"input {spec} is not a STAC item or item collection ({err}); give one (e.g. a saved search result)"
        ) from None
    if not items:
        raise RasterReadError(f"STAC item collection {spec} holds no items; check the search that wrote it")
    return items


def _pick_asset(item: Any, spec: str, asset: str | None) -> str:
    """Return the href of ``asset`` (or of the item's only raster asset) of one STAC item."""
    assets = dict(item.assets)
    if asset is not None:
        if asset not in assets:
            raise RasterReadError(
                f"STAC item {item.id!r} in {spec} has no asset {asset!r} (it has: {', '.join(assets)}); pick one with --asset"
            )
        return str(assets[asset].href)
    if "visual" in assets:
        return str(assets["visual"].href)
    rasters = [k for k, a in assets.items() if (a.media_type or "").startswith(RASTER_MEDIA_TYPES)]
    if len(rasters) != 1:
        names = ", ".join(rasters or list(assets))
        raise RasterReadError(f"STAC item {item.id!r} in {spec} has {len(rasters)} raster assets ({names}); pick one with --asset")
    return str(assets[rasters[0]].href)


def _expand_stac(spec: str, asset: str | None) -> list[Path]:
    """The raster assets of a STAC item or item collection, a relative href taken beside the JSON file."""
    base = remote.gdal_path(spec) if is_remote(spec) else str(Path(spec).resolve().parent)
    out: list[Path] = []
    for item in _stac_items(spec):
        href = _pick_asset(item, spec, asset)
        if href.startswith("file:"):
            href = url2pathname(urlsplit(href).path)  # file:///a/b%20c.tif, file://localhost/a.tif
        # An absolute local path stands on its own, even in a remote JSON; a relative one sits beside the JSON.
        out += _expand_one(href, None if Path(href).is_absolute() and not is_remote(href) else base)
    return out


def is_stac(spec: str) -> bool:
    """Return whether an input names a STAC item or item collection (a ``.json`` file or URL)."""
    return remote.url_of(spec).lower().split("?")[0].endswith(".json") and (is_remote(spec) or Path(spec).is_file())


def expand_inputs(specs: Sequence[str], asset: str | None = None) -> list[Path]:
    """Turn command-line inputs into raster paths, in order, without duplicates.

    A ``.txt`` file (local, or on S3 or HTTP) is a list: one path, URL or glob per line, relative to the
    list's folder; blank lines and lines starting with ``#`` are skipped. A ``.json`` file or URL is a
    STAC item or item collection (a catalogue search result, read with pystac): each item gives its
    asset named ``asset`` (default: ``visual``, else its only GeoTIFF/JPEG 2000 asset), a relative href
    beside the JSON. Remote inputs (``s3://``, ``https://``, ``/vsi*``) come back as the GDAL paths that
    open them (:func:`geomask.remote.gdal_path`); an ``s3://`` glob is listed with s3fs.
    """
    out: list[Path] = []
    for spec in specs:
        if is_stac(spec):
            out += _expand_stac(spec, asset)
        elif spec.lower().endswith(".txt") and (is_remote(spec) or Path(spec).is_file()):
            text = _read_text(spec)
            base = remote.gdal_path(spec) if is_remote(spec) else str(Path(spec).parent)
            for line in text.splitlines():
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    out += _expand_one(entry, base)
        else:
            out += _expand_one(spec)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p if is_remote(p) else p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


@dataclass(frozen=True)
class OutputLayout:
    """Where results go: one file per input (``per_input``) or one file with a ``source`` field (``combined``)."""

    per_input: dict[Path, Path] | None
    combined: Path | None
    overwrite: bool = False  # existing outputs (in a GeoPackage: geomask's layer) may be replaced
    owned: frozenset[Path] = field(default_factory=frozenset)  # outputs this run folder wrote: replaced when the run is resumed

    def may_replace(self, output: Path) -> bool:
        """Return whether ``output`` may be replaced: ``--overwrite``, or the resumed run wrote it itself."""
        return self.overwrite or output.resolve() in self.owned

    @property
    def paths(self) -> list[Path]:
        return list(self.per_input.values()) if self.per_input is not None else [self.combined] if self.combined else []


def is_folder_output(output: str) -> bool:
    """Return whether ``-o`` names a folder: it exists as one, or ends with a path separator."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def plan_outputs(
    output: str,
    inputs: Sequence[Path],
    fmt: str = "gpkg",
    layer: str = "instances",
    overwrite: bool = False,
    owned: Collection[Path] = (),
) -> OutputLayout:
    """Decide output paths and check them before any work is done.

    Args:
        output: The ``-o`` value: a folder (exists, or ends with ``/``) or a file.
        inputs: The expanded inputs.
        fmt: Extension of the per-input files in folder mode (``gpkg``, ``geojson``, ``parquet``...).
        layer: geomask's layer in a GeoPackage (``export.layer``).
        overwrite: Replace existing outputs (``--overwrite``); without it an existing one stops the job here.
        owned: Outputs that the run folder being resumed wrote itself (:attr:`workflows.store.RunStore.outputs`):
            re-running the same command replaces them, as it redoes the failed work.
    """
    if is_remote(output):
        raise ExportError(
            f"-o {output}: outputs are written to a local path (or a mounted share), not to object storage; "
            "write locally and upload, e.g. `aws s3 cp --recursive out/ s3://bucket/prefix/`"
        )
    resolved = frozenset(p.resolve() for p in owned)
    if not is_folder_output(output):
        return _checked(OutputLayout(None, Path(output), overwrite, resolved), layer)
    suffix = "." + fmt.lower().lstrip(".")
    if suffix not in DRIVERS:
        raise ExportError(f"unknown output format {fmt!r}; use one of {sorted(s.lstrip('.') for s in DRIVERS)}")
    folder = Path(output)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create output folder {folder} ({err.strerror}); choose another -o") from None
    per_input: dict[Path, Path] = {}
    by_name: dict[str, Path] = {}
    for src in inputs:
        name = src.stem + suffix
        if name in by_name:
            raise ExportError(f"inputs {by_name[name]} and {src} would both write {folder / name}; rename one or run them separately")
        by_name[name] = src
        per_input[src] = folder / name
    return _checked(OutputLayout(per_input, None, overwrite, resolved), layer)


def _checked(layout: OutputLayout, layer: str) -> OutputLayout:
    for path in layout.paths:
        check_writable(path, layer, layout.may_replace(path))
    return layout
