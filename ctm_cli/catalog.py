"""What `ctm methods` shows: the method and rule registries as plain JSON-able data."""

from __future__ import annotations

from typing import Any

from ctm_cli.methods import METHODS
from ctm_cli.params import Param
from ctm_cli.rules import RULES


def _params(params: dict[str, Param]) -> dict[str, dict[str, Any]]:
    return {name: {"default": p.default, "range": p.range_text(), "doc": p.doc} for name, p in sorted(params.items())}


def catalog() -> dict[str, list[dict[str, Any]]]:
    """Every method (doc, output rank in words and as fields, default rule, linear-rule need, whether β acts on
    it, parameters) and rule (doc, linearity, parameters)."""
    return {
        "methods": [
            {
                "name": m.name,
                "doc": m.doc,
                "rank": m.rank_doc,
                "fixed_rank": m.fixed_rank.text if m.fixed_rank is not None else None,
                "zero_is_full": m.zero_is_full,
                "default_rule": m.default_rule,
                "needs_linear_rule": m.needs_linear_rule,
                "uses_beta": m.uses_beta,
                "params": _params(m.params),
            }
            for m in sorted(METHODS.values(), key=lambda m: m.name)
        ],
        "rules": [
            {"name": r.name, "doc": r.doc, "linear": r.linear, "params": _params(r.params)}
            for r in sorted(RULES.values(), key=lambda r: r.name)
        ],
    }
