"""Downloading for real, through huggingface_hub, from a hub look-alike on 127.0.0.1.

The server speaks what huggingface_hub asks of the hub: the revision API (`/api/models/{repo}/revision/{rev}`),
the tree API, HEAD and GET on `/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag`, `X-Linked-Etag` and
`X-Linked-Size`, 302 redirects of large files to a "CDN" on another host name (localhost) that rejects an
`Authorization` header, Range requests, and errors as the hub sends them (`X-Error-Code`). Every run is a process
(huggingface_hub reads HF_* variables when imported), started by tests/script_runner.py.
"""
import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from ovis_min.tiny import write_tiny_checkpoint
from script_runner import one_line_error, run_script, start_script

REPO = "AIDC-AI/Ovis-U1-3B"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
PR_COMMIT = "c" * 40
TOKEN = "hf_secret"


class Hub(http.server.BaseHTTPRequestHandler):
    """State on the class (one subclass per test): commits -> files, refs -> commit, and the failures to play."""
    protocol_version = "HTTP/1.1"
    commits: dict  # commit -> {file name: bytes}
    refs: dict  # "main", "refs/pr/1" -> commit
    gated: bool = False
    need_token: bool = False
    fail_once: set  # request paths answered `fail_status` (503 or 429) the first time
    fail_status: int = 503
    drop: set  # file names the CDN cuts off half way
    log: list  # (method, path, Authorization)

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def error(self, status: int, code: str, head: bool, message: str = ""):
        self.reply(status, json.dumps({"error": code}).encode(),
                   {"X-Error-Code": code, **({"X-Error-Message": message} if message else {})}, head)

    def answer(self, head: bool):
        url = urlsplit(self.path)
        path = unquote(url.path)
        auth = self.headers.get("Authorization")
        self.log.append((self.command, path, auth))
        if path in self.fail_once:
            self.fail_once.discard(path)
            return self.reply(self.fail_status, b"busy", {"Retry-After": "0"}, head)
        if path.startswith("/cdn/"):
            return self.cdn(path, auth, head)
        if self.need_token and auth != f"Bearer {TOKEN}":
            if auth:
                return self.reply(401, b"{}", {"X-Error-Message": "Invalid credentials in Authorization header"}, head)
            return self.error(401, "RepoNotFound", head)
        if path.startswith("/api/models/"):
            repo, _, rest = path[len("/api/models/"):].partition("/")
            name, _, rest = rest.partition("/")
            kind, _, revision = rest.partition("/")
            if f"{repo}/{name}" != REPO:
                return self.error(401, "RepoNotFound", head)
            if self.gated:
                return self.error(403, "GatedRepo", head)
            commit = self.refs.get(revision, revision if revision in self.commits else None)
            if commit is None:
                return self.error(404, "RevisionNotFound", head)
            files = self.commits[commit]
            if kind == "revision":
                info = {"_id": "x", "id": REPO, "sha": commit, "private": False, "disabled": False, "gated": False,
                        "downloads": 0, "likes": 0, "tags": [], "lastModified": "2025-06-30T00:00:00.000Z",
                        "siblings": [{"rfilename": n} for n in files]}
                return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            tree = [{"type": "file", "path": n, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                     **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}}
                        if n.endswith(".safetensors") else {})} for n, data in files.items()]
            return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        parts = path.split("/")  # "", org, name, "resolve", revision..., file
        if len(parts) < 6 or parts[3] != "resolve":
            return self.reply(404, b"", {}, head)
        if "/".join(parts[1:3]) != REPO:
            return self.error(401, "RepoNotFound", head)
        if self.gated:
            return self.error(403, "GatedRepo", head)
        rest = "/".join(parts[4:])
        for revision in sorted([*self.refs, *self.commits], key=len, reverse=True):
            if rest.startswith(revision + "/"):
                commit, name = self.refs.get(revision, revision), rest[len(revision) + 1:]
                break
        else:
            return self.error(404, "RevisionNotFound", head)
        data = self.commits[commit].get(name)
        if data is None:
            return self.error(404, "EntryNotFound", head)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        if name.endswith(".safetensors"):  # large files live on the CDN, as on the hub
            port = self.server.server_address[1]
            return self.reply(302, b"", {**headers, "Location": f"http://localhost:{port}/cdn/{commit}/{name}",
                                         "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                         "X-Linked-Size": str(len(data))}, head)
        self.reply(200, data, headers, head)

    def cdn(self, path: str, auth: str | None, head: bool):
        if auth:  # a signed URL: the hub's token must never reach another host
            return self.reply(403, b"Authorization header not allowed", {}, head)
        _, _, commit, name = path.split("/", 3)
        data = self.commits[commit][name]
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
        body = data[start:]
        if name in self.drop and not head:
            self.drop.discard(name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        self.reply(206 if start else 200, body, extra, head)

    def log_message(self, *args):
        pass


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, bytes]:
    """A tiny checkpoint in the published layout (slow tokenizer, bf16 + f32, 2 shards), plus what a hub repository
    also holds and a download must leave alone: the remote code, an extra safetensors file the index does not name."""
    files = checkpoint_files(write_tiny_checkpoint(tmp_path_factory.mktemp("release") / "ckpt", slow_tokenizer=True,
                                                   published_dtypes=True))
    return {**files, "modeling_ovis_u1.py": b"raise SystemExit('checkpoint code must never run')\n",
            "README.md": b"# card\n", "unused/consolidated.safetensors": files["model-00001-of-00002.safetensors"]}


@pytest.fixture
def hub(tmp_path, release):
    handler = type("Handler", (Hub,), {"commits": {COMMIT_A: dict(release), PR_COMMIT: dict(release)},
                                       "refs": {"main": COMMIT_A, "refs/pr/1": PR_COMMIT}, "fail_once": set(),
                                       "drop": set(), "log": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    handler.env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path / "hf"),
                   "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5",
                   "HF_TOKEN": "", "HF_HUB_DISABLE_TELEMETRY": "1"}
    handler.cache = tmp_path / "hf" / "hub" / "models--AIDC-AI--Ovis-U1-3B"
    yield handler
    server.shutdown()
    server.server_close()


WANTED = sorted(n for n in ("config.json", "preprocessor_config.json", "model.safetensors.index.json",
                            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "vocab.json",
                            "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"))


def weights(hub, *args, **env):
    return run_script("weights.py", *args, env={**hub.env, **env})


def test_download_into_the_shared_cache_then_use_it_offline(hub, release):
    run = weights(hub, "download", "--quiet")
    assert run.returncode == 0, run.stderr
    snapshot = hub.cache / "snapshots" / COMMIT_A
    assert f"to {snapshot}" in run.stdout
    assert sorted(p.name for p in snapshot.iterdir()) == WANTED  # no code, no README, no unindexed weights
    assert all((snapshot / name).is_symlink() and (snapshot / name).read_bytes() == release[name] for name in WANTED)
    assert (hub.cache / "refs" / "main").read_text() == COMMIT_A and (hub.cache / "blobs").is_dir()
    assert not any("modeling" in path or "unused" in path for _, path, _ in hub.log)
    check = weights(hub, "check", REPO, HF_HUB_OFFLINE="1")
    assert check.returncode == 0 and "slow tokenizer files" in check.stdout, check.stderr


def test_download_into_a_folder_and_again_fetches_nothing(hub, tmp_path, release):
    assert weights(hub, "download", "--dir", tmp_path / "ckpt", "--quiet").returncode == 0
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("."))
    assert names == WANTED and (tmp_path / "ckpt" / "vocab.json").read_bytes() == release["vocab.json"]
    hub.log.clear()
    assert weights(hub, "download", "--dir", tmp_path / "ckpt", "--quiet").returncode == 0
    assert not any(method == "GET" and "/resolve/" in path for method, path, _ in hub.log)


def test_token_goes_to_the_hub_and_never_to_the_cdn(hub, tmp_path):
    hub.need_token = True
    assert one_line_error(weights(hub, "download", "--dir", tmp_path / "a"), "hf auth login", "HF_TOKEN")
    assert one_line_error(weights(hub, "download", "--dir", tmp_path / "b", HF_TOKEN="hf_wrong"), "refused the token")
    run = weights(hub, "download", "--dir", tmp_path / "c", "--quiet", HF_TOKEN=TOKEN)
    assert run.returncode == 0, run.stderr
    cdn = [auth for _, path, auth in hub.log if path.startswith("/cdn/")]
    assert cdn and all(auth is None for auth in cdn)


def test_a_pull_request_revision(hub):
    run = weights(hub, "download", "--revision", "refs/pr/1", "--quiet")
    assert run.returncode == 0, run.stderr
    assert (hub.cache / "snapshots" / PR_COMMIT / "config.json").is_file()
    assert weights(hub, "check", REPO, "--revision", "refs/pr/1", HF_HUB_OFFLINE="1").returncode == 0


def test_retries_on_429_and_resumes_a_dropped_transfer(hub):
    hub.fail_once.add(f"/cdn/{COMMIT_A}/model-00001-of-00002.safetensors")
    hub.fail_status = 429
    hub.drop.add("model-00002-of-00002.safetensors")
    first = weights(hub, "download", "--quiet")
    if first.returncode != 0:  # huggingface_hub gives up on a dropped transfer; the next run resumes it
        assert one_line_error(first, "run the same command again")
        assert weights(hub, "download", "--quiet").returncode == 0
    assert weights(hub, "check", REPO, HF_HUB_OFFLINE="1").returncode == 0


def test_two_downloads_at_once(hub):
    runs = [start_script("weights.py", "download", "--quiet", env=hub.env) for _ in range(2)]
    assert [run.wait(120).returncode for run in runs] == [0, 0]
    assert weights(hub, "check", REPO, HF_HUB_OFFLINE="1").returncode == 0


def test_incomplete_snapshot_is_named_offline_and_completed_online(hub):
    assert weights(hub, "download", "--quiet").returncode == 0
    snapshot = hub.cache / "snapshots" / COMMIT_A
    for name in WANTED:  # what another tool that fetched only config.json leaves
        if name != "config.json":
            (snapshot / name).unlink()
    offline = weights(hub, "check", REPO, HF_HUB_OFFLINE="1")
    assert one_line_error(offline, "incomplete", "preprocessor_config.json", f"python weights.py download {REPO}")
    run = run_script("sample.py", "--ask", "hi", "--max-new-tokens", "2", env={**hub.env})
    assert run.returncode == 0, run.stderr  # online, sample.py completes the snapshot and answers
    assert "completing it" in run.stderr
    assert weights(hub, "check", REPO, HF_HUB_OFFLINE="1").returncode == 0


def test_a_partial_newer_main_leaves_the_complete_older_snapshot_usable(hub, release):
    assert weights(hub, "download", "--quiet").returncode == 0
    newer = dict(release)
    newer["README.md"] = b"# new card\n"
    hub.commits[COMMIT_B] = newer
    hub.refs["main"] = COMMIT_B
    hub.fail_once.update({f"/cdn/{COMMIT_B}/model-00001-of-00002.safetensors"})
    hub.need_token = True  # the first shard's 503 is retried, then every hub call is refused: the run stops half way
    weights(hub, "download", "--quiet")
    hub.need_token = False
    if (hub.cache / "refs" / "main").read_text() == COMMIT_B and not (
            hub.cache / "snapshots" / COMMIT_B / "model-00002-of-00002.safetensors").exists():
        offline = weights(hub, "check", REPO, HF_HUB_OFFLINE="1")
        assert offline.returncode == 0, offline.stderr
        assert f"checkpoint {hub.cache / 'snapshots' / COMMIT_A}" in offline.stdout
        assert "incomplete" in offline.stderr and "python weights.py download" in offline.stderr
    assert weights(hub, "download", "--quiet").returncode == 0  # online, the newer one is finished
    assert (hub.cache / "snapshots" / COMMIT_B / "model-00002-of-00002.safetensors").is_file()


@pytest.mark.parametrize("case", ["no repo", "gated", "revision", "missing shard", "not a checkpoint", "offline",
                                  "unreachable", "endpoint", "dir is a file"])
def test_each_hub_failure_is_one_line_with_the_fix(hub, tmp_path, case):
    args, env, names = ["download", "--quiet"], {}, []
    if case == "no repo":
        args[1:1], names = ["AIDC-AI/Ovis-U1-3b"], ["not found", "AIDC-AI/Ovis-U1-3b", "check the id"]
    elif case == "gated":
        hub.gated, names = True, ["gated", f"{hub.env['HF_ENDPOINT']}/{REPO}", "accept"]
    elif case == "revision":
        args += ["--revision", "v9"]
        names = ["no revision 'v9'", "--revision"]
    elif case == "missing shard":
        del hub.commits[COMMIT_A]["model-00002-of-00002.safetensors"]
        names = ["model-00002-of-00002.safetensors", "lacks"]
    elif case == "not a checkpoint":
        for name in ("vocab.json", "preprocessor_config.json"):
            del hub.commits[COMMIT_A][name]
        names = ["not an Ovis-U1 checkpoint", "preprocessor_config.json", "vocab.json"]
    elif case == "offline":
        env, names = {"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE", "not in the Hugging Face cache"]
    elif case == "unreachable":
        env, names = {"HF_ENDPOINT": "http://127.0.0.1:9"}, ["cannot reach http://127.0.0.1:9", "network"]
    elif case == "endpoint":
        env, names = {"HF_ENDPOINT": "huggingface.co"}, ["HF_ENDPOINT", "not a URL"]
    elif case == "dir is a file":
        (tmp_path / "file").write_text("x")
        args += ["--dir", str(tmp_path / "file")]
        names = ["--dir", "is a file"]
    run = weights(hub, *args, **env)
    assert one_line_error(run, *names), run.stderr
    assert len([line for line in run.stderr.splitlines() if line.strip()]) <= 2, run.stderr
