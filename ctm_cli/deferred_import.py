"""Deferred imports: `import torch` binds a module that runs torch's (slow) initialisation only when one of its
attributes is first used, so the commands that never compute (`--help`, `methods`, `inspect`, `--dry-run`) start
without paying for it; yaml is bound the same way by recipe.py, which reads and writes recipes."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class _DeferredModule(types.ModuleType):
    """Stands in sys.modules for a module not run yet. The first attribute it lacks (anything but the spec and the
    names every module has) runs the real import, with the stand-in taken out of sys.modules first, so the module
    initialises exactly as a plain `import` would (no lazy loader is active while its code runs); the stand-in then
    holds the real module's names and forwards the rest to it."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:  # the first use: run the real import, and take its names once
            del sys.modules[name]
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules.setdefault(name, self)
                raise
            self.__dict__.update(real.__dict__)
            return getattr(real, attr)
        return getattr(importlib.import_module(name), attr)  # a name the real module gained later, or lacks


def defer_import(name: str) -> None:
    """Register `name` in sys.modules as a stand-in whose module runs on the first use of one of its attributes;
    later `import name` statements bind the stand-in at no cost. A module already imported, or one that is not
    installed, is left alone."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    stand_in = _DeferredModule(name)
    stand_in.__spec__ = spec
    stand_in.__loader__ = spec.loader
    stand_in.__file__ = spec.origin
    stand_in.__package__ = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
    sys.modules[name] = stand_in


def deferred_module(name: str) -> types.ModuleType:
    """Module `name` for one importer's own use, imported at the first use of one of its attributes; sys.modules
    is left alone (elsewhere, `import name` runs the real import as usual), so no entry point has to register it
    before the importer is itself imported."""
    return _DeferredModule(name)


def is_loaded(name: str) -> bool:
    """Whether `name`'s code has run: absent from sys.modules, or still a stand-in there (deferred), means no."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _DeferredModule)
