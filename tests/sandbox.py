"""A fresh folder that holds everything one `ctm` run could touch, to prove that a refused input changes nothing.

The folder holds the run's inputs, its output location, its working directory, HOME, the temporary folder
and the Hugging Face cache (the environment and the in-process settings point there). `refuses` snapshots
the whole tree (every entry's kind, mode, size, modification time and content hash) before and after the
run: a refusal must leave it identical, so no file outside the fresh folder was created or changed either,
as every place ctm writes to by default lies inside it."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import run_ctm

ROOT = Path(__file__).parents[1]
Snapshot = dict[str, tuple]


def snapshot_tree(root: Path) -> Snapshot:
    """Every entry under `root` (hidden ones too): kind, permission bits, size, mtime and sha256 of files."""
    entries: Snapshot = {}
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = Path(folder) / name
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            entries[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest, link)
    return entries


class Sandbox:
    """The fresh folder of one test, with the run's working directory, HOME, TMPDIR and Hub cache inside."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        from huggingface_hub import constants

        self.root = root
        for name in ("cwd", "home", "tmp", "hf/hub", "inputs", "outputs"):
            (root / name).mkdir(parents=True)
        self.cwd, self.inputs, self.outputs = root / "cwd", root / "inputs", root / "outputs"
        monkeypatch.chdir(self.cwd)
        for variable, value in (
            ("HOME", root / "home"),
            ("TMPDIR", root / "tmp"),
            ("HF_HOME", root / "hf"),
            ("XDG_CACHE_HOME", root / "home" / ".cache"),
        ):
            monkeypatch.setenv(variable, str(value))
        monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.delenv("CTM_DEBUG", raising=False)

    def copy(self, folder: Path, name: str) -> Path:
        """A private, writable copy of an adapter folder inside the sandbox."""
        return Path(shutil.copytree(folder, self.inputs / name, copy_function=shutil.copyfile))

    @property
    def out(self) -> Path:
        """The output location a run is given (it must never appear)."""
        return self.outputs / "out"

    def refuses(self, args: list, code: int, *culprits: str) -> str:
        """Run `ctm ARGS`: expect exit `code`, exactly one stderr line `ctm: error: ...` holding every culprit
        (the file or option at fault and the cause), and the sandbox unchanged; returns the line."""
        before = snapshot_tree(self.root)
        result = run_ctm(*args)
        after = snapshot_tree(self.root)
        assert result.exit_code == code, (result.exit_code, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("ctm: error: "), repr(result.stderr)
        line = result.stderr.rstrip("\n")
        for culprit in culprits:
            assert culprit in line, (culprit, line)
        assert "\x1b" not in result.stderr and "\r" not in result.stderr
        changed = sorted(set(before.items()) ^ set(after.items()))
        assert not changed, changed
        print("\nLINE", line)
        return line



def run_as_user(args: list) -> subprocess.CompletedProcess:
    """`python -m ctm_cli ARGS` in a subprocess whose file accesses are checked as for an ordinary user: root
    bypasses permission bits (CAP_DAC_OVERRIDE), so as root it runs under `setpriv` without that capability
    and the kernel really refuses (the test is skipped where setpriv is missing)."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is not available to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "ctm_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
