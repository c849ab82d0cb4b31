"""Hub sources through the real huggingface_hub code: an offline cache laid out as huggingface_hub lays it out,
and a local fake Hub server for the errors the Hub answers with. Nothing here reaches the network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from helpers import HUB_FILES, adapter_files, cache_repo, run_ctm
from safetensors.torch import load_file

from ctm_cli.errors import InputError, UsageError
from ctm_cli.sources import HubRef, locate_source, parse_hub_ref

ROOT = Path(__file__).parents[1]


@pytest.fixture
def pair(make_adapter) -> list[Path]:
    return [make_adapter(r=8, alpha=16, seed=41), make_adapter(r=4, alpha=8, seed=42)]


@pytest.fixture
def hub_pair(hub_cache, pair) -> dict[str, str]:
    """org/a (main) and org/b with two commits: v1 = the second adapter, main = the first one."""
    return {
        "a": cache_repo(hub_cache, "org/a", adapter_files(pair[0])),
        "b-v1": cache_repo(hub_cache, "org/b", adapter_files(pair[1]), refs=("v1",)),
        "b-main": cache_repo(hub_cache, "org/b", {**adapter_files(pair[0]), "notes.txt": b"later"}),
    }


def single_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ctm: error:"), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("org/name", HubRef("org/name")),
        ("org/name@v1.0", HubRef("org/name", "v1.0")),
        ("hf://org/name", HubRef("org/name")),
        ("hf://org/name@0123abc/sub/dir", HubRef("org/name", "0123abc", "sub/dir")),
        ("org/name/sub", HubRef("org/name", None, "sub")),
        ("name-only", None),
        ("a b/c", None),
    ],
)
def test_parse_hub_ref(source, expected):
    assert parse_hub_ref(source) == expected


def test_parse_hub_ref_revision_from_recipe():
    assert parse_hub_ref("org/name", "v2") == HubRef("org/name", "v2")
    assert parse_hub_ref("org/name@v2", "v2") == HubRef("org/name", "v2")
    with pytest.raises(UsageError, match="names revision 'v1' but revision 'v2'"):
        parse_hub_ref("org/name@v1", "v2")


def test_inspect_from_offline_cache(hub_pair, pair):
    result = run_ctm("inspect", "org/a", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert Path(info["path"]).parent.name == "snapshots" and Path(info["path"]).name == hub_pair["a"]
    local = json.loads(run_ctm("inspect", pair[0], "--json").stdout)
    assert {k: v for k, v in info.items() if k != "path"} == {k: v for k, v in local.items() if k != "path"}


def test_merge_from_offline_cache(hub_pair, pair, tmp_path):
    hub_out, local_out = tmp_path / "hub", tmp_path / "local"
    result = run_ctm("merge", "org/a", f"org/b@{hub_pair['b-v1']}", "--method", "cat", "-o", hub_out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [i["revision"] for i in report["inputs"]] == [hub_pair["a"], hub_pair["b-v1"]]
    assert run_ctm("merge", *pair, "--method", "cat", "-o", local_out).exit_code == 0
    hub_tensors = load_file(str(hub_out / "adapter_model.safetensors"))
    local_tensors = load_file(str(local_out / "adapter_model.safetensors"))
    assert hub_tensors.keys() == local_tensors.keys()
    assert all(torch.equal(hub_tensors[k], local_tensors[k]) for k in hub_tensors)

    recipe = yaml.safe_load((hub_out / "recipe.yaml").read_text())
    assert recipe["adapters"] == [
        {"source": "org/a", "revision": hub_pair["a"], "weight": 1.0},
        {"source": "org/b", "revision": hub_pair["b-v1"], "weight": 1.0},
    ]
    assert report["recipe"] == recipe


def test_branch_tag_and_commit_revisions(hub_pair):
    assert locate_source("org/b").commit == hub_pair["b-main"]
    assert locate_source("org/b@v1").commit == hub_pair["b-v1"]
    assert locate_source("org/b", "v1").commit == hub_pair["b-v1"]
    pinned = locate_source(f"hf://org/b@{hub_pair['b-main']}")
    assert pinned.commit == hub_pair["b-main"] and (pinned.folder / "notes.txt").is_file()
    assert pinned.name == "org/b"


def test_subfolder(hub_cache, pair):
    commit = cache_repo(hub_cache, "org/many", {**adapter_files(pair[0], "math/"), **adapter_files(pair[1], "code/")})
    source = locate_source("hf://org/many@main/code")
    assert source.folder.name == "code" and source.commit == commit
    assert source.name == "hf://org/many/code"
    result = run_ctm("inspect", "hf://org/many/code", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["r"] == 4


def test_local_path_wins(hub_pair, pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(pair[1], tmp_path / "org" / "a")
    source = locate_source("org/a")
    assert source.hub is None and source.folder == Path("org/a")
    with pytest.raises(UsageError, match="revision"):
        locate_source("org/a", "v1")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("org/missing", "org/missing: not a local folder, and not in the Hugging Face cache"),
        ("org/a@no-such-tag", "org/a@no-such-tag: not a local folder, and not in the Hugging Face cache"),
        ("hf://org/missing@v1/sub", "hf://org/missing@v1/sub: not a local folder"),
    ],
)
def test_missing_offline_is_one_clear_line(hub_pair, pair, tmp_path, source, message):
    result = run_ctm("merge", "org/a", source, "-o", tmp_path / "out", "--rank", "4")
    assert result.exit_code == 3
    line = single_error_line(result.stderr)
    assert message in line and "HF_HUB_OFFLINE=1" in line
    assert not (tmp_path / "out").exists()


def test_hub_repo_without_adapter(hub_cache, pair):
    commit = cache_repo(hub_cache, "org/model", {"README.md": b"not an adapter", "config.json": b"{}"})
    result = run_ctm("inspect", "org/model")
    assert result.exit_code == 3
    line = single_error_line(result.stderr)
    assert line == f"ctm: error: org/model: no adapter_config.json in org/model at commit {commit}; not a PEFT adapter"


def test_only_adapter_files_are_required(hub_pair, hub_cache):
    """A cached tree listing that names files missing from the snapshot: only adapter files matter."""
    cache_module = pytest.importorskip("huggingface_hub._tree_cache")
    storage = hub_cache / "models--org--a"
    snapshot = storage / "snapshots" / hub_pair["a"]
    entries = {name: cache_module.TreeCacheEntry(size=1, blob_id="0" * 40) for name in ("optimizer.pt", *HUB_FILES)}
    cache_module.write_tree_cache(str(storage), hub_pair["a"], entries)
    assert locate_source("org/a").folder == snapshot  # optimizer.pt is not an adapter file: not needed
    (snapshot / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="cached snapshot is incomplete"):
        locate_source("org/a")


def test_environment_variables_alone(hub_pair, hub_cache):
    """In a fresh process, huggingface_hub finds the cache from HF_HOME and stays offline from HF_HUB_OFFLINE alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_TOKEN")}
    env["PYTHONPATH"] = str(ROOT)
    script = (
        "import sys\n"
        "from ctm_cli.sources import locate_source\n"
        "print(locate_source(sys.argv[1]).folder)\n"
        "try:\n"
        "    locate_source('org/missing')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    command = [sys.executable, "-c", script, "org/b@v1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    folder, error = done.stdout.splitlines()
    assert Path(folder) == hub_cache / "models--org--b" / "snapshots" / hub_pair["b-v1"]
    assert error.startswith("InputError org/missing: not a local folder, and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in error


class _FakeHub(BaseHTTPRequestHandler):
    """Answers every request like the Hub does for one failure: status plus X-Error-Code headers."""

    answer: ClassVar[tuple[int, dict[str, str]]] = (404, {})
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        status, headers = self.answer
        body = json.dumps({"error": "fake hub"}).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    """An online Hub at a local address, answering with `_FakeHub.answer`."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(_FakeHub, "seen", [])
    yield _FakeHub
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("status", "headers", "message"),
    [
        (404, {"X-Error-Code": "RepoNotFound"}, "not a local folder, and no such Hub repo or no access to it"),
        (401, {}, "the Hub refused the request (HTTP 401); check HF_TOKEN"),
        (403, {"X-Error-Code": "GatedRepo"}, "gated Hub repo; accept its terms on the Hub and set HF_TOKEN"),
        (404, {"X-Error-Code": "RevisionNotFound"}, "revision 'v9' not found in Hub repo org/private"),
    ],
    ids=["not-found", "unauthorized", "gated", "no-revision"],
)
def test_hub_errors_are_one_clear_line(fake_hub, monkeypatch, tmp_path, status, headers, message):
    monkeypatch.setattr(fake_hub, "answer", (status, headers))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    result = run_ctm("inspect", "org/private@v9")
    assert result.exit_code == 3
    assert single_error_line(result.stderr).startswith(f"ctm: error: org/private@v9: {message}")
    path, authorization = fake_hub.seen[0]
    assert path.startswith("/api/models/org/private/revision/v9")
    assert authorization == "Bearer hf_fake_token_for_tests"
