"""One module of a merge as every part of ctm sees it: its shape and each input's rank (no I/O, no math)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModuleSpec:
    """A module of the merge: its shape and each adapter's rank (0 for an adapter that lacks it)."""

    name: str
    out_features: int
    in_features: int
    ranks: tuple[int, ...]
    embedding: bool

    @property
    def total_rank(self) -> int:
        """R = Σ r_t for this module."""
        return sum(self.ranks)
