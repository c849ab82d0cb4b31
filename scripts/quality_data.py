"""Tasks of the merge-quality benchmark: reading a task folder, carving the validation split, cached tokens.

A task folder holds `labels.json` ({task: {"labels": [...], ...}}) and `<task>.jsonl` with one
`{"text", "label", "split": "train"|"test"}` per line. The validation split is carved from train with a
seed fixed per task, so it never changes with the training seed and never touches test.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

VAL_SEED = 20240601  # fixed: the validation carve must not move with --seeds


@dataclass(frozen=True)
class Tokens:
    """Token ids (N, L) padded to the maximum length, and each row's true length."""

    ids: torch.Tensor
    lengths: torch.Tensor

    def subset(self, rows: list[int]) -> Tokens:
        """The given rows only."""
        index = torch.tensor(rows, dtype=torch.long)
        return Tokens(self.ids[index], self.lengths[index])


@dataclass(frozen=True)
class Split:
    """One split of one task: its tokens and labels."""

    tokens: Tokens
    labels: torch.Tensor


@dataclass(frozen=True)
class Task:
    """A classification task: class names and its train / val / test splits."""

    name: str
    class_names: list[str]
    splits: dict[str, Split]


@dataclass(frozen=True)
class DataLimits:
    """How much of each task to use: example caps and the size of the validation carve."""

    max_train: int | None = None
    max_test: int | None = None
    val_size: int = 400


def read_task_names(folder: Path) -> dict[str, list[str]]:
    """Task names in labels.json order, with their class names; errors name the file."""
    path = folder / "labels.json"
    try:
        catalog = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"bench_quality: error: cannot read {path}: {exc}") from None
    names = {}
    for task, info in catalog.items():
        if not (folder / f"{task}.jsonl").is_file():
            raise SystemExit(f"bench_quality: error: {path} lists {task!r} but {folder / (task + '.jsonl')} is missing")
        names[task] = list(info["labels"])
    return names


def carve_rows(name: str, train_rows: list[int], test_rows: list[int], limits: DataLimits) -> dict[str, list[int]]:
    """Row indices of train / val / test: train capped, then `val_size` rows carved from it, test capped.

    The shuffles are seeded from the task name alone, so the splits are the same for every run and seed.
    """
    rng = random.Random(VAL_SEED ^ zlib.crc32(name.encode()))
    train = list(train_rows)
    rng.shuffle(train)
    if limits.max_train is not None:
        train = train[: limits.max_train]
    val_size = min(limits.val_size, len(train) // 5)
    test = list(test_rows)
    if limits.max_test is not None and len(test) > limits.max_test:
        test = sorted(rng.sample(test, limits.max_test))
    return {"train": sorted(train[val_size:]), "val": sorted(train[:val_size]), "test": test}


def _tokenize_cached(path: Path, texts: list[str], tokenizer, max_length: int, cache: Path | None) -> Tokens:
    """Tokens of every text of a task file, read from the cache when the file, tokenizer and length match."""
    key = hashlib.sha256()
    key.update(path.read_bytes())
    key.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    key.update(f"{type(tokenizer).__name__}:{max_length}".encode())
    cached = None if cache is None else cache / f"{path.stem}-{key.hexdigest()[:16]}.pt"
    if cached is not None and cached.is_file():
        stored = torch.load(cached, weights_only=True)
        return Tokens(stored["ids"], stored["lengths"])
    encoded = tokenizer(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    tokens = Tokens(encoded["input_ids"].to(torch.int32), encoded["attention_mask"].sum(dim=1).to(torch.int32))
    if cached is not None:
        cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".tmp")
        torch.save({"ids": tokens.ids, "lengths": tokens.lengths}, partial)
        partial.replace(cached)
    return tokens


def load_task(
    folder: Path, name: str, class_names: list[str], tokenizer, max_length: int, limits: DataLimits, cache: Path | None
) -> Task:
    """One task with its three splits tokenized (through the cache)."""
    path = folder / f"{name}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    tokens = _tokenize_cached(path, [r["text"] for r in records], tokenizer, max_length, cache)
    labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
    bad = sorted({int(x) for x in labels.tolist()} - set(range(len(class_names))))
    if bad:
        raise SystemExit(f"bench_quality: error: {path} has label {bad[0]} but labels.json names {len(class_names)}")
    train = [i for i, r in enumerate(records) if r["split"] == "train"]
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    rows = carve_rows(name, train, test, limits)
    splits = {split: Split(tokens.subset(index), labels[index]) for split, index in rows.items()}
    return Task(name=name, class_names=class_names, splits=splits)
