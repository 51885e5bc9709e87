"""The run folder (``--run-dir``): a manifest and one result file per finished task, for resume.

Layout::

    RUN_DIR/manifest.json                      inputs (path, size, mtime; remote: path, size, ETag), config hash, model name and hash
    RUN_DIR/results/<input>/<block>.npz        one per finished task (features as WKB, open instances bit-packed)
    RUN_DIR/failures.jsonl                     the failure ledger of the last run (one JSON object per line)
    RUN_DIR/summary.json                       counts of the last run (tasks computed and loaded, tiles, objects)
    RUN_DIR/outputs.json                       the output files this run folder's jobs wrote (re-running replaces them)

Every file is written to a temporary name and renamed into place, so a job killed at any moment leaves
either a whole result or none. A result is only written when it and everything below it in the merge
tree finished without failure, so failed work is always redone on the next run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import MultiPolygon

from geomask.atomic import write_bytes_atomic
from geomask.config import Config
from geomask.digest import file_sha256
from geomask.errors import ConfigError, GeomaskError
from geomask.instances import Instance
from geomask.models import detector_options
from geomask.remote import identity, is_remote
from geomask.vectorize import Feature
from workflows.blocks import BlockResult, Failure

FORMAT_VERSION = 1
OUTPUTS = "outputs.json"
log = logging.getLogger(__name__)


class RunDirError(GeomaskError, OSError):
    """The run folder cannot be used (unwritable, or made by a different job)."""


def config_hash(config: Config) -> str:
    """Hash the settings that change what tasks produce (not the cluster, the export format or the model).

    The model is hashed separately (:func:`model_hash`) so the refusal message can say which one changed.
    ``dask.tiles_per_task`` is included because it decides which tiles a stored result holds; the rest of
    ``dask`` and ``detector.batch_size`` (how many tiles one detector call takes: every tile is the same
    size, so no batch pads another) only change how fast, so changing them keeps a run folder resumable.
    """
    data = config.model_dump(mode="json")
    data.pop("export")
    data["dask"] = {"tiles_per_task": config.dask.tiles_per_task}
    data.pop("detector")  # factory and options are the model's hash; batch_size does not change results
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def model_hash(factory: str, options: dict[str, Any]) -> str:
    """Hash the detector factory, its options and the content of every file an option names (weights, or the bundled model)."""
    digest = hashlib.sha256(json.dumps({"factory": factory, "options": options}, sort_keys=True, default=str).encode())
    for path in detector_options(factory).model_files(options):  # a shipped model counts: a release may ship new weights
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def describe_inputs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Return what identifies each input for the manifest: absolute path, size and modification time.

    A remote input (``s3://``, ``https://``, ``/vsi*``) is identified by its GDAL path, size and ETag
    (:func:`geomask.remote.identity`): an object's mtime is when it was uploaded, not what it holds.
    """
    out = []
    for p in paths:
        if is_remote(p):
            out.append({"path": str(p), **identity(str(p))})
            continue
        st = p.stat()
        out.append({"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _pack_features(feats: Sequence[Feature]) -> dict[str, npt.NDArray[Any]]:
    wkb = [shapely.to_wkb(f.geometry) for f in feats]
    return {
        "f_wkb": np.frombuffer(b"".join(wkb), dtype=np.uint8),
        "f_off": np.cumsum([0] + [len(b) for b in wkb], dtype=np.int64),
        "f_class": np.array([f.class_id for f in feats], dtype=np.int64),
        "f_num": np.array([(f.score, f.area_m2, f.perim_m) for f in feats], dtype=np.float64).reshape(-1, 3),
    }


def _unpack_features(z: Any) -> list[Feature]:
    buf, off = z["f_wkb"].tobytes(), z["f_off"]
    out = []
    for k, (cls, num) in enumerate(zip(z["f_class"].tolist(), z["f_num"].tolist(), strict=True)):
        geom = shapely.from_wkb(buf[off[k] : off[k + 1]])
        out.append(Feature(geom if isinstance(geom, MultiPolygon) else MultiPolygon([geom]), int(cls), num[0], num[1], num[2]))
    return out


def _pack_instances(insts: Sequence[Instance]) -> dict[str, npt.NDArray[Any]]:
    bits = [np.packbits(i.mask, axis=None) for i in insts]
    return {
        "i_int": np.array([(i.row_off, i.col_off, i.height, i.width, i.class_id, i.tile_id) for i in insts], dtype=np.int64).reshape(-1, 6),
        "i_score": np.array([i.score for i in insts], dtype=np.float64),
        "i_bits": np.concatenate(bits) if bits else np.zeros(0, dtype=np.uint8),
        "i_off": np.cumsum([0] + [b.size for b in bits], dtype=np.int64),
    }


def _unpack_instances(z: Any) -> list[Instance]:
    bits, off, scores = z["i_bits"], z["i_off"], z["i_score"].tolist()
    out = []
    for k, (row_off, col_off, height, width, class_id, tile_id) in enumerate(z["i_int"].tolist()):
        flat = np.unpackbits(bits[off[k] : off[k + 1]], count=height * width).astype(bool)
        out.append(Instance(row_off, col_off, flat.reshape(height, width), scores[k], class_id, tile_id))
    return out


def encode_result(result: BlockResult) -> bytes:
    """Serialise a task result to ``.npz`` bytes: exact (float64, WKB) and free of pickle."""
    meta = {k: v for k, v in asdict(result).items() if k not in ("features", "open")}
    arrays: dict[str, Any] = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    arrays.update(_pack_features(result.features))
    arrays.update(_pack_instances(result.open))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_result(data: bytes) -> BlockResult:
    """Read back what :func:`encode_result` wrote."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        failures = [Failure(**f) for f in meta.pop("failures")]
        return BlockResult(features=_unpack_features(z), open=_unpack_instances(z), failures=failures, **meta)


@dataclass(frozen=True)
class Manifest:
    """What a run folder was made for; a re-run must match it to reuse the stored results."""

    inputs: list[dict[str, Any]]
    config_hash: str
    model: str  # the detector factory, for the message when it changes
    model_hash: str

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **asdict(self)}, indent=2)


def recorded_outputs(run_dir: Path) -> frozenset[Path]:
    """Return the outputs the jobs of ``run_dir`` wrote (absolute paths; empty for a new folder).

    Read before the folder is opened, so that the outputs are checked before anything is written. They
    survive ``--fresh``: starting the run again replaces what it wrote before.
    """
    try:
        return frozenset(Path(p) for p in json.loads((run_dir / OUTPUTS).read_text()))
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()
    except (OSError, ValueError, TypeError) as err:
        raise RunDirError(f"cannot read {run_dir / OUTPUTS} ({err}); use a new --run-dir") from None


class RunStore:
    """Persisted task results of one run folder.

    Args:
        root: The run folder (created when missing).
        manifest: What this job is; compared with a stored manifest.
        fresh: Discard stored results instead of refusing a different job.
        accept_repaired: Accept inputs that changed on disk when the failure ledger names them (see :meth:`_repaired`).
    """

    def __init__(self, root: Path, manifest: Manifest, fresh: bool = False, accept_repaired: bool = False):
        self.root = root
        self.accept_repaired = accept_repaired
        self.repaired: dict[int, set[int]] = {}  # input id -> its failed tiles, for inputs repaired since the last run
        self.pending: Manifest | None = None  # written by commit() once the stale results are gone
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"cannot create run dir {root} ({err.strerror}); choose another --run-dir") from None
        stored_path = root / "manifest.json"
        if fresh:
            shutil.rmtree(root / "results", ignore_errors=True)
            stored_path.unlink(missing_ok=True)
        try:
            if stored_path.exists():
                self._check(stored_path, manifest)
            else:
                write_bytes_atomic(stored_path, manifest.to_json().encode())
            (root / "results").mkdir(exist_ok=True)
        except OSError as err:
            raise RunDirError(f"cannot write to run dir {root} ({err.strerror or err}); choose another --run-dir") from None
        for tmp in (root / "results").glob("*/.*.tmp"):  # left by a job killed mid-write
            shutil.rmtree(tmp, ignore_errors=True)
        self.outputs = recorded_outputs(root)

    def record_output(self, path: Path) -> None:
        """Remember that this run folder's job wrote ``path``, so that re-running the same command may replace it."""
        self.outputs = self.outputs | {path.resolve()}
        self.write_json(OUTPUTS, sorted(str(p) for p in self.outputs))

    def _check(self, stored_path: Path, manifest: Manifest) -> None:
        try:
            stored = json.loads(stored_path.read_text())
        except (OSError, ValueError) as err:
            raise RunDirError(f"cannot read {stored_path} ({err}); use a new --run-dir or add --fresh") from None
        way_out = "use a new --run-dir or add --fresh to discard its results"
        if stored.get("format") != FORMAT_VERSION:
            raise RunDirError(f"run dir {self.root} was written by another geomask version; {way_out}")
        if stored.get("model_hash") != manifest.model_hash:
            raise ConfigError(
                f"run dir {self.root} was made with another model ({stored.get('model')}, hash {stored.get('model_hash')}, "
                f"now {manifest.model}, hash {manifest.model_hash}); {way_out}"
            )
        if stored.get("config_hash") != manifest.config_hash:
            raise ConfigError(
                f"run dir {self.root} was made with another config (hash {stored.get('config_hash')}, now {manifest.config_hash}); {way_out}"
            )
        if stored.get("inputs") != manifest.inputs:
            if not self.accept_repaired:
                raise ConfigError(
                    f"run dir {self.root} was made for other inputs (or they changed on disk since); {way_out}, "
                    "or --accept-repaired after repairing an input the failure ledger names"
                )
            self.repaired = self._repaired(stored.get("inputs") or [], manifest.inputs, way_out)
            self.pending = manifest

    def _repaired(self, before: list[dict[str, Any]], now: list[dict[str, Any]], way_out: str) -> dict[int, set[int]]:
        """Return, per changed input, the tiles the failure ledger lists; refuse any other change.

        A repair is trusted to change only pixels the failed tiles read: the job redoes those tiles and
        every stored block that read any of their pixels (:meth:`discard`). An input that changed without
        a failed tile has no such bound, so its stored results could be stale anywhere: refused.
        """
        if [i["path"] for i in before] != [i["path"] for i in now]:
            raise ConfigError(f"run dir {self.root} was made for other inputs; {way_out}")
        failed: dict[str, set[int]] = {}
        try:
            for line in (self.root / "failures.jsonl").read_text().splitlines():
                entry = json.loads(line)
                source = Path(entry["source"])
                failed.setdefault(str(source if is_remote(source) else source.resolve()), set()).add(int(entry["tile"]))
        except (OSError, ValueError, KeyError, TypeError):
            failed = {}
        out = {}
        for k, (old, new) in enumerate(zip(before, now, strict=True)):
            if old != new:
                if new["path"] not in failed:
                    raise ConfigError(f"{new['path']} changed on disk but had no failed tiles in {self.root}; {way_out}")
                out[k] = {t for t in failed[new["path"]] if t >= 0}
        return out

    def discard(self, input_id: int, block_keys: Iterable[str]) -> None:
        """Delete stored results that a repaired input makes stale."""
        for key in block_keys:
            self._path(input_id, key).unlink(missing_ok=True)

    def commit(self) -> None:
        """Record the repaired inputs in the manifest, once the job discarded what they made stale.

        Until then the old manifest stands, so a job killed in between needs ``--accept-repaired`` (and
        discards) again.
        """
        if self.pending is not None:
            write_bytes_atomic(self.root / "manifest.json", self.pending.to_json().encode())
            self.pending = None

    def _path(self, input_id: int, block_key: str) -> Path:
        return self.root / "results" / f"{input_id:05d}" / f"{block_key}.npz"

    def load(self, input_id: int, block_key: str) -> BlockResult | None:
        """Return the stored result of a block, or ``None`` when it has not finished."""
        path = self._path(input_id, block_key)
        try:
            return decode_result(path.read_bytes())
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - an unreadable result is redone, not fatal
            log.warning("%s is unreadable (%s); its task is computed again", path, err)
            return None

    def save(self, input_id: int, block_key: str, result: BlockResult) -> None:
        """Store a finished block's result atomically."""
        path = self._path(input_id, block_key)
        try:
            path.parent.mkdir(exist_ok=True)
            write_bytes_atomic(path, encode_result(result))
        except OSError as err:
            raise RunDirError(f"cannot write {path} ({err.strerror or err}); free some space or choose another --run-dir") from None

    def write_json(self, name: str, data: object) -> Path:
        """Write a small JSON file (the last run's summary) into the run folder atomically."""
        path = self.root / name
        write_bytes_atomic(path, json.dumps(data, indent=2).encode())
        return path

    def write_failures(self, failures: Iterable[Failure]) -> Path:
        """Write the failure ledger of this run (``failures.jsonl``, empty when nothing failed)."""
        path = self.root / "failures.jsonl"
        write_bytes_atomic(path, "".join(json.dumps(asdict(f)) + "\n" for f in failures).encode())
        return path


def open_run_dir(run_dir: Path, inputs: Sequence[Path], config: Config, fresh: bool = False, accept_repaired: bool = False) -> RunStore:
    """Open (or start) a run folder for this job, before any cluster is started.

    The config is hashed as given, before the model's hints fill it in: the hints are a function of the
    model, which is hashed on its own, so a refusal costs no cluster start-up.

    Raises:
        ConfigError: The folder holds results of another config, model or set of inputs (and not ``fresh``).
    """
    manifest = Manifest(
        describe_inputs(inputs), config_hash(config), config.detector.factory, model_hash(config.detector.factory, config.detector.options)
    )
    return RunStore(run_dir, manifest, fresh, accept_repaired)
