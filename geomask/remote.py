"""Inputs in object storage and on HTTP: GDAL virtual paths, S3 settings from the standard environment, listing.

Pixels are never fetched here: rasterio/GDAL read remote rasters through their virtual file systems
(``/vsis3/``, ``/vsicurl/``) with range requests, so a window costs the blocks it covers. This module
only

- turns what a user types (``s3://bucket/key.tif``, ``https://host/cog.tif``, any ``/vsi*`` path) into
  the GDAL path every reader opens (:func:`gdal_path`) and back into a URL for messages (:func:`url_of`);
- maps the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...) onto GDAL's own config
  options, which spell the endpoint differently (``AWS_S3_ENDPOINT`` is a host without a scheme,
  ``AWS_HTTPS=NO`` says plain HTTP, ``AWS_VIRTUAL_HOSTING=FALSE`` path-style addressing), and sets
  retry defaults (:func:`gdal_options`, :func:`configure_gdal`);
- lists S3 prefixes for globs and reads ``.txt`` lists and object identities (ETag, size) through
  s3fs, whose botocore reads the same credential chain as GDAL (variables, ``~/.aws/config`` and
  ``credentials``, profiles, instance roles) (:func:`glob_s3`, :func:`read_text`, :func:`identity`);
- turns a failed open into one line that says whether the endpoint is unreachable, the credentials are
  refused or the object is missing (:func:`explain_open_error`).

Credentials are read from the environment by GDAL and botocore themselves; nothing here prints them or
returns them except :func:`forwarded_environ`, which hands them to Dask workers in memory.

torch- and dask-free.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import rasterio.session

from geomask.errors import ExportError, RasterReadError, first_line, quiet_logger

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
HTTP_SCHEMES = ("http://", "https://")
# Files of at least twice this size are uploaded in parts (an S3 multipart upload): the object appears
# only when the last part is in and the upload is completed; a failed upload is aborted and leaves none.
UPLOAD_PART_BYTES = 50 * 2**20
#: GDAL options set when the user has not: transient errors (HTTP 429/5xx) are retried with a growing
#: delay; opening a file does not list its folder (a bucket prefix can hold millions of keys); a
#: connection that does not open within 10 s is an error, not a five-minute hang.
GDAL_DEFAULTS = {
    "GDAL_HTTP_MAX_RETRY": "5",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
}
#: Variables handed to Dask workers: credentials, endpoint and region, GDAL's network options.
FORWARDED_PREFIXES = ("AWS_", "GDAL_HTTP_", "CPL_VSIL_CURL_", "CPL_AWS_")
FORWARDED_NAMES = ("GDAL_DISABLE_READDIR_ON_OPEN",)
_FALSE = ("NO", "FALSE", "OFF", "0")
# pathlib folds the "//" of "https://" inside "/vsicurl/https://host/x": put it back.
_FOLDED_URL = re.compile(r"^(/vsicurl(?:_streaming)?/)(https?):/(?!/)")
_CREDENTIALS_REFUSED = (
    "signature",
    "access key",
    "accesskeyid",
    "access denied",
    "accessdenied",
    "forbidden",
    "invalidtoken",
    "expiredtoken",
    "security token",
    "response code: 403",
    "response code: 401",
    "unable to locate credentials",  # botocore's NoCredentialsError
)
_MISSING = ("does not exist", "nosuchkey", "nosuchbucket", "not found", "response code: 404")
_derived: dict[str, str] = {}  # what configure_gdal put into os.environ, so that the next call can take it back

# rasterio builds a boto3 session for every ``rasterio.Env`` — and features.shapes makes two per traced
# mask — whenever AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set and boto3 is installed: 47 ms per
# mask instead of 0.75 ms (DESIGN.md, "Remote inputs"). The session only copies those same variables
# into GDAL's config, which reads them itself, and geomask opens /vsis3/ paths, for which rasterio
# never asks boto3 otherwise; so rasterio is told there is no boto3, in every process that reads rasters.
rasterio.session.boto3 = None  # type: ignore[attr-defined]


def is_remote(spec: str | os.PathLike[str]) -> bool:
    """Return whether ``spec`` is read through a GDAL virtual file system (a URL or a ``/vsi*`` path), not from local disk."""
    text = str(spec)
    return text.startswith((S3_SCHEME, *HTTP_SCHEMES)) or text.startswith("/vsi")


def gdal_path(spec: str | os.PathLike[str]) -> str:
    """Return the path GDAL opens: ``s3://b/k`` → ``/vsis3/b/k``, ``https://h/x`` → ``/vsicurl/https://h/x``; others unchanged."""
    text = str(spec)
    if text.startswith(S3_SCHEME):
        return "/vsis3/" + text[len(S3_SCHEME) :]
    if text.startswith(HTTP_SCHEMES):
        return "/vsicurl/" + text
    return _FOLDED_URL.sub(r"\1\2://", text)


def url_of(spec: str | os.PathLike[str]) -> str:
    """Return the URL a user would type for a GDAL path (``/vsis3/b/k`` → ``s3://b/k``); a path without one unchanged."""
    text = gdal_path(spec)
    if text.startswith("/vsis3/"):
        return S3_SCHEME + text[len("/vsis3/") :]
    for prefix in ("/vsicurl/", "/vsicurl_streaming/"):
        if text.startswith(prefix) and text[len(prefix) :].startswith(HTTP_SCHEMES):
            return text[len(prefix) :]
    return text


def join(base: str, entry: str) -> str:
    """Resolve ``entry`` of a list file at ``base`` (a URL or GDAL path): remote entries stand, relative ones sit beside the list."""
    if is_remote(entry):
        return entry
    scheme, sep, rest = url_of(base).rpartition("://")
    return scheme + sep + posixpath.normpath(posixpath.join(posixpath.dirname(rest), entry))


def s3_endpoint_url(environ: Mapping[str, str]) -> str | None:
    """Return the S3 endpoint as ``scheme://host[:port]`` from the environment, or ``None`` for AWS itself.

    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (the AWS SDKs' names) win; GDAL's ``AWS_S3_ENDPOINT``
    (a host, with ``AWS_HTTPS=NO`` for plain HTTP) is understood too.
    """
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if url:
        return url.rstrip("/")
    host = environ.get("AWS_S3_ENDPOINT")
    if not host:
        return None
    if "://" in host:
        return host.rstrip("/")
    scheme = "http" if environ.get("AWS_HTTPS", "YES").upper() in _FALSE else "https"
    return f"{scheme}://{host.rstrip('/')}"


def gdal_options(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the GDAL config options the environment implies and does not set itself (pure).

    An endpoint from ``AWS_ENDPOINT_URL`` becomes ``AWS_S3_ENDPOINT`` (host and port), ``AWS_HTTPS=NO``
    when it is ``http://``, and ``AWS_VIRTUAL_HOSTING=FALSE``: S3-compatible servers (MinIO, Ceph, moto)
    address buckets by path. ``AWS_SHARED_CREDENTIALS_FILE`` becomes ``CPL_AWS_CREDENTIALS_FILE`` (GDAL
    reads ``AWS_CONFIG_FILE`` and ``AWS_PROFILE`` under their own names). A variable the user set is
    never replaced.
    """
    out = {k: v for k, v in GDAL_DEFAULTS.items() if k not in environ}
    if "AWS_SHARED_CREDENTIALS_FILE" in environ and "CPL_AWS_CREDENTIALS_FILE" not in environ:
        out["CPL_AWS_CREDENTIALS_FILE"] = environ["AWS_SHARED_CREDENTIALS_FILE"]  # GDAL's name for the SDKs' variable
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if url and "AWS_S3_ENDPOINT" not in environ:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        out["AWS_S3_ENDPOINT"] = (parts.netloc + parts.path).rstrip("/")
        if parts.scheme == "http" and "AWS_HTTPS" not in environ:
            out["AWS_HTTPS"] = "NO"
        if "AWS_VIRTUAL_HOSTING" not in environ:
            out["AWS_VIRTUAL_HOSTING"] = "FALSE"
    return out


def configure_gdal(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put :func:`gdal_options` into the process environment, where both rasterio's and pyogrio's GDAL read them.

    Environment variables rather than ``rasterio.Env``: the options must hold in every thread (Dask
    tasks, the reader thread), for both GDAL builds, and in the worker processes a local cluster
    spawns. Called again (another command in the same process, a changed endpoint), it first removes
    what it set before. Returns the options set, for logging their names.
    """
    env = os.environ if environ is None else environ
    forget_gdal_options(env)
    options = gdal_options(env)
    env.update(options)
    _derived.update(options)
    return options


def forget_gdal_options(environ: MutableMapping[str, str] | None = None) -> None:
    """Remove from the environment what :func:`configure_gdal` put there (a value changed since is the user's, and stays)."""
    env = os.environ if environ is None else environ
    for key, value in _derived.items():
        if env.get(key) == value:
            del env[key]
    _derived.clear()


@contextmanager
def quiet_gdal() -> Iterator[None]:
    """Keep GDAL's warnings about a failed request (``HTTP response code ...: 403``) off the log while a remote file is opened.

    The error that follows says the same in the one line the user gets (:func:`explain_open_error`).
    """
    with quiet_logger("rasterio._env", logging.ERROR):
        yield


def forwarded_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the variables a Dask worker needs to read what this client reads (credentials included: keep it in memory)."""
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}


try:  # botocore comes with s3fs; its own errors (no credentials, endpoint unreachable) are not OSErrors
    from botocore.exceptions import BotoCoreError

    _S3_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, BotoCoreError)
except ImportError:  # pragma: no cover - without s3fs nothing below reaches botocore
    _S3_ERRORS = (OSError, ValueError)


def _s3fs(environ: Mapping[str, str]) -> Any:
    try:
        import s3fs
    except ImportError:
        raise RasterReadError("listing or describing s3:// objects needs s3fs; pip install 'geomask[remote]'") from None
    client: dict[str, Any] = {}
    if environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"):
        client["region_name"] = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    anonymous = environ.get("AWS_NO_SIGN_REQUEST", "NO").upper() not in _FALSE
    # No instance or listing cache: a glob or an identity must describe the bucket as it is now.
    return s3fs.S3FileSystem(
        anon=anonymous, endpoint_url=s3_endpoint_url(environ), client_kwargs=client, skip_instance_cache=True, use_listings_cache=False
    )


def _s3_key(spec: str) -> str:
    url = url_of(spec)
    if not url.startswith(S3_SCHEME):
        raise RasterReadError(f"{url}: only s3:// (or /vsis3/) objects can be listed; give the objects, or a .txt list of them")
    return url[len(S3_SCHEME) :]


def glob_s3(pattern: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Return the ``s3://`` URLs of the objects matching a glob over a bucket (sorted; ``**`` recurses)."""
    env = os.environ if environ is None else environ
    fs = _s3fs(env)
    try:
        found = fs.glob(_s3_key(pattern), detail=True)
    except _S3_ERRORS as err:
        raise RasterReadError(explain_open_error(gdal_path(pattern), first_line(err, with_type=True), env)) from None
    return sorted(S3_SCHEME + key for key, meta in found.items() if meta.get("type") == "file")


def read_text(spec: str, environ: Mapping[str, str] | None = None) -> str:
    """Return the text of a small remote file (a ``.txt`` list of inputs)."""
    env = os.environ if environ is None else environ
    url = url_of(spec)
    try:
        if url.startswith(S3_SCHEME):
            return str(_s3fs(env).cat_file(_s3_key(url)).decode())
        with urllib.request.urlopen(url, timeout=30) as response:
            return str(response.read().decode())
    except _S3_ERRORS as err:
        raise RasterReadError(explain_open_error(gdal_path(spec), first_line(err, with_type=True), env)) from None


def s3_exists(url: str, environ: Mapping[str, str] | None = None) -> bool:
    """Return whether an ``s3://`` object exists; an unreachable endpoint or a refused credential is one line."""
    env = os.environ if environ is None else environ
    try:
        return bool(_s3fs(env).exists(_s3_key(url)))
    except _S3_ERRORS as err:
        raise ExportError(explain_write_error(url, first_line(err, with_type=True), env)) from None


def check_s3_bucket(url: str, environ: Mapping[str, str] | None = None) -> None:
    """Fail in one line, before any work, when the bucket of ``url`` cannot be reached, does not exist, or refuses us."""
    env = os.environ if environ is None else environ
    bucket = _s3_key(url).split("/", 1)[0]
    try:  # one key at most: a probe, not a listing of the bucket
        _s3fs(env).call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1)
    except _S3_ERRORS as err:
        raise ExportError(f"-o {url}: {explain_write_error(S3_SCHEME + bucket, first_line(err, with_type=True), env)}") from None


def upload_file(local: str | os.PathLike[str], url: str, environ: Mapping[str, str] | None = None) -> None:
    """Upload one finished file to ``s3://`` whole: one PUT, or a multipart upload completed only at the end.

    Either way S3 shows readers the old object, or none, until the new one is complete; a failed
    multipart upload is aborted (s3fs), so no part of it stays behind or becomes visible.
    """
    env = os.environ if environ is None else environ
    try:
        _s3fs(env).put_file(os.fspath(local), _s3_key(url), chunksize=UPLOAD_PART_BYTES)
    except _S3_ERRORS as err:
        raise ExportError(f"uploading {url} failed: {explain_write_error(url, first_line(err, with_type=True), env)}") from None


def identity(spec: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return what identifies a remote object's content for the run folder: ``{"size", "etag"}`` (no mtime: a copy keeps neither).

    S3 objects are described by s3fs (HEAD), HTTP ones by a HEAD request. Other ``/vsi*`` paths have no
    cheap identity; they get ``None`` values, and a change to them goes unnoticed by ``--run-dir``.
    """
    env = os.environ if environ is None else environ
    url = url_of(spec)
    try:
        if url.startswith(S3_SCHEME):
            info = _s3fs(env).info(_s3_key(url))
            return {"size": int(info["size"]), "etag": str(info.get("ETag") or info.get("etag") or "").strip('"') or None}
        if url.startswith(HTTP_SCHEMES):
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as response:
                size = response.headers.get("Content-Length")
                return {
                    "size": int(size) if size is not None else None,
                    "etag": response.headers.get("ETag") or response.headers.get("Last-Modified"),
                }
    except _S3_ERRORS as err:
        raise RasterReadError(explain_open_error(gdal_path(spec), first_line(err, with_type=True), env)) from None
    log.warning("%s: no ETag or size to identify it by; --run-dir will not notice if it changes", url)
    return {"size": None, "etag": None}


def _endpoint(path: str, environ: Mapping[str, str]) -> tuple[str, int] | None:
    """Return the host and port a GDAL path is fetched from, when it is known."""
    url = url_of(path)
    if url.startswith(S3_SCHEME):
        endpoint = s3_endpoint_url(environ)
        if endpoint is None:
            return ("s3.amazonaws.com", 443)
        parts = urlsplit(endpoint)
    elif url.startswith(HTTP_SCHEMES):
        parts = urlsplit(url)
    else:
        return None
    if parts.hostname is None:
        return None
    return parts.hostname, parts.port or (80 if parts.scheme == "http" else 443)


def _unreachable(host: str, port: int, timeout_s: float = 5.0) -> str | None:
    """Return why a TCP connection to ``host:port`` fails, or ``None`` when it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def explain_open_error(
    path: str, message: str, environ: Mapping[str, str] | None = None, expected: str = "a GeoTIFF (a COG reads fastest)"
) -> str:
    """Turn GDAL's (or botocore's) error for a remote path into one line naming the cause and the fix.

    GDAL says "does not exist" for an endpoint it could not reach once it has retried, so the endpoint
    is probed first (one TCP connection). The message never holds a credential: only the URL, the
    endpoint's host and the server's own error text. ``expected`` names what the file should be.
    """
    known = _known_cause(path, message, os.environ if environ is None else environ, "read")
    url = url_of(path)
    return known or f"{url} cannot be read ({message}); check that it is {expected} and that the server honours Range requests"


def explain_write_error(url: str, message: str, environ: Mapping[str, str] | None = None) -> str:
    """As :func:`explain_open_error`, for writing ``url``."""
    known = _known_cause(gdal_path(url), message, os.environ if environ is None else environ, "write to")
    return known or f"{url_of(url)}: {message}; check the bucket's permissions and the endpoint"


def _known_cause(path: str, message: str, env: Mapping[str, str], verb: str) -> str | None:
    """One line for an unreachable endpoint, refused credentials or a missing object; ``None`` otherwise."""
    url = url_of(path)
    s3 = url.startswith(S3_SCHEME)
    where = _endpoint(path, env)
    if where is not None and (reason := _unreachable(*where)) is not None:
        fix = "check AWS_ENDPOINT_URL (or AWS_S3_ENDPOINT) and the network" if s3 else "check the URL and the network"
        return f"cannot reach {where[0]}:{where[1]} to {verb} {url} ({reason}); {fix}"
    low = message.lower()
    if any(word in low for word in _CREDENTIALS_REFUSED):
        fix = (
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or AWS_PROFILE"
            if s3
            else "the server refused the request; give a URL it serves publicly, or a signed one"
        )
        return f"{url}: access denied ({message}); {fix}"
    if any(word in low for word in _MISSING):
        fix = "check the bucket and key (`aws s3 ls` the prefix)" if s3 else "check the URL"
        return f"{url} does not exist ({message}); {fix}"
    return None
