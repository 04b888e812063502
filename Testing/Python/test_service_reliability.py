"""The service under hostile but fair use: no token, path-like fields, oversized and malformed bodies,
a client killed mid-job, the parent process gone. Every refusal is a 4xx with one JSON line."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from MedFMSegmentLib.geometry import VolumeGeometry
from MedFMSegmentLib.service.client import ServiceClient, ServiceError
from MedFMSegmentLib.service.wire import MAGIC, encode_frame, geometry_to_dict

from test_service import PROJECT_ROOT, cropped_case, label_box, start_long_finetune, start_server, stop_server


@pytest.fixture(scope="module")
def small_service(tmp_path_factory):
    """A server with small body limits (1 MiB uploads, 4 MiB volumes)."""
    tmp = tmp_path_factory.mktemp("small_service")
    process, ready = start_server(tmp, "--max-upload-mb", "1", "--max-volume-mb", "4")
    ready["token"] = Path(ready["token_file"]).read_text(encoding="utf-8").strip()
    ready["tmp"] = tmp
    ready["process"] = process
    yield ready
    assert stop_server(process, signal.SIGINT) == 0  # Ctrl+C stops it as cleanly as SIGTERM


def raw(service: dict, method: str, path: str, body: bytes | None = None, token: str | None = "default",
        headers: dict | None = None) -> tuple[int, dict]:
    """One request by hand: ``(status, JSON body)``; the body must be JSON (every error is)."""
    url = urllib.parse.urlsplit(service["url"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {service['token'] if token == 'default' else token}"
    connection.request(method, "/v1" + path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data)


def assert_refused(answer: tuple[int, dict], status: int, words: str = "") -> None:
    code, body = answer
    assert code == status, body
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    assert words.lower() in body["error"].lower(), body


def small_volume(service: dict) -> str:
    array = np.arange(8 * 8, dtype=np.int16).reshape(1, 8, 8)
    client = ServiceClient(service["url"], service["token"])
    return client.upload_volume(array, VolumeGeometry.identity((8, 8, 1)), is_2d=True)


def test_missing_or_wrong_token_is_refused(small_service):
    for method, path, body in (("GET", "/info", None), ("POST", "/volumes", b"x" * 100), ("GET", "/jobs/1", None),
                               ("GET", "/adapters", None), ("POST", "/finetune", b"{}")):
        assert_refused(raw(small_service, method, path, body, token=None), 401, "token")
        assert_refused(raw(small_service, method, path, body, token="wrong"), 401, "token")
        assert_refused(raw(small_service, method, path, body, token=small_service["token"][:-1]), 401)
    basic = {"Authorization": f"Basic {small_service['token']}"}
    assert_refused(raw(small_service, "GET", "/info", token=None, headers=basic), 401)
    with pytest.raises(ServiceError) as refused:
        ServiceClient(small_service["url"], "wrong-token").info()
    assert refused.value.status == 401


def test_path_like_fields_cannot_make_the_server_read_files(small_service, tmp_path):
    vid = small_volume(small_service)
    # An adapter-like folder outside the adapter folder, and a file, that a path would reach.
    outside = small_service["tmp"] / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "metadata.json").write_text("{}")
    (outside / "adapter.safetensors").write_bytes(b"")
    box = [1, 1, 0, 5, 5, 0]
    for body, status, words in (
            ({"box": box, "image": "/etc/passwd"}, 400, "unknown field"),
            ({"box": box, "path": str(outside)}, 400, "unknown field"),
            ({"box": box, "adapter": "../outside"}, 400, "adapter name"),
            ({"box": box, "adapter": str(outside)}, 400, "adapter name"),
            ({"box": box, "adapter": "..."}, 400, "adapter name"),
            ({"box": box, "adapter": "passwd"}, 400, "no adapter named"),
            ({"box": box, "model": "/etc/passwd"}, 400, "not served")):
        assert_refused(raw(small_service, "POST", f"/volumes/{vid}/prompts", json.dumps(body).encode()), status, words)
    assert_refused(raw(small_service, "POST", f"/volumes/{vid}/automatic",
                       json.dumps({"adapter": "../outside"}).encode()), 400, "adapter name")
    assert_refused(raw(small_service, "POST", "/finetune", json.dumps(
        {"images": ["/etc/passwd"], "labels": ["/etc/hosts"], "config": {"name": "x"}}).encode()), 404, "no volume")
    assert_refused(raw(small_service, "POST", "/finetune", json.dumps(
        {"images": [vid], "labels": [vid], "config": {"name": "../../escape"}}).encode()), 400, "adapter name")
    assert_refused(raw(small_service, "POST", "/finetune", json.dumps(
        {"images": [vid], "labels": [vid], "config": {"name": "x", "output": "/tmp/x"}}).encode()), 400, "unknown")
    assert_refused(raw(small_service, "GET", "/volumes/..%2F..%2Fetc%2Fpasswd"), 404)
    assert_refused(raw(small_service, "GET", "/adapters/..%2Foutside/archive"), 404)
    assert_refused(raw(small_service, "GET", "/adapters/..outside/archive"), 400, "adapter name")
    assert_refused(raw(small_service, "GET", "/adapters/outside/archive"), 400, "no adapter named")
    assert not (small_service["tmp"] / "escape").exists()
    assert [a["name"] for a in ServiceClient(small_service["url"], small_service["token"]).adapters()] == []


def test_oversized_and_malformed_bodies_are_refused_in_one_line(small_service):
    vid = small_volume(small_service)
    geometry = geometry_to_dict(VolumeGeometry.identity((1024, 1024, 2)))
    big = encode_frame([np.random.default_rng(0).integers(0, 30000, (2, 1024, 1024), dtype=np.int16)],
                       {"geometry": geometry})
    assert len(big) > 1 << 20
    assert_refused(raw(small_service, "POST", "/volumes", big), 413, "limit")
    assert_refused(raw(small_service, "POST", "/volumes", b"not a frame at all"), 400, "magic")
    assert_refused(raw(small_service, "POST", "/volumes", b""), 400)
    # A zip bomb: 8 MiB of zeros compress to a few kB, over the 4 MiB volume limit once inflated.
    bomb = encode_frame([np.zeros((16, 512, 512), np.int16)], {"geometry": geometry_to_dict(
        VolumeGeometry.identity((512, 512, 16)))}, level=9)
    assert len(bomb) < 1 << 20
    assert_refused(raw(small_service, "POST", "/volumes", bomb), 400, "over the limit")
    # A header declaring less than its data holds, and one declaring more.
    header = json.dumps({"arrays": [{"dtype": "int16", "shape": [1, 4, 4]}], "codec": "zlib",
                         "geometry": geometry_to_dict(VolumeGeometry.identity((4, 4, 1)))}).encode()
    for payload in (np.zeros(64, np.int16).tobytes(), np.zeros(4, np.int16).tobytes()):
        frame = MAGIC + struct.pack("<I", len(header)) + header + zlib.compress(payload)
        assert_refused(raw(small_service, "POST", "/volumes", frame), 400)
    assert_refused(raw(small_service, "POST", "/volumes", big[:200]), 400)
    mismatch = encode_frame([np.zeros((2, 4, 4), np.int16)], {"geometry": geometry_to_dict(
        VolumeGeometry.identity((4, 4, 3)))})
    assert_refused(raw(small_service, "POST", "/volumes", mismatch), 400, "does not match")
    prompts = f"/volumes/{vid}/prompts"
    for body, words in ((b"{not json", "not valid json"), (b"[1, 2]", "json object"),
                        (b'{"box": [1, 2, 3, 4, 5]}', "6 finite numbers"),
                        (b'{"box": [NaN, 1, 0, 5, 5, 0]}', "finite"),
                        (b'{"box": [1, 1, 0, 50, 5, 0]}', "outside the image"),
                        (b'{"box": [1, 1, 0, 5, 5, 0], "axis": "diagonal"}', "axis"),
                        (b'{"points": "everywhere"}', "point"),
                        (b'{"negatives": [[1, 1, 0]]}', "negative"),
                        (b"\xff\xfe\x00garbage", "not valid json")):
        assert_refused(raw(small_service, "POST", prompts, body), 400, words)
    assert_refused(raw(small_service, "POST", prompts, b'{"box": [' + b"1," * (1 << 20) + b"1]}"), 413, "limit")
    assert_refused(raw(small_service, "POST", "/volumes/unknown/prompts", b'{"box": [1, 1, 0, 5, 5, 0]}'), 404)
    assert_refused(raw(small_service, "GET", "/jobs/unknown/result"), 404, "no job")
    assert_refused(raw(small_service, "GET", "/jobs/unknown/updates?since=abc"), 422)
    assert_refused(raw(small_service, "GET", "/nowhere"), 404)
    assert_refused(raw(small_service, "PUT", "/info"), 405)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        for name in ("adapter.safetensors", "metadata.json", "../escape.txt"):
            archive.writestr(name, "{}")
    for body in (evil.getvalue(), b"not a zip", b""):
        assert_refused(raw(small_service, "PUT", "/adapters/evil/archive", body), 400)
    assert not list((small_service["tmp"] / "adapters").iterdir())
    assert not (small_service["tmp"] / "escape.txt").exists()
    assert ServiceClient(small_service["url"], small_service["token"]).info()["volumes"] >= 1


CLIENT_SCRIPT = """
import sys, time
import numpy as np
from MedFMSegmentLib.io import MedicalImage
from MedFMSegmentLib.geometry import VolumeGeometry
from MedFMSegmentLib.service.client import ServiceClient
url, token, path, box = sys.argv[1], sys.argv[2], sys.argv[3], [int(v) for v in sys.argv[4:10]]
data = np.load(path)
client = ServiceClient(url, token, timeout=300)
vid = client.upload_volume(data["array"], VolumeGeometry(tuple(data["size"]), tuple(data["spacing"]),
                                                         tuple(data["origin"]), data["direction"]))
job_id = client.prompt(vid, {"box": box}, box3d_strategy="propagate").job_id
print(job_id, flush=True)
cursor = 0
while True:  # polls until killed
    cursor, _ = client.updates(job_id, cursor)
    time.sleep(0.05)
"""


def test_client_killed_mid_job_leaves_the_server_serving(small_service, data_dir, tmp_path):
    image, label = cropped_case(data_dir, 15, slices=8)
    g = image.geometry
    np.savez(tmp_path / "case.npz", array=image.array, size=g.size, spacing=g.spacing, origin=g.origin,
             direction=g.direction)
    box = label_box(label.array > 0)
    child = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, small_service["url"], small_service["token"],
                              str(tmp_path / "case.npz"), *map(str, box)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    job_id = child.stdout.readline().strip()
    assert job_id, "the client process started no job"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    client = ServiceClient(small_service["url"], small_service["token"], timeout=300)
    assert client.info()["volumes"] >= 1
    assert client.job(job_id).state in ("queued", "running", "done")
    mask = client.wait(job_id, timeout=600)
    assert mask.shape == image.array.shape and mask.any()
    vid = client.upload_volume(image.array, image.geometry)
    k = int(np.flatnonzero((label.array > 0).any(axis=(1, 2)))[0])
    assert client.prompt(vid, {"box": label_box(label.array > 0, k)}).mask[k].any()


def test_parent_death_stops_the_server_and_its_fine_tuning(tmp_path, data_dir):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    process, ready = start_server(tmp_path, "--parent-pid", str(parent.pid))
    try:
        client = ServiceClient(ready["url"], Path(ready["token_file"]).read_text(encoding="utf-8").strip(), timeout=300)
        start_long_finetune(client, data_dir, "orphan", (17, 19), "training")
        parent.kill()
        parent.wait(30)
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
        if parent.poll() is None:
            parent.kill()
    assert "parent process" in (tmp_path / "stderr.txt").read_text(encoding="utf-8")
    adapters = tmp_path / "adapters"
    assert not (adapters / "orphan").exists() and not list(adapters.iterdir())


def test_serve_bad_options_exit_2_with_one_line(tmp_path):
    short = tmp_path / "short-token"
    short.write_text("abc")
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    for options, words in ((["--token-file", str(tmp_path / "missing" / "token")], "cannot create token file"),
                           (["--token-file", str(short)], "no token of 16 characters"),
                           (["--model", "sam_vit_b"], "needs --checkpoint"),
                           (["--parent-pid", "0"], "--parent-pid"),
                           (["--host", "0.0.0.0", "--token-file", str(short)], "no token of 16 characters")):
        run = subprocess.run([sys.executable, "-m", "MedFMSegmentLib.cli", "serve", "--adapter-dir",
                              str(tmp_path / "adapters"), *options], capture_output=True, text=True, env=env,
                             timeout=120)
        assert run.returncode == 2 and run.stdout == "", run.stderr
        lines = run.stderr.strip().splitlines()
        assert words in lines[-1] and "Traceback" not in run.stderr
        if "0.0.0.0" in options:  # another address than loopback is said out loud
            assert len(lines) == 2 and "reachable from other machines" in lines[0]
        else:
            assert len(lines) == 1


def test_default_token_file_is_private_and_removed_a_named_one_is_reused(tmp_path):
    from MedFMSegmentLib.service.launch import start_local_service

    service = start_local_service("--adapter-dir", str(tmp_path / "adapters"), timeout=120)
    default = Path(service.token_file)
    assert default.stat().st_mode & 0o777 == 0o600 and default.parent.stat().st_mode & 0o077 == 0
    assert service.client().info()["models"] == ["litemedsam"]
    assert service.stop() == 0 and not default.exists()
    named = tmp_path / "token"
    named.write_text("a-token-chosen-by-the-user-0123456789\n")
    named.chmod(0o600)
    service = start_local_service("--adapter-dir", str(tmp_path / "adapters"), "--token-file", str(named),
                                  timeout=120)
    assert service.token == "a-token-chosen-by-the-user-0123456789"
    assert service.client().info()["device"] == "cpu"
    assert service.stop() == 0 and named.exists()


def test_served_connections_turn_nagle_off():
    """The service's socket, served by uvicorn as `serve` serves it: the accepted connection has
    TCP_NODELAY, so an answer written as headers then body never waits for a delayed ACK."""
    import socket
    import threading

    import uvicorn

    from MedFMSegmentLib.service.server import _bind

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = _bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        connection = http.client.HTTPConnection(*sock.getsockname()[:2], timeout=30)
        connection.request("POST", "/", body=b"{}")
        assert connection.getresponse().read() == b"ok"
        served = [c.transport.get_extra_info("socket") for c in server.server_state.connections]
        assert len(served) == 1
        assert served[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        connection.close()
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
