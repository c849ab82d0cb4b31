"""The merge's stages as progress events (what the terminal display shows), and nothing extra off a terminal."""

from __future__ import annotations

from pathlib import Path

from helpers import run_ctm

from ctm_cli import progress
from ctm_cli.pipeline import MergeRequest, prepare, run_merge
from ctm_cli.recipe import build_recipe


def test_a_merge_tells_its_stages_in_order(make_adapter, tmp_path: Path):
    """Reading (bytes, up to the factors' total), merging (modules, up to all of them) and within it the core spaces
    (every module) and HOOI's sweeps (with the modules still iterating), then writing, in that order."""
    folders = [str(make_adapter(r=4, alpha=8, seed=s)) for s in (71, 72)]
    given = {"sources": folders, "rank": 4, "params": {"frame_rank": 4}, "output": str(tmp_path / "out")}
    events: list[progress.Event] = []
    with progress.listening(events.append):
        run_merge(prepare(MergeRequest(build_recipe(None, given))))
    first = {}
    for index, event in enumerate(events):
        first.setdefault(event.stage, index)
    assert sorted(first, key=first.__getitem__) == ["reading", "merging", "core spaces", "HOOI", "writing"]
    by_stage = {stage: [e for e in events if e.stage == stage] for stage in first}
    reading = by_stage["reading"]
    assert [e.done for e in reading] == sorted(e.done for e in reading)
    assert reading[-1].done == reading[-1].total == 2 * sum(
        (4 * (shape[0] + shape[1])) * 4 for shape in _shapes(folders[0])
    )
    assert sum(e.done for e in by_stage["core spaces"]) == 14 and all(e.added for e in by_stage["core spaces"])
    sweeps = by_stage["HOOI"]
    assert [e.done for e in sweeps] == list(range(1, len(sweeps) + 1))
    assert sweeps[0].detail == "14 of 14 modules still iterating" and sweeps[-1].detail.startswith("0 of 14")
    assert (by_stage["merging"][-1].done, by_stage["merging"][-1].total) == (14, 14)
    assert events[-1] == progress.Event("writing", 1, 1, detail=str(tmp_path / "out"))


def _shapes(folder: str) -> list[tuple[int, int]]:
    """(out, in) of every LoRA module of an adapter."""
    from ctm_cli.adapter import Adapter

    return [(m.out_features, m.in_features) for m in Adapter(Path(folder)).modules.values()]


def test_off_a_terminal_a_merge_prints_its_summary_only(make_adapter, tmp_path: Path):
    folders = [make_adapter(r=4, alpha=8, seed=s) for s in (71, 72)]
    result = run_ctm("merge", *folders, "--rank", "4", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [line for line in result.stderr.splitlines() if line.startswith("merged 2")]
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    quiet = run_ctm("merge", *folders, "--rank", "4", "-o", tmp_path / "out", "--force", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == quiet.stdout == ""
