"""Downloading for real, from a hub look-alike on 127.0.0.1 that serves a small checkpoint at the hub's URLs.

The server speaks the parts of the hub's protocol the downloader uses: `/{repo}/resolve/{revision}/{file}`,
404 for absent files, an `X-Repo-Commit` header, and HTTP Range requests (206 + Content-Range). It can drop the
connection in the middle of a file, serve a file shorter than the real one, and insist on a token.
"""
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ovis_min import checkpoint
from ovis_min.checkpoint import (INDEX_FILE, OPTIONAL_FILES, CheckpointError, download_checkpoint, open_checkpoint,
                                 resolve_source, save_checkpoint)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
REPO = "AIDC-AI/Ovis-U1-3B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubHandler(http.server.BaseHTTPRequestHandler):
    root: Path  # served files: root/{repo}/{file}
    drop_once: set = set()  # files whose first transfer stops half way
    drop_always: set = set()  # files whose every transfer stops half way
    redirect: bool = False  # send .safetensors to a "CDN" on another host name, as the hub does for large files
    truncated: set = set()  # files served (consistently) shorter than they are
    token: str | None = None  # when set, requests without "Authorization: Bearer <token>" get 401
    log: list = []  # (path, Range header, Authorization header)

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        parts = self.path.split("/")  # "", org, name, "resolve", revision, file...  or  "", "cdn", org, name, file
        if parts[1] == "cdn":
            parts = ["", parts[2], parts[3], "resolve", COMMIT, *parts[4:]]
        elif self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            return self.send_error(401)
        if len(parts) < 6 or parts[3] != "resolve" or parts[4] not in ("main", COMMIT):
            return self.send_error(404)
        name = "/".join(parts[5:])
        if self.redirect and name.endswith(".safetensors") and not self.path.startswith("/cdn/"):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cdn/{parts[1]}/"
                                         f"{parts[2]}/{name}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        path = self.root / parts[1] / parts[2] / name
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        if name in self.truncated:
            data = data[: len(data) - 50]
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if name in self.drop_once or name in self.drop_always:
            self.drop_once.discard(name)
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    """A served checkpoint: 2 shards + index, config, tokenizer, preprocessor config, and a Python file."""
    served = tmp_path / "served" / REPO
    torch.manual_seed(0)
    save_checkpoint({f"block.{i}.weight": torch.randn(64, 64) for i in range(4)}, served, 2)
    shutil.copy(GOLDEN / "tiny_model_config.json", served / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(GOLDEN / "tiny_tokenizer" / name, served / name)
    (served / "modeling_ovis_u1.py").write_text("raise SystemExit('checkpoint code must never run')\n")

    handler = type("Handler", (HubHandler,), {"root": tmp_path / "served", "drop_once": set(), "drop_always": set(),
                                              "redirect": False, "truncated": set(), "token": None, "log": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    handler.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    handler.files = served
    yield handler
    server.shutdown()
    server.server_close()


def same_files(downloaded: Path, served: Path, names) -> bool:
    return all((downloaded / n).read_bytes() == (served / n).read_bytes() for n in names)


def test_download_into_a_directory(hub, tmp_path):
    target = download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(p.name for p in hub.files.iterdir() if p.suffix != ".py")
    assert same_files(target, hub.files, names)
    assert not any("modeling" in path for path, _, _ in hub.log)  # code shipped with a checkpoint is never fetched
    assert all(f"/resolve/{COMMIT}/" in path for path, _, _ in hub.log[1:])  # pinned to the commit of config.json
    assert len(open_checkpoint(target).tensors) == 4


def test_interrupted_transfer_resumes_with_a_range_request(hub, tmp_path):
    shard = "model-00001-of-00002.safetensors"
    hub.drop_once.add(shard)
    target = download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert same_files(target, hub.files, [shard])
    requests = [rng for path, rng, _ in hub.log if path.endswith(shard)]
    size = (hub.files / shard).stat().st_size
    assert requests == [None, f"bytes={size // 2}-"]  # the second request asks only for the missing half
    assert not list(target.glob("*.incomplete"))


def test_transfer_that_keeps_failing_keeps_the_part_for_the_next_run(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "ATTEMPTS", 2)
    shard = "model-00001-of-00002.safetensors"
    hub.drop_always.add(shard)
    with pytest.raises(CheckpointError, match="run the same command again to resume"):
        download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert (tmp_path / "out" / (shard + ".incomplete")).is_file() and not (tmp_path / "out" / shard).exists()
    hub.drop_always.clear()
    target = download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert same_files(target, hub.files, [shard])


def test_redirect_to_another_host_keeps_the_range_and_drops_the_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    hub.redirect = True
    shard = "model-00002-of-00002.safetensors"
    hub.drop_once.add(shard)
    target = download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert same_files(target, hub.files, [shard])
    cdn = [(rng, auth) for path, rng, auth in hub.log if path.startswith("/cdn/") and path.endswith(shard)]
    assert [auth for _, auth in cdn] == [None, None] and cdn[1][0] is not None  # resumed through the redirect
    assert all(auth == "Bearer secret" for path, _, auth in hub.log if not path.startswith("/cdn/"))


def test_partial_file_from_an_earlier_run_is_resumed(hub, tmp_path):
    shard = "model-00002-of-00002.safetensors"
    target = tmp_path / "out"
    target.mkdir()
    data = (hub.files / shard).read_bytes()
    (target / (shard + ".incomplete")).write_bytes(data[:1000])
    download_checkpoint(REPO, local_dir=target, endpoint=hub.endpoint, progress=False)
    assert (target / shard).read_bytes() == data
    assert [rng for path, rng, _ in hub.log if path.endswith(shard)] == ["bytes=1000-"]


def test_truncated_file_is_detected_and_not_put_in_place(hub, tmp_path):
    shard = "model-00002-of-00002.safetensors"
    hub.truncated.add(shard)
    with pytest.raises(CheckpointError, match=rf"{shard}.*damaged.*truncated"):
        download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert not (tmp_path / "out" / shard).exists() and not (tmp_path / "out" / (shard + ".incomplete")).exists()

    hub.truncated.clear()  # the next run repairs it
    target = download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert same_files(target, hub.files, [shard])


def test_download_into_the_hub_cache_layout(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    target = download_checkpoint(REPO, progress=False)
    repo_dir = tmp_path / "cache" / "models--AIDC-AI--Ovis-U1-3B"
    assert target == repo_dir / "snapshots" / COMMIT
    assert (repo_dir / "refs" / "main").read_text() == COMMIT
    assert resolve_source(REPO) == target
    # a second run finds every file complete and fetches nothing but config.json
    hub.log.clear()
    download_checkpoint(REPO, progress=False)
    assert [path.rsplit("/", 1)[1] for path, _, _ in hub.log] == ["config.json"] + [
        name for name in OPTIONAL_FILES if not (target / name).exists()]  # absent optional files are asked again


def test_token_is_sent_as_bearer(hub, tmp_path, monkeypatch):
    hub.token = "secret"
    with pytest.raises(CheckpointError, match="HF_TOKEN"):
        download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    monkeypatch.setenv("HF_TOKEN", "secret")
    download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert all(auth == "Bearer secret" for _, _, auth in hub.log[1:])


def test_offline_gives_a_clear_message(tmp_path):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointError, match=rf"cannot reach http://127.0.0.1:{port}.*Offline"):
        download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=f"http://127.0.0.1:{port}", progress=False)


def test_unknown_repository_is_a_404_message(hub, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        download_checkpoint("nobody/nothing", local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)


def test_served_index_with_a_path_outside_the_directory_is_refused(hub, tmp_path):
    index = json.loads((hub.files / INDEX_FILE).read_text())
    index["weight_map"]["block.0.weight"] = "../../escaped.safetensors"
    (hub.files / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="refusing shard"):
        download_checkpoint(REPO, local_dir=tmp_path / "a" / "b" / "out", endpoint=hub.endpoint, progress=False)
    assert not list(tmp_path.rglob("escaped*"))


def test_single_file_checkpoint_without_index(hub, tmp_path):
    for path in hub.files.glob("model*"):
        path.unlink()
    save_checkpoint({"w": torch.ones(3)}, hub.files, 1)
    target = download_checkpoint(REPO, local_dir=tmp_path / "out", endpoint=hub.endpoint, progress=False)
    assert (target / "model.safetensors").is_file() and not (target / INDEX_FILE).exists()


def test_download_command_shows_progress(hub, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "weights.py"), "download", REPO, "--dir", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={"PATH": "", "HF_ENDPOINT": hub.endpoint, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "model-00001-of-00002.safetensors" in result.stderr and "100.0%" in result.stderr
    assert "python weights.py check" in result.stdout
