"""What `ctm methods` shows: the method and rule registries as plain JSON-able data."""

from __future__ import annotations

from typing import Any

from ctm_cli.methods import METHODS
from ctm_cli.params import Param
from ctm_cli.rules import RULES


def _params(params: dict[str, Param]) -> dict[str, dict[str, Any]]:
    return {name: {"default": p.default, "range": p.range_text(), "doc": p.doc} for name, p in sorted(params.items())}


def catalog() -> dict[str, list[dict[str, Any]]]:
    """Every method (doc, output rank, default rule, linear-rule need, parameters) and rule (doc, linearity,
    parameters)."""
    return {
        "methods": [
            {
                "name": m.name,
                "doc": m.doc,
                "rank": m.rank_doc,
                "default_rule": m.default_rule,
                "needs_linear_rule": m.needs_linear_rule,
                "params": _params(m.params),
            }
            for m in sorted(METHODS.values(), key=lambda m: m.name)
        ],
        "rules": [
            {"name": r.name, "doc": r.doc, "linear": r.linear, "params": _params(r.params)}
            for r in sorted(RULES.values(), key=lambda r: r.name)
        ],
    }
