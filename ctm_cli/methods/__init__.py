"""The merge methods: the registry (`registry.py`) and one module per method, each registering itself on import."""

from ctm_cli.methods import cat, core, ctm, iso_cts, knots, lego, mtc, robustmerge  # noqa: F401 (they register)
from ctm_cli.methods.registry import (
    METHODS,
    CoreMemory,
    FactorGroup,
    MergeResult,
    MergeSettings,
    Method,
    get_method,
    resolve_settings,
)

__all__ = [
    "METHODS",
    "CoreMemory",
    "FactorGroup",
    "MergeResult",
    "MergeSettings",
    "Method",
    "get_method",
    "resolve_settings",
]
