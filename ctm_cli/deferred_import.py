"""Deferred imports: `import torch` binds a module that runs torch's (slow) initialisation only when one of its
attributes is first used, so the commands that never compute (`--help`, `methods`, `inspect`, `--dry-run`) start
without paying for it."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

_LazyModule: Any = importlib.util._LazyModule  # type: ignore[attr-defined]


class _DeferredModule(_LazyModule):  # type: ignore[misc]
    """importlib's lazy module, except that reading `__spec__` does not run it: an `import` statement reads it (to
    check that the module is not half-initialised), and should bind the module, not run it."""

    def __getattribute__(self, attr: str) -> Any:
        if attr == "__spec__":
            return object.__getattribute__(self, "__dict__")["__spec__"]
        return super().__getattribute__(attr)


def defer_import(name: str) -> None:
    """Register `name` in sys.modules as a module whose code runs on the first use of one of its attributes
    (importlib's LazyLoader); later `import name` statements bind it at no cost. A module already imported, or one
    that is not installed, is left alone."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.__class__ = _DeferredModule


def is_loaded(name: str) -> bool:
    """Whether `name`'s code has run: absent from sys.modules, or still waiting there (deferred), means no."""
    module = sys.modules.get(name)  # type(), not isinstance(): reading __class__ would run the module
    return module is not None and not issubclass(type(module), _LazyModule)
