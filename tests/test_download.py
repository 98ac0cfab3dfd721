"""Tests for download.sh: the real script, real wget and md5sum, a local fake server.

The server mimics Meta's signed-URL layout: ``http://127.0.0.1:PORT/<path>?Policy=...
&Signature=...&Key-Pair-Id=...``. It serves its tree only when the query string carries
``Signature=good`` (403 otherwise), honours ``Range: bytes=N-`` with 206, and can be told
to cut one file's transfer after K bytes or to serve corrupt bytes for a file.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "download.sh"
BASH = shutil.which("bash") or "/bin/bash"

pytestmark = pytest.mark.skipif(
    shutil.which("wget") is None or shutil.which("md5sum") is None,
    reason="download.sh tests need wget and md5sum",
)

SHARDS = {"7b": 1, "13b": 2, "70b": 8}
MODEL_DIRS = [
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-2-7b-chat",
    "llama-2-13b-chat",
    "llama-2-70b-chat",
]
TOP_FILES = ["LICENSE", "USE_POLICY.md", "tokenizer.model", "tokenizer_checklist.chk"]
SHARD_SIZE = 48 * 1024
TIMEOUT = 60


def model_files(model_dir: str) -> list[str]:
    size = model_dir.removeprefix("llama-2-").split("-")[0]
    shards = [f"{model_dir}/consolidated.{i:02d}.pth" for i in range(SHARDS[size])]
    return [*shards, f"{model_dir}/params.json", f"{model_dir}/checklist.chk"]


def make_tree(seed: int = 0) -> dict[str, bytes]:
    """Fake release: random bytes, with md5 checklists computed here."""
    rng = random.Random(seed)
    tree: dict[str, bytes] = {
        "LICENSE": b"LLAMA 2 COMMUNITY LICENSE AGREEMENT (test copy)\n",
        "USE_POLICY.md": b"# Llama 2 Acceptable Use Policy (test copy)\n",
        "tokenizer.model": rng.randbytes(5000),
    }
    tree["tokenizer_checklist.chk"] = md5_line(tree["tokenizer.model"], "tokenizer.model")
    for model_dir in MODEL_DIRS:
        checklist = b""
        for rel in model_files(model_dir)[:-1]:
            name = rel.split("/", 1)[1]
            if name == "params.json":
                data = b'{"dim": 4096, "n_layers": 32, "n_heads": 32, "norm_eps": 1e-05}\n'
            else:
                data = rng.randbytes(SHARD_SIZE + rng.randrange(1000))
            tree[rel] = data
            checklist += md5_line(data, name)
        tree[f"{model_dir}/checklist.chk"] = checklist
    return tree


def md5_line(data: bytes, name: str) -> bytes:
    return f"{hashlib.md5(data).hexdigest()}  {name}\n".encode()


@dataclass
class Request:
    path: str
    query: str  # decoded query string
    range: str | None
    status: int


@dataclass
class FakeMetaServer:
    tree: dict[str, bytes]
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes, once
    corrupt: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, query: str = "Policy=eyJTdGF0ZW1lbnQiOlt7IlJl&Signature=good&Key-Pair-Id=K2ABC") -> str:
        return f"http://127.0.0.1:{self.port}/*?{query}"

    def paths(self) -> list[str]:
        with self.lock:
            return [r.path for r in self.requests]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()


def make_handler(server: FakeMetaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def record(self, path: str, query: str, status: int) -> None:
            with server.lock:
                server.requests.append(Request(path, query, self.headers.get("Range"), status))

        def send_plain(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            path = unquote(parts.path).lstrip("/")
            query = unquote(parts.query)
            signature = parse_qs(parts.query, keep_blank_values=True).get("Signature")
            if signature != ["good"]:
                self.record(path, query, 403)
                self.send_plain(403, b"<Error><Code>AccessDenied</Code></Error>")
                return
            if path not in server.tree:
                self.record(path, query, 404)
                self.send_plain(404, b"<Error><Code>NoSuchKey</Code></Error>")
                return
            data = server.tree[path]
            if path in server.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            range_header = self.headers.get("Range")
            if range_header:
                assert range_header.startswith("bytes=") and range_header.endswith("-"), range_header
                start = int(range_header[len("bytes=") : -1])
                if start >= len(data):
                    self.record(path, query, 416)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
            else:
                status = 200
            self.record(path, query, status)
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            with server.lock:
                cut = server.cut_after.pop(path, None)
            if cut is not None:
                # Announce the whole length, send part of it, then drop the connection.
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server() -> Iterator[FakeMetaServer]:
    fake = FakeMetaServer(make_tree())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    httpd.daemon_threads = True
    fake.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    path.mkdir()
    return path


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_") and not k.lower().endswith("_proxy")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)  # no ~/.wgetrc or ~/.wget-hsts of the user's
    env.update(extra)
    return env


def run_script(
    cwd: Path,
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        cwd=cwd,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        env=env if env is not None else script_env(cwd.parent),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def expected_files(*model_dirs: str) -> set[str]:
    files = set(TOP_FILES)
    for model_dir in model_dirs:
        files.update(model_files(model_dir))
    return files


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def assert_downloaded(target: Path, server: FakeMetaServer, *model_dirs: str) -> None:
    assert files_under(target) == expected_files(*model_dirs)
    for rel in expected_files(*model_dirs):
        assert (target / rel).read_bytes() == server.tree[rel], rel


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def test_help() -> None:
    result = subprocess.run([BASH, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0
    for word in (
        "--url",
        "--models",
        "--target-dir",
        "LLAMA_DOWNLOAD_URL",
        "LLAMA_MODELS",
        "LLAMA_TARGET_DIR",
        "70B-chat",
    ):
        assert word in result.stdout


def test_full_download_of_two_models_interactive(server: FakeMetaServer, target: Path) -> None:
    result = ok(run_script(target, stdin=f"{server.url()}\n7B,13B-chat\n"))
    assert_downloaded(target, server, "llama-2-7b", "llama-2-13b-chat")
    assert "All done" in result.stdout
    assert all(r.status == 200 for r in server.requests)


def test_only_requested_models_are_fetched(server: FakeMetaServer, target: Path) -> None:
    ok(run_script(target, stdin=f"{server.url()}\n  70b-CHAT \n"))
    assert_downloaded(target, server, "llama-2-70b-chat")
    assert sorted(server.paths()) == sorted(expected_files("llama-2-70b-chat"))
    for other in MODEL_DIRS:
        if other != "llama-2-70b-chat":
            assert not (target / other).exists()


def test_enter_selects_all_models(server: FakeMetaServer, target: Path) -> None:
    ok(run_script(target, stdin=f"{server.url()}\n\n"))
    assert_downloaded(target, server, *MODEL_DIRS)


def test_resume_within_a_run_after_a_cut(server: FakeMetaServer, target: Path) -> None:
    shard = "llama-2-7b/consolidated.00.pth"
    server.cut_after[shard] = 10_000
    ok(run_script(target, "--url", server.url(), "--models", "7b"))
    ranges = [r.range for r in server.requests if r.path == shard]
    assert ranges == [None, "bytes=10000-"]
    assert_downloaded(target, server, "llama-2-7b")


def test_rerun_resumes_an_interrupted_download(server: FakeMetaServer, target: Path) -> None:
    shard = "llama-2-13b/consolidated.01.pth"
    server.cut_after[shard] = 20_000
    first = run_script(target, "--url", server.url(), "--models", "13B", "--tries", "1")
    assert first.returncode != 0
    assert "run the script again to resume" in first.stderr.lower()
    assert not (target / shard).exists()
    assert (target / f"{shard}.part").stat().st_size == 20_000
    assert (target / "llama-2-13b/consolidated.00.pth").read_bytes() == server.tree["llama-2-13b/consolidated.00.pth"]

    server.clear()
    ok(run_script(target, "--url", server.url(), "--models", "13B"))
    assert [r.range for r in server.requests if r.path == shard] == ["bytes=20000-"]
    assert [r.status for r in server.requests if r.path == shard] == [206]
    # Verified files are not fetched again; only the rest of the cut shard and params.json.
    assert sorted(server.paths()) == [shard, "llama-2-13b/params.json"]
    assert_downloaded(target, server, "llama-2-13b")


def test_corrupt_shard_fails_and_leaves_no_complete_looking_file(server: FakeMetaServer, target: Path) -> None:
    shard = "llama-2-13b/consolidated.01.pth"
    server.corrupt.add(shard)
    result = run_script(target, "--url", server.url(), "--models", "13b")
    assert result.returncode == 5
    assert any("checksum mismatch" in line and shard in line for line in result.stderr.splitlines())
    assert not (target / shard).exists()
    assert not (target / f"{shard}.part").exists()
    # It stops at the bad shard: params.json is not fetched.
    assert "llama-2-13b/params.json" not in server.paths()


def test_rerun_after_corrupt_shard_succeeds(server: FakeMetaServer, target: Path) -> None:
    shard = "llama-2-7b/consolidated.00.pth"
    server.corrupt.add(shard)
    assert run_script(target, "--url", server.url(), "--models", "7b").returncode == 5
    server.corrupt.clear()
    server.clear()
    ok(run_script(target, "--url", server.url(), "--models", "7b"))
    assert sorted(server.paths()) == [shard, "llama-2-7b/params.json"]
    assert_downloaded(target, server, "llama-2-7b")


@pytest.mark.parametrize("signature", ["expired", "wrong%2Bsignature", ""])
def test_expired_or_wrong_link_stops_at_once(server: FakeMetaServer, target: Path, signature: str) -> None:
    url = server.url(f"Policy=abc&Signature={signature}&Key-Pair-Id=K2ABC")
    result = run_script(target, stdin=f"{url}\n7B\n")
    assert result.returncode == 4
    assert "expired" in result.stderr
    assert "https://llama.meta.com/llama-downloads/" in result.stderr
    assert server.paths() == ["LICENSE"]
    assert files_under(target) == set()


def test_link_expiring_midway_keeps_verified_files(server: FakeMetaServer, target: Path) -> None:
    ok(run_script(target, "--url", server.url(), "--models", "7b"))
    server.clear()
    url = server.url("Policy=abc&Signature=expired&Key-Pair-Id=K2ABC")
    result = run_script(target, "--url", url, "--models", "7b,13b")
    assert result.returncode == 4
    assert "expired" in result.stderr
    assert server.paths() == ["llama-2-13b/checklist.chk"]
    assert_downloaded(target, server, "llama-2-7b")


def test_url_with_shell_metacharacters(server: FakeMetaServer, tmp_path: Path, target: Path) -> None:
    marker = tmp_path / "pwned"
    nasty = (
        f"Policy=$(touch {marker}1)&Extra=`touch {marker}2`;touch {marker}3 & "
        f"a='b c'\"d\"|e>{marker}4<f*?[x]{{y,z}}!$HOME\\n"
        "&Signature=good&Key-Pair-Id=K2ABC"
    )
    url = server.url(nasty)
    ok(run_script(target, stdin=f"{url}\n7B\n"))
    ok(run_script(target, "--url", url, "--models", "7B"))  # rerun via the flag: nothing to do
    assert_downloaded(target, server, "llama-2-7b")
    assert not list(tmp_path.glob("pwned*"))
    assert not list(target.glob("pwned*"))
    assert not list(REPO_ROOT.glob("pwned*"))
    # The query string reached the server intact.
    assert {r.query for r in server.requests} == {nasty}


def test_non_interactive_with_flags(server: FakeMetaServer, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    dest = tmp_path / "weights dir"  # created by the script; has a space
    ok(run_script(elsewhere, "--url", server.url(), "--models", "7B-chat,13b", "--target-dir", str(dest)))
    assert_downloaded(dest, server, "llama-2-7b-chat", "llama-2-13b")
    assert files_under(elsewhere) == set()


def test_non_interactive_with_environment(server: FakeMetaServer, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    dest = tmp_path / "weights"
    env = script_env(
        tmp_path,
        LLAMA_DOWNLOAD_URL=server.url(),
        LLAMA_MODELS="13B-chat",
        LLAMA_TARGET_DIR=str(dest),
    )
    ok(run_script(elsewhere, env=env))  # stdin is closed: no prompt can be answered
    assert_downloaded(dest, server, "llama-2-13b-chat")


def test_missing_model_list_without_a_terminal_is_an_error(server: FakeMetaServer, target: Path) -> None:
    result = run_script(target, "--url", server.url())
    assert result.returncode == 2
    assert "--models" in result.stderr
    assert server.requests == []


@pytest.mark.parametrize("how", ["flag", "prompt"])
def test_unknown_model_fails_before_any_request(server: FakeMetaServer, target: Path, how: str) -> None:
    if how == "flag":
        result = run_script(target, "--url", server.url(), "--models", "7B,42B")
    else:
        result = run_script(target, stdin=f"{server.url()}\n7B,42B\n")
    assert result.returncode == 2
    assert "42b" in result.stderr
    assert "13B-chat" in result.stderr  # lists the valid names
    assert server.requests == []
    assert files_under(target) == set()


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://127.0.0.1:9/no-star?Signature=good", "no '*'"), ("'https://x/*?a=b'", "https://")],
)
def test_malformed_url_is_rejected(target: Path, url: str, message: str) -> None:
    result = run_script(target, "--url", url, "--models", "7b")
    assert result.returncode == 2
    assert message in result.stderr


def test_rerun_skips_verified_files(server: FakeMetaServer, target: Path) -> None:
    ok(run_script(target, "--url", server.url(), "--models", "7b,13b"))
    server.clear()
    result = ok(run_script(target, "--url", server.url(), "--models", "7b,13b"))
    assert server.requests == []
    assert "already downloaded and verified" in result.stdout

    # A missing file and a locally damaged one are fetched again; nothing else is.
    (target / "llama-2-13b/consolidated.00.pth").unlink()
    damaged = target / "llama-2-7b/consolidated.00.pth"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)
    server.clear()
    ok(run_script(target, "--url", server.url(), "--models", "7b,13b"))
    assert sorted(set(server.paths())) == [
        "llama-2-13b/consolidated.00.pth",
        "llama-2-7b/consolidated.00.pth",
    ]
    assert_downloaded(target, server, "llama-2-7b", "llama-2-13b")


@pytest.mark.parametrize("missing", ["wget", "md5sum"])
def test_missing_prerequisite(server: FakeMetaServer, tmp_path: Path, target: Path, missing: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = ["bash", "wget", "md5sum", "awk", "grep", "mkdir", "mktemp", "mv", "rm", "tee", "tr"]
    for tool in tools:
        found = shutil.which(tool)
        if tool != missing and found:
            (bin_dir / tool).symlink_to(found)
    env = script_env(tmp_path, PATH=str(bin_dir))
    result = run_script(target, "--url", server.url(), "--models", "7b", env=env)
    assert result.returncode == 3
    assert missing in result.stderr
    assert "required" in result.stderr
    assert server.requests == []
