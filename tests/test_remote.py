"""Remote inputs against real servers: an S3-compatible server (moto, in this process) and a range-capable HTTP server.

The S3 server enforces credentials (an IAM user made in it), so a wrong secret is refused as on AWS.
Error cases run ``geomask`` in a subprocess: GDAL caches what it read per process, and a user sees
the command's own stderr and exit code.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import moto.server as moto_server
import numpy as np
import pytest
import rasterio.shutil
import shapely
from affine import Affine

from geomask import remote
from geomask.errors import GeomaskError
from geomask.testing import make_scene, write_scene
from tests.test_dask_support import polygons, write_config
from workflows.cli import main

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]
TRANSFORM = Affine(0.3, 0, 500_000, 0, -0.3, 5_200_000)
BUCKET = "geomask-test"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    key_id: str
    secret: str

    def client(self, secret: str | None = None) -> object:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.key_id, aws_secret_access_key=secret or self.secret
        )

    def environ(self, **more: str) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, **more}


# -- servers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1000 px scene (5 x 5 tiles) written as a Cloud-Optimized GeoTIFF (256 px blocks), and its label raster (read locally)."""
    d = tmp_path_factory.mktemp("scene")
    labels = make_scene(1000, 1000, 60, seed=11, max_size_px=400)
    image, label_path = write_scene(d, labels, TRANSFORM, "EPSG:32633")
    cog = d / "scene_cog.tif"
    rasterio.shutil.copy(image, cog, driver="COG", BLOCKSIZE=256, OVERVIEWS="NONE")
    return cog, label_path


@pytest.fixture(scope="module")
def big_scene(scene: tuple[Path, Path]) -> tuple[Path, Path]:
    """A 4096 px uncompressed COG (every block the same size: fast to write) beside the small one, so the same server serves it."""
    labels = make_scene(4096, 4096, 80, seed=12, max_size_px=300)
    profile = {"driver": "GTiff", "width": 4096, "height": 4096, "crs": "EPSG:32633", "transform": TRANSFORM, "tiled": True}
    profile.update(blockxsize=256, blockysize=256)
    pixels = np.random.default_rng(1).integers(40, 90, size=(3, 4096, 4096), dtype=np.uint8)
    pixels[:, labels > 0] = 220
    folder = scene[0].parent
    with rasterio.open(folder / "big.tif", "w", count=3, dtype="uint8", **profile) as dst:
        dst.write(pixels)
    with rasterio.open(folder / "big_labels.tif", "w", count=1, dtype="int32", compress="deflate", **profile) as dst:
        dst.write(labels.astype(np.int32), 1)
    rasterio.shutil.copy(folder / "big.tif", folder / "big_cog.tif", driver="COG", BLOCKSIZE=256, OVERVIEWS="NONE", COMPRESS="NONE")
    return folder / "big_cog.tif", folder / "big_labels.tif"


@pytest.fixture(scope="module")
def s3(scene: tuple[Path, Path]) -> Iterator[S3]:
    """A moto S3 server on 127.0.0.1 that checks signatures, with the scene uploaded under several keys."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="geomask")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.put_user_policy(UserName="geomask", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="geomask")["AccessKey"]
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request's signature is checked (moto's /moto-api/reset-auth, in process)
    ActionAuthenticatorMixin.request_count = 0
    info = S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    client = info.client()
    client.create_bucket(Bucket=BUCKET)
    image, _ = scene
    for name in ("a/scene.tif", "a/copy.tif", "b/scene.tif", "dask/one.tif", "dask/two.tif", "transient.tif", "denied.tif"):
        client.upload_file(str(image), BUCKET, name)
    client.put_object(
        Bucket=BUCKET,
        Key="lists/two.txt",
        Body=b"# two inputs: one relative, one absolute\n../a/scene.tif\ns3://geomask-test/b/scene.tif\n",
    )
    yield info
    server.stop()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = before


@pytest.fixture()
def s3_env(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    """This process's environment pointed at the test server (and at no user's ~/.aws)."""
    _isolate(monkeypatch, tmp_path)
    for key, value in s3.environ(AWS_REGION=REGION).items():
        monkeypatch.setenv(key, value)
    remote.configure_gdal()  # as the CLI does on start, for the tests that call the library directly
    return s3


@pytest.fixture(autouse=True, scope="module")
def _no_gdal_options_left() -> Iterator[None]:
    """Leave no endpoint of these servers in the environment for the tests after this module."""
    yield
    remote.forget_gdal_options()


@pytest.fixture()
def s3_profile(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    """Credentials in a shared credentials file under a named profile (``AWS_PROFILE``), the endpoint in the environment."""
    _isolate(monkeypatch, tmp_path)
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[survey]\naws_access_key_id = {s3.key_id}\naws_secret_access_key = {s3.secret}\n")
    for key, value in {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_REGION": REGION, "AWS_PROFILE": "survey"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    remote.configure_gdal()
    return s3


def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    remote.forget_gdal_options()  # before monkeypatch records the environment, so that it restores no stale endpoint
    for key in [k for k in os.environ if k.startswith(("AWS_", "GDAL_HTTP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.2")


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files of ``root`` honouring single ``Range: bytes=a-b`` requests (what GDAL's /vsicurl/ sends), counting bytes sent."""

    root = Path()
    served = 0
    lock = threading.Lock()
    protocol_version = "HTTP/1.1"

    def do_HEAD(self) -> None:
        self._send(body=False)

    def do_GET(self) -> None:
        self._send(body=True)

    def _send(self, body: bool) -> None:
        path = self.root / self.path.split("?")[0].lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = path.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        start, end = (int(match[1]), min(int(match[2] or size - 1), size - 1)) if match else (0, size - 1)
        self.send_response(206 if match else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{size}-{path.stat().st_mtime_ns}"')
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read(end - start + 1)
            self.wfile.write(data)
            with self.lock:
                type(self).served += len(data)

    def log_message(self, *args: object) -> None:
        pass


class FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to ``upstream`` unchanged (headers too, so S3 signatures stay valid), after answering 503 to the first ``fail`` requests."""

    upstream = ("127.0.0.1", 0)
    fail = 0
    failed = 0
    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if type(self).fail > 0:
            type(self).fail -= 1
            type(self).failed += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        conn.request(self.command, self.path, body, dict(self.headers))
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = _forward

    def log_message(self, *args: object) -> None:
        pass


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@dataclass(frozen=True)
class HTTP:
    root: str  # http://127.0.0.1:PORT/
    handler: type[RangeHandler]  # its ``served`` counts the bytes sent


@pytest.fixture(scope="module")
def web(scene: tuple[Path, Path]) -> Iterator[HTTP]:
    """A range-capable HTTP server on 127.0.0.1 serving the scene's folder."""
    handler = type("Handler", (RangeHandler,), {"root": scene[0].parent, "served": 0})
    for server in _serve(handler):
        yield HTTP(f"http://127.0.0.1:{server.server_address[1]}/", handler)


# -- helpers -----------------------------------------------------------------------------------------


def _predict(*args: str | Path) -> None:
    """Run ``geomask predict`` in this process (as the console script does); a non-zero exit fails the test."""
    try:
        main(["predict", *map(str, args), "--no-preview"])
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"geomask predict exited {exit_.code}"


def _geomask(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {**env, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GDAL_HTTP_"))}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_REGION=REGION)
    return env


@pytest.fixture(scope="module")
def reference(scene: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[object, ...]]]:
    """The config and the polygons of the local file, serial: what every remote run must equal."""
    d = tmp_path_factory.mktemp("reference")
    image, labels = scene
    config = write_config(d / "truth.yaml", labels)
    out = d / "local.gpkg"
    main_args = ["predict", str(image), "-o", str(out), "-c", str(config), "--serial", "--no-preview"]
    try:
        main(main_args)
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    found = polygons(out)
    assert len(found) > 30
    return config, found


# -- pure parts --------------------------------------------------------------------------------------


def test_paths_map_to_gdal_and_back() -> None:
    assert remote.gdal_path("s3://b/k/x.tif") == "/vsis3/b/k/x.tif"
    assert remote.gdal_path("https://h:8/c/x.tif") == "/vsicurl/https://h:8/c/x.tif"
    assert remote.gdal_path(Path("/vsicurl/https://h:8/c/x.tif")) == "/vsicurl/https://h:8/c/x.tif"  # pathlib folds the //
    assert remote.url_of(Path("/vsis3/b/k/x.tif")) == "s3://b/k/x.tif"
    assert remote.url_of("/vsicurl/http:/h/x.tif") == "http://h/x.tif"
    assert remote.gdal_path("/vsizip//data/a.zip/x.tif") == "/vsizip//data/a.zip/x.tif"
    assert remote.join("/vsis3/b/lists/l.txt", "../a/x.tif") == "s3://b/a/x.tif"
    assert (
        remote.join("https://h/c/l.txt", "x.tif") == "https://h/c/x.tif"
        and remote.join("https://h/l.txt", "s3://b/y.tif") == "s3://b/y.tif"
    )
    assert not remote.is_remote("/data/x.tif") and remote.is_remote("/vsiaz/c/x.tif")


def test_aws_variables_become_gdal_options_without_replacing_the_users() -> None:
    opts = remote.gdal_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert opts["AWS_S3_ENDPOINT"] == "127.0.0.1:9000" and opts["AWS_HTTPS"] == "NO" and opts["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert "AWS_HTTPS" not in remote.gdal_options({"AWS_ENDPOINT_URL": "https://minio.example:9000"})
    mine = remote.gdal_options({"AWS_ENDPOINT_URL": "http://a:1", "AWS_S3_ENDPOINT": "b:2", "GDAL_HTTP_MAX_RETRY": "9"})
    assert "AWS_S3_ENDPOINT" not in mine and "GDAL_HTTP_MAX_RETRY" not in mine
    assert remote.gdal_options({})["GDAL_HTTP_MAX_RETRY"] == remote.GDAL_DEFAULTS["GDAL_HTTP_MAX_RETRY"]
    assert remote.s3_endpoint_url({"AWS_S3_ENDPOINT": "h:9", "AWS_HTTPS": "NO"}) == "http://h:9"
    assert remote.gdal_options({"AWS_SHARED_CREDENTIALS_FILE": "/c"})["CPL_AWS_CREDENTIALS_FILE"] == "/c"
    assert set(remote.forwarded_environ({"AWS_SECRET_ACCESS_KEY": "s", "HOME": "/root", "GDAL_HTTP_MAX_RETRY": "2"})) == {
        "AWS_SECRET_ACCESS_KEY",
        "GDAL_HTTP_MAX_RETRY",
    }


def test_configure_gdal_takes_back_what_it_set_when_the_endpoint_changes() -> None:
    env = {"AWS_ENDPOINT_URL": "http://a:1"}
    remote.configure_gdal(env)
    assert env["AWS_S3_ENDPOINT"] == "a:1"
    env["AWS_ENDPOINT_URL"] = "https://b:2"
    remote.configure_gdal(env)
    assert env["AWS_S3_ENDPOINT"] == "b:2" and "AWS_HTTPS" not in env
    del env["AWS_ENDPOINT_URL"]
    remote.configure_gdal(env)
    assert "AWS_S3_ENDPOINT" not in env and "AWS_VIRTUAL_HOSTING" not in env


# -- S3 ----------------------------------------------------------------------------------------------


def test_predict_on_s3_equals_the_local_file(s3_env: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path) -> None:
    config, expected = reference
    out = tmp_path / "s3.gpkg"
    _predict(f"s3://{BUCKET}/a/scene.tif", "-o", out, "-c", config, "--serial")
    assert polygons(out) == expected
    report = (tmp_path / "s3.gpkg.report.html").read_text() + (tmp_path / "s3.gpkg.config.yaml").read_text()
    assert s3_env.secret not in report and s3_env.key_id not in report


def test_s3_globs_and_a_list_on_s3_expand_to_objects(s3_profile: S3) -> None:
    from workflows.inputs import expand_inputs

    assert [str(p) for p in expand_inputs([f"s3://{BUCKET}/a/*.tif"])] == [f"/vsis3/{BUCKET}/a/copy.tif", f"/vsis3/{BUCKET}/a/scene.tif"]
    listed = expand_inputs([f"s3://{BUCKET}/lists/two.txt", f"s3://{BUCKET}/**/scene.tif"])  # the list's relative line sits beside it
    assert [str(p) for p in listed] == [f"/vsis3/{BUCKET}/a/scene.tif", f"/vsis3/{BUCKET}/b/scene.tif"]
    with pytest.raises(GeomaskError, match="no object matches"):
        expand_inputs([f"s3://{BUCKET}/nowhere/*.tif"])


def test_a_transient_error_is_retried_not_fatal(
    s3_profile: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, expected = reference
    host, port = s3_profile.endpoint.removeprefix("http://").split(":")
    handler = type("Proxy", (FlakyProxy,), {"upstream": (host, int(port)), "fail": 3, "failed": 0})
    for proxy in _serve(handler):
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        out = tmp_path / "flaky.gpkg"
        _predict(f"s3://{BUCKET}/transient.tif", "-o", out, "-c", config, "--serial")
        assert handler.failed == 3  # the server said 503 three times; GDAL waited and asked again
        assert polygons(out) == expected


@pytest.mark.parametrize("case", ["missing key", "wrong secret", "unreachable endpoint"])
def test_remote_errors_are_one_line_and_exit_2(case: str, s3: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path) -> None:
    config, _ = reference
    env = {**_clean_env(tmp_path), **s3.environ(GDAL_HTTP_MAX_RETRY="1", GDAL_HTTP_RETRY_DELAY="0.1")}
    key = "denied.tif"
    if case == "missing key":
        key = "a/nothing-here.tif"
    elif case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    out = tmp_path / "out.gpkg"
    result = _geomask(["predict", f"s3://{BUCKET}/{key}", "-o", str(out), "-c", str(config), "--serial"], env, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    expected = {"missing key": "does not exist", "wrong secret": "access denied", "unreachable endpoint": "cannot reach 127.0.0.1:9"}[case]
    assert expected in lines[0] and f"s3://{BUCKET}/{key}" in lines[0]
    assert s3.secret not in result.stderr + result.stdout and "not-the-secret" not in result.stderr
    assert not out.exists()


@pytest.mark.timeout(480)  # a cluster start and three jobs: 90 s alone, over 200 s on a loaded 2-core machine
def test_a_dask_cluster_reads_s3_with_the_clients_credentials_and_the_run_folder_keeps_etags(
    s3: S3, scene: tuple[Path, Path], reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers started before the credentials exist (as on a real cluster) get them from the client, in memory only.

    A glob over a prefix into a folder; the manifest holds size and ETag; the same command resumes;
    an object uploaded again with other bytes is a changed input, refused in one line.
    """
    from distributed import Client, LocalCluster

    config, expected = reference
    _isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    run_dir, out = tmp_path / "run", tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, Client(cluster) as probe:
        assert not any(probe.run(lambda: "AWS_SECRET_ACCESS_KEY" in os.environ).values())
        for key, value in s3.environ(AWS_REGION=REGION).items():
            monkeypatch.setenv(key, value)
        command = [
            f"s3://{BUCKET}/dask/*.tif",
            "-o",
            f"{out}/",
            "-c",
            config,
            "--scheduler",
            cluster.scheduler_address,
            "--run-dir",
            run_dir,
        ]
        _predict(*command)
        assert polygons(out / "one.gpkg") == expected and polygons(out / "two.gpkg") == expected
        assert not any(probe.run(lambda: "AWS_SECRET_ACCESS_KEY" in os.environ).values())  # taken back when the job ended
        assert not any(probe.run(lambda dask_worker: "geomask-remote-access" in dask_worker.plugins).values())

        manifest = json.loads((run_dir / "manifest.json").read_text())
        etags = [s3.client().head_object(Bucket=BUCKET, Key=f"dask/{n}.tif")["ETag"].strip('"') for n in ("one", "two")]
        size = scene[0].stat().st_size
        assert manifest["inputs"] == [
            {"path": f"/vsis3/{BUCKET}/dask/{n}.tif", "size": size, "etag": e} for n, e in zip(("one", "two"), etags, strict=True)
        ]
        _predict(*command)  # unchanged objects: resumed from the run folder
        assert json.loads((run_dir / "summary.json").read_text())["tasks_computed"] == 0

        # An S3 output from the cluster run, staged in the run folder: the same command again (a resume) may
        # replace the object it uploaded itself; another command into it may not.
        up_dir = tmp_path / "run-up"
        up = [f"s3://{BUCKET}/dask/one.tif", "-o", f"s3://{BUCKET}/dask-out/one.gpkg", "-c", config]
        up += ["--scheduler", cluster.scheduler_address, "--run-dir", up_dir]
        _predict(*up)
        _predict(*up)
        s3.client().download_file(BUCKET, "dask-out/one.gpkg", str(tmp_path / "one-back.gpkg"))
        assert polygons(tmp_path / "one-back.gpkg") == expected
        assert not (up_dir / "upload").exists()  # the staging folder is gone once uploaded
        with pytest.raises(SystemExit) as exit_:
            main(["predict", *map(str, up[:-1]), str(tmp_path / "other-run"), "--no-preview"])
        assert exit_.value.code == 2

        s3.client().put_object(Bucket=BUCKET, Key="dask/two.tif", Body=scene[0].read_bytes() + b"\0")
        with pytest.raises(SystemExit) as exit_:
            main(["predict", *map(str, command), "--no-preview"])
        assert exit_.value.code == 2
    written = b"".join(p.read_bytes() for p in [*run_dir.rglob("*"), *out.rglob("*")] if p.is_file())
    assert s3.secret.encode() not in written and s3.key_id.encode() not in written


# -- HTTP --------------------------------------------------------------------------------------------


def test_an_http_cog_equals_the_local_file(
    scene: tuple[Path, Path], web: HTTP, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    config, expected = reference
    image, _ = scene
    handler, http_root = web.handler, web.root
    handler.served = 0
    out = tmp_path / "http.gpkg"
    _predict(f"{http_root}{image.name}", "-o", out, "-c", config, "--serial")
    assert polygons(out) == expected
    assert handler.served >= 0.9 * image.stat().st_size  # every tile was read: about the whole file


def test_an_aoi_on_an_http_cog_reads_a_small_fraction_of_it(
    big_scene: tuple[Path, Path], web: HTTP, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    """An AOI of about one tile on a 4096 px COG: the objects of the local run with that AOI, for a few percent of the bytes.

    What is read: the header, the 256 px blocks under the tiles near the AOI, and the normalisation
    sample (here one window of 256 px, in the centre: the default 16 of 512 px would be half of so small
    a raster, and well under 1 % of a real one).
    """
    image, labels = big_scene
    config = write_config(tmp_path / "truth.yaml", labels)
    import yaml

    data = yaml.safe_load(config.read_text())
    data["raster"] = {"normalize": {"sample_windows": 1, "sample_size_px": 256}}
    config.write_text(yaml.safe_dump(data))
    aoi = tmp_path / "aoi.gpkg"
    (x0, y0), (x1, y1) = TRANSFORM * (1950, 1950), TRANSFORM * (2150, 2150)
    import geopandas as gpd

    gpd.GeoDataFrame(geometry=[shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))], crs="EPSG:32633").to_file(aoi)
    local, remote_out = tmp_path / "aoi_local.gpkg", tmp_path / "aoi_http.gpkg"
    _predict(image, "-o", local, "-c", config, "--serial", "--aoi", aoi)
    web.handler.served = 0
    _predict(f"{web.root}{image.name}", "-o", remote_out, "-c", config, "--serial", "--aoi", aoi)
    assert polygons(remote_out) == polygons(local) and len(polygons(local)) > 0
    whole = image.stat().st_size
    print(f"AOI run read {web.handler.served} of {whole} bytes ({web.handler.served / whole:.1%})")
    assert web.handler.served < 0.15 * whole, f"read {web.handler.served} of {whole} bytes"


def test_a_missing_http_file_is_one_line_and_exit_2(web: HTTP, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path) -> None:
    config, _ = reference
    result = _geomask(
        ["predict", f"{web.root}nothing.tif", "-o", str(tmp_path / "o.gpkg"), "-c", str(config), "--serial"], _clean_env(tmp_path), tmp_path
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nothing.tif does not exist" in result.stderr


def test_an_s3_output_is_uploaded_whole_with_its_sidecars(
    s3_env: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    """``-o s3://…``: written locally, then uploaded with its sidecars; an existing object needs --overwrite."""
    config, expected = reference
    client: Any = s3_env.client()
    args = [f"s3://{BUCKET}/a/scene.tif", "-o", f"s3://{BUCKET}/results/site.gpkg", "-c", config, "--serial"]
    _predict(*args)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="results/")["Contents"])
    assert keys == ["results/site.gpkg", "results/site.gpkg.config.yaml", "results/site.gpkg.report.html"]
    client.download_file(BUCKET, "results/site.gpkg", str(tmp_path / "back.gpkg"))
    assert polygons(tmp_path / "back.gpkg") == expected
    sidecars = b"".join(client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys[1:])
    assert s3_env.secret.encode() not in sidecars and s3_env.key_id.encode() not in sidecars
    etag = client.head_object(Bucket=BUCKET, Key="results/site.gpkg")["ETag"]

    with pytest.raises(SystemExit) as exit_:
        main(["predict", *map(str, args), "--no-preview"])
    assert exit_.value.code == 2
    assert client.head_object(Bucket=BUCKET, Key="results/site.gpkg")["ETag"] == etag  # untouched
    _predict(*args, "--overwrite")

    _predict(f"s3://{BUCKET}/a/*.tif", "-o", f"s3://{BUCKET}/per-input/", "-c", config, "--serial")  # a folder: one file per input
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="per-input/")["Contents"]}
    assert {"per-input/copy.gpkg", "per-input/scene.gpkg"} <= listed


@pytest.mark.parametrize(
    ("output", "needle"),
    [
        ("https://example.org/out.gpkg", "only s3:// outputs can be uploaded"),
        ("s3://no-such-bucket/out.gpkg", "s3://no-such-bucket does not exist"),
        ("no credentials", "access denied"),
    ],
)
def test_unwritable_remote_outputs_are_one_line_and_exit_2(
    output: str, needle: str, s3: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    config, _ = reference
    env = {**_clean_env(tmp_path), **s3.environ()}
    if output == "no credentials":  # no keys at all: the bucket check, before any input is read, says so
        output = f"s3://{BUCKET}/out.gpkg"
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    result = _geomask(["predict", f"s3://{BUCKET}/a/scene.tif", "-o", output, "-c", str(config), "--serial"], env, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert needle in lines[0] and "loading the model" not in result.stderr  # refused before any work


class FailingPart(FlakyProxy):
    """Forwards everything but part 2 of a multipart upload, which it refuses (a connection that dies mid-upload)."""

    def _forward(self) -> None:
        if "partNumber=2" in self.path:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super()._forward()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def test_a_multipart_upload_appears_only_when_whole_and_a_failed_one_leaves_the_old_object(
    s3_env: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "UPLOAD_PART_BYTES", 5 * 2**20)  # S3's smallest part: a 12 MiB file goes in parts
    client: Any = s3_env.client()
    big = tmp_path / "big.gpkg"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 12 * 2**20, dtype=np.uint8).tobytes())
    remote.upload_file(big, f"s3://{BUCKET}/mpu/big.gpkg")
    head = client.head_object(Bucket=BUCKET, Key="mpu/big.gpkg")
    assert head["ContentLength"] == big.stat().st_size and head["ETag"].strip('"').endswith("-3")  # 3 parts, completed

    host, port = s3_env.endpoint.removeprefix("http://").split(":")
    handler = type("Proxy", (FailingPart,), {"upstream": (host, int(port)), "fail": 0, "failed": 0})
    for proxy in _serve(handler):
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        new = tmp_path / "new.gpkg"
        new.write_bytes(b"\1" * (12 * 2**20))
        with pytest.raises(GeomaskError, match=r"uploading s3://geomask-test/mpu/big\.gpkg failed"):
            remote.upload_file(new, f"s3://{BUCKET}/mpu/big.gpkg")
    assert client.head_object(Bucket=BUCKET, Key="mpu/big.gpkg")["ETag"] == head["ETag"]  # readers still see the old object
    assert not client.list_multipart_uploads(Bucket=BUCKET).get("Uploads")  # the failed upload was aborted, no parts left


def test_evaluate_tiles_from_s3_plans_the_same_tiles(
    s3_profile: S3, scene: tuple[Path, Path], reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    config, _ = reference
    pred = tmp_path / "pred.gpkg"
    _predict(scene[0], "-o", pred, "-c", config, "--serial")
    reports = []
    for source in (str(scene[0]), f"s3://{BUCKET}/b/scene.tif"):
        out = tmp_path / f"{len(reports)}.json"
        try:
            main(["evaluate", str(pred), str(pred), "--tiles-from", source, "--json", str(out), "--no-ap"])
        except SystemExit as exit_:
            assert exit_.code in (0, None)
        reports.append(json.loads(out.read_text()))
    assert reports[0] == reports[1]
    assert "seam" in json.dumps(reports[0])


def test_training_images_from_s3_are_listed_and_opened(s3_profile: S3, scene: tuple[Path, Path], tmp_path: Path) -> None:
    """What ``geomask train --images 's3://…/*.tif'`` does before its first step: list, inspect, normalise, cut the labels."""
    import geopandas as gpd

    from geomask.detect.training.chips import open_rasters
    from geomask.detect.training.settings import TrainSettings
    from geomask.labels import expand_paths

    images = expand_paths([f"s3://{BUCKET}/a/*.tif"])
    assert images == [f"/vsis3/{BUCKET}/a/copy.tif", f"/vsis3/{BUCKET}/a/scene.tif"]
    labels = tmp_path / "labels.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(500_010, 5_199_900, 500_030, 5_199_920)], crs="EPSG:32633").to_file(labels)
    (remote_raster,) = open_rasters(images[:1], [str(labels)], TrainSettings(gsd_m=None))
    (local_raster,) = open_rasters([str(scene[0])], [str(labels)], TrainSettings(gsd_m=None))
    assert remote_raster.info.path == images[0]
    assert (remote_raster.grid, remote_raster.stats, len(remote_raster.labels)) == (local_raster.grid, local_raster.stats, 1)


def _label_polygons(label_raster: Path, path: Path) -> Path:
    """Polygonise a label raster into a GeoJSON of labels (what a user brings to ``geomask train``)."""
    import geopandas as gpd
    import rasterio.features

    with rasterio.open(label_raster) as src:
        values, transform, crs = src.read(1), src.transform, src.crs
    shapes = [shapely.geometry.shape(g) for g, v in rasterio.features.shapes(values, mask=values > 0, transform=transform)]
    gpd.GeoDataFrame(geometry=shapes, crs=crs).to_file(path, driver="GeoJSON")
    return path


def test_geomask_train_on_s3_images_and_labels_equals_training_on_the_local_files(
    s3_env: S3, scene: tuple[Path, Path], tmp_path: Path
) -> None:
    """``geomask train`` end to end with every input on S3: the same weights, bit for bit, as from the local files."""
    import torch

    from geomask.detect.checkpoint import load_checkpoint

    image, label_raster = scene
    labels = _label_polygons(label_raster, tmp_path / "labels.geojson")
    s3_env.client().upload_file(str(labels), BUCKET, "train/labels.geojson")
    common = ["--arch", "tiny_fpn", "--native-gsd", "--iterations", "2", "--val-every", "2", "--chip-size", "64"]
    common += ["--batch-size", "2", "--threads", "1", "--device", "cpu", "--seed", "3", "--no-val", "--keep", "last"]
    runs = {
        "local": ["--images", str(image), "--labels", str(labels)],
        "s3": ["--images", f"s3://{BUCKET}/a/sc*.tif", "--labels", f"s3://{BUCKET}/train/labels.geojson"],
    }
    weights = {}
    for name, inputs in runs.items():
        out = tmp_path / f"{name}.pt"
        try:
            main(["train", *inputs, "-o", str(out), *common])
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"geomask train ({name}) exited {exit_.code}"
        weights[name] = load_checkpoint(out).state_dict
    assert weights["s3"].keys() == weights["local"].keys()
    assert all(torch.equal(weights["s3"][k], weights["local"][k]) for k in weights["local"])


def test_an_aoi_file_on_s3_selects_the_same_objects_as_a_local_one(
    s3_env: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    import geopandas as gpd

    config, expected = reference
    (x0, y0), (x1, y1) = TRANSFORM @ (300, 300), TRANSFORM @ (600, 600)
    aoi = tmp_path / "aoi.geojson"
    gpd.GeoDataFrame(geometry=[shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))], crs="EPSG:32633").to_file(aoi)
    s3_env.client().upload_file(str(aoi), BUCKET, "aoi/site.geojson")
    local, remote_out = tmp_path / "local.gpkg", tmp_path / "s3.gpkg"
    _predict(f"s3://{BUCKET}/a/scene.tif", "-o", local, "-c", config, "--serial", "--aoi", aoi)
    _predict(f"s3://{BUCKET}/a/scene.tif", "-o", remote_out, "-c", config, "--serial", "--aoi", f"s3://{BUCKET}/aoi/site.geojson")
    assert polygons(remote_out) == polygons(local)
    assert 0 < len(polygons(local)) < len(expected)


def test_a_missing_aoi_on_s3_is_one_line_and_exit_2(s3: S3, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path) -> None:
    config, _ = reference
    args = ["predict", f"s3://{BUCKET}/a/scene.tif", "-o", str(tmp_path / "o.gpkg"), "-c", str(config), "--serial"]
    result = _geomask([*args, "--aoi", f"s3://{BUCKET}/aoi/none.geojson"], {**_clean_env(tmp_path), **s3.environ()}, tmp_path)
    errors = [ln for ln in result.stderr.splitlines() if " INFO " not in ln]  # the model is loaded (and says so) first
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f"tiling.aoi: s3://{BUCKET}/aoi/none.geojson does not exist" in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "o.gpkg").exists()


# -- STAC --------------------------------------------------------------------------------------------


def _stac_item(item_id: str, assets: dict[str, str]) -> dict[str, object]:
    """A STAC item over the scene's footprint, written by pystac, with ``assets`` (name -> href)."""
    import datetime

    import pystac

    footprint = shapely.box(15.0, 46.9, 15.01, 46.91)  # what a catalogue stores; geomask reads the raster's own georeferencing
    item = pystac.Item(item_id, shapely.geometry.mapping(footprint), list(footprint.bounds), datetime.datetime(2026, 5, 1), {})
    for name, href in assets.items():
        item.add_asset(name, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"]))
    item.add_asset("thumbnail", pystac.Asset("thumb.png", media_type=pystac.MediaType.PNG, roles=["thumbnail"]))
    return item.to_dict(include_self_link=False)


def test_a_stac_item_collection_runs_as_is(
    s3_env: S3, scene: tuple[Path, Path], web: HTTP, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    """A saved search result served over HTTP: one item's COG beside it (relative href), one on S3; and a local item file."""
    config, expected = reference
    image, _ = scene
    items = [
        _stac_item("over-http", {"visual": image.name, "analytic": "elsewhere.tif"}),
        _stac_item("on-s3", {"image": f"s3://{BUCKET}/b/scene.tif"}),
    ]
    (image.parent / "search.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    out = tmp_path / "out"
    _predict(f"{web.root}search.json", "-o", f"{out}/", "-c", config, "--serial")
    assert sorted(p.name for p in out.glob("*.gpkg")) == ["scene.gpkg", "scene_cog.gpkg"]
    assert polygons(out / "scene_cog.gpkg") == expected and polygons(out / "scene.gpkg") == expected

    local_item = tmp_path / "item.json"
    local_item.write_text(json.dumps(_stac_item("local", {"ortho": str(Path("..") / image.parent.name / image.name), "dsm": "dsm.tif"})))
    _predict(local_item, "--asset", "ortho", "-o", tmp_path / "local.gpkg", "-c", config, "--serial")
    assert polygons(tmp_path / "local.gpkg") == expected


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no such asset", "has no asset 'nir' (it has: a, b, thumbnail); pick one with --asset"),
        ("two rasters", "has 2 raster assets (a, b); pick one with --asset"),
        ("not stac", "is not a STAC item or item collection"),
        ("geojson labels", "is not a STAC item or item collection"),
    ],
)
def test_stac_mistakes_are_one_line_and_exit_2(
    case: str, needle: str, reference: tuple[Path, list[tuple[object, ...]]], tmp_path: Path
) -> None:
    config, _ = reference
    item = tmp_path / "item.json"
    body: object = _stac_item("two", {"a": "a.tif", "b": "b.tif"})
    if case == "not stac":
        body = {"type": "Topology"}
    elif case == "geojson labels":  # a FeatureCollection of plain features: labels given as an input by mistake
        feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [15.0, 46.9]}}
        body = {"type": "FeatureCollection", "features": [feature]}
    item.write_text(json.dumps(body))
    extra = ["--asset", "nir"] if case == "no such asset" else []
    result = _geomask(
        ["predict", str(item), *extra, "-o", str(tmp_path / "o.gpkg"), "-c", str(config), "--serial"], _clean_env(tmp_path), tmp_path
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert not (tmp_path / "o.gpkg").exists()
