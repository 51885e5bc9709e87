"""Outputs in object storage: every file is written to a local staging folder, then uploaded whole.

``-o s3://bucket/key.gpkg`` (one file) or ``-o s3://bucket/prefix/`` (a folder: one file per input).
The job runs exactly as for a local output, into a staging folder (``RUN_DIR/upload``, else under ``$TMPDIR``); only when
it has finished are the output and its sidecars (``.config.yaml``, ``.report.html``, the preview)
uploaded, each with one PUT or a multipart upload completed at the end
(:func:`geomask.remote.upload_file`). A reader of the bucket sees the old object or the new one, never
a part; a run that fails or is interrupted uploads nothing, so an existing object stays as it was.
"""

from __future__ import annotations

import logging
import posixpath
import shutil
import tempfile
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from geomask import remote
from geomask.errors import ExportError

log = logging.getLogger(__name__)


@dataclass
class RemoteOutput:
    """Where a run's outputs go in object storage, and the local folder they are written to first."""

    url: str  # s3://bucket/key.ext, or s3://bucket/prefix/ for a folder
    staging: Path
    outputs: list[Path] = field(default_factory=list)  # the staged outputs the job writes (set by check)

    @property
    def is_folder(self) -> bool:
        return self.url.endswith("/")

    @property
    def local(self) -> str:
        """The ``-o`` value the job writes to: the staging folder, or the file of the same name in it."""
        return f"{self.staging}/" if self.is_folder else str(self.staging / posixpath.basename(self.url))

    def url_of(self, local: Path) -> str:
        """Return the object a staged file is uploaded to (beside the output, under the same name)."""
        folder = self.url if self.is_folder else self.url.rsplit("/", 1)[0] + "/"
        return folder + local.name

    def check(self, outputs: Iterable[Path], overwrite: bool, owned: Collection[Path] = ()) -> None:
        """Fail in one line, before any work, if an output's object exists and ``overwrite`` was not given.

        ``owned`` are the staged outputs the resumed run folder recorded: their objects are this run's own
        upload (after failed tiles, exit 3), replaced by re-running the command as a local output is.
        """
        self.outputs = list(outputs)
        mine = {p.resolve() for p in owned}
        for out in self.outputs:
            url = self.url_of(out)
            if not overwrite and out.resolve() not in mine and remote.s3_exists(url):
                raise ExportError(
                    f"{url} already exists; add --overwrite to replace it (the object is replaced whole: "
                    "a GeoPackage's other layers are not kept), or choose another -o"
                )

    def upload(self) -> list[str]:
        """Upload every file the run wrote into the staging folder, the outputs last; return their URLs.

        Sidecars first: a reader who sees the new output finds its config and report beside it.
        """
        done = []
        last = {p.name for p in self.outputs}
        for local in sorted((p for p in self.staging.iterdir() if p.is_file()), key=lambda p: (p.name in last, p.name)):
            url = self.url_of(local)
            remote.upload_file(local, url)
            done.append(url)
        log.info("uploaded %d file(s) to %s", len(done), self.url)
        return done

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def stage(output: str, run_dir: str | None = None) -> RemoteOutput:
    """Check that ``output`` (an ``s3://`` URL or ``/vsis3/`` path) can be written, and make its staging folder.

    The staging folder is ``RUN_DIR/upload`` with ``--run-dir`` (emptied first: only this run's files are
    uploaded; the same path each run, so a resumed run recognises its own outputs), else a new folder
    under ``$TMPDIR``.

    Raises:
        ExportError: Not an S3 output (HTTP and other ``/vsi*`` paths are read-only), or the bucket
            cannot be reached, does not exist, or refuses the credentials.
    """
    url = remote.url_of(output)
    if not url.startswith(remote.S3_SCHEME):
        raise ExportError(
            f"-o {output}: only s3:// outputs can be uploaded (HTTP and other /vsi* paths are read-only); "
            "write to a local path or to s3://bucket/key"
        )
    if url.rstrip("/").count("/") < 3 and not url.endswith("/"):  # s3://bucket alone
        url += "/"
    remote.check_s3_bucket(url)
    if run_dir is None:
        return RemoteOutput(url, Path(tempfile.mkdtemp(prefix="geomask-upload-")))
    staging = Path(run_dir) / "upload"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return RemoteOutput(url, staging)
