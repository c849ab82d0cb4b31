"""A single-file LoRA (kohya, diffusers or LyCORIS `.safetensors`) read as an adapter: its modules, each as exact
LoRA factors under PEFT-like keys (`<module>.lora_A.weight`, `<module>.lora_B.weight`) that are built from the
stored tensors when read, and a config with the fields the rest of ctm reads."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ctm_cli.errors import IncompatibleError, InputError
from ctm_cli.formats.kinds import KINDS, REFUSED, Kind, LayoutError, kind_of
from ctm_cli.formats.styles import detect
from ctm_cli.patterns import MAX_NAME_LENGTH
from ctm_cli.peft_layout import CONFIG_NAME, FLOAT_DTYPES, SAFETENSORS_NAME, LoraModule
from ctm_cli.safetensors_format import SafetensorsFile

SUFFIX = ".safetensors"
FACTOR_KEYS = (".lora_A.weight", ".lora_B.weight")
# Metadata naming the base model a file was trained for, most specific first.
BASE_MODEL_METADATA = ("modelspec.architecture", "ss_base_model_version")


def locate(path: Path) -> Path | None:
    """The single-file LoRA that `path` names: a `.safetensors` file, or a folder without adapter_config.json that
    holds exactly one (other than a PEFT adapter_model.safetensors); None where it names anything else."""
    try:
        if path.suffix == SUFFIX and path.is_file():
            return path
        if not path.is_dir() or (path / CONFIG_NAME).exists():
            return None
        found = sorted(item for item in path.iterdir() if item.suffix == SUFFIX and item.is_file())
    except OSError:
        return None  # the PEFT reader names the problem
    if len(found) > 1:
        shown = ", ".join(item.name for item in found[:3])
        raise InputError(f"{path}: holds {len(found)} .safetensors files ({shown}, ...) and no {CONFIG_NAME}; "
                         "name the file to merge")
    return found[0] if found and found[0].name != SAFETENSORS_NAME else None


class SingleFile:
    """A single-file LoRA: its style, metadata, modules as LoRA factors (read lazily, one module's lift kept)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = SafetensorsFile(path)
        self.metadata = self._file.metadata()
        keys = self._file.names()
        style = detect(keys)
        if style is None:
            shown = next(iter(keys), "none")
            raise InputError(f"{path}: not a kohya, diffusers or LyCORIS LoRA (no known key style; first key: {shown})")
        self.style = style.name
        self._roles = self._group(keys, style.split)
        self.kinds: dict[str, str] = {}
        self.weight_shapes: dict[str, tuple[int, ...] | None] = {}
        self.modules = {name: self._module(name, roles) for name, roles in sorted(self._roles.items())}
        if not self.modules:
            raise InputError(f"{path}: no LoRA factors found")
        self._cache: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _group(self, keys: list[str], split: Callable[[str], tuple[str, str] | None]) -> dict[str, dict[str, str]]:
        """Each module's stored keys by factor role; refuses adapter types ctm cannot merge, naming why."""
        roles: dict[str, dict[str, str]] = {}
        for key in keys:
            if len(key) > MAX_NAME_LENGTH:
                raise InputError(f"{self.path}: tensor key of {len(key)} characters, more than {MAX_NAME_LENGTH}")
            module, role = split(key) or ("", "")
            if role in REFUSED:
                raise IncompatibleError(f"{self.path}: module {module} is {REFUSED[role]}; ctm merges LoRA, LoCon, "
                                        "LoHa and LoKr")
            roles.setdefault(module, {})[role] = key
        return roles

    def _module(self, name: str, keys: dict[str, str]) -> LoraModule:
        try:
            kind = kind_of(set(keys))
            layout = kind.layout({role: self._file.shape(key) for role, key in keys.items() if role != "alpha"})
        except LayoutError as exc:
            raise InputError(f"{self.path}: module {name}: {exc}") from exc
        for key in keys.values():
            if self._file.dtype(key) not in FLOAT_DTYPES:
                raise InputError(f"{self.path}: tensor {key} is not a float16/bfloat16/float32/float64 tensor")
        alpha = self._alpha(name, keys.get("alpha"))
        self.kinds[name] = kind.name
        self.weight_shapes[name] = layout.weight_shape
        scale = 1.0 if alpha is None or layout.alpha_rank is None else alpha / layout.alpha_rank
        return LoraModule(
            name=name,
            a_key=name + FACTOR_KEYS[0],
            b_key=name + FACTOR_KEYS[1],
            rank=layout.rank,
            alpha=alpha if alpha is not None else float(layout.alpha_rank or 1),
            scale=scale,
            out_features=layout.out_features,
            in_features=layout.in_features,
            embedding=False,
        )

    def _alpha(self, name: str, key: str | None) -> float | None:
        """The module's stored alpha (a one-element tensor), or None where there is none or it is 0 (kohya's
        lora.py reads an alpha of 0 as no alpha: scale 1)."""
        if key is None:
            return None
        tensor = self._file.get(key)
        if tensor.numel() != 1 or not math.isfinite(float(tensor.float().reshape(()))):
            raise InputError(f"{self.path}: module {name}: alpha {key} is not one finite number")
        return float(tensor.float().reshape(())) or None

    @property
    def config(self) -> dict[str, Any]:
        """The config fields ctm's reports read: the most common rank and alpha, and the base model the metadata
        names."""
        ranks = Counter(module.rank for module in self.modules.values())
        alphas = Counter(module.alpha for module in self.modules.values())
        base = next((self.metadata[key] for key in BASE_MODEL_METADATA if self.metadata.get(key)), None)
        return {
            "peft_type": "LORA",
            "r": ranks.most_common(1)[0][0],
            "lora_alpha": alphas.most_common(1)[0][0],
            "base_model_name_or_path": base,
            "target_modules": None,
        }

    def kind_counts(self) -> dict[str, int]:
        """How many modules of each kind (lora, locon_tucker, loha, lokr) the file holds."""
        return dict(Counter(self.kinds.values()))

    def rename(self, naming: Callable[[str], str | None]) -> list[str]:
        """Rename the modules with `naming` (to match another style's names); the names it cannot map are returned
        and their modules kept as they are."""
        unmapped = [name for name in self.modules if naming(name) is None]
        renamed = {name: naming(name) or name for name in self.modules}
        self._roles = {renamed[name]: roles for name, roles in self._roles.items()}
        self.kinds = {renamed[name]: kind for name, kind in self.kinds.items()}
        self.weight_shapes = {renamed[name]: shape for name, shape in self.weight_shapes.items()}
        self.modules = {
            renamed[name]: LoraModule(
                **{**vars(module), "name": renamed[name], "a_key": renamed[name] + FACTOR_KEYS[0],
                   "b_key": renamed[name] + FACTOR_KEYS[1]}
            )
            for name, module in self.modules.items()
        }
        return unmapped

    # -------------------------------------------------------------- the reader interface Adapter uses

    def _split(self, key: str) -> tuple[str, int]:
        for index, suffix in enumerate(FACTOR_KEYS):
            if key.endswith(suffix) and key[: -len(suffix)] in self.modules:
                return key[: -len(suffix)], index
        raise KeyError(key)

    def names(self) -> list[str]:
        """The factor keys of every module."""
        return [module.a_key for module in self.modules.values()] + [m.b_key for m in self.modules.values()]

    def shape(self, key: str) -> tuple[int, ...]:
        """A factor's shape: A is rank × in (flattened), B is out × rank."""
        name, index = self._split(key)
        module = self.modules[name]
        return (module.rank, module.in_features) if index == 0 else (module.out_features, module.rank)

    def dtype(self, key: str) -> str:
        """A factor's dtype name: the stored one for a plain LoRA (read as it is), float32 for a lifted one."""
        name, index = self._split(key)
        if self.kinds[name] != "lora":
            return "float32"
        dtype = self._file.dtype(self._roles[name]["down" if index == 0 else "up"])
        return dtype if dtype is not None else "float32"

    def get(self, key: str) -> torch.Tensor:
        """A factor, built from the stored tensors (the last module's pair is kept: A and B are read together)."""
        name, index = self._split(key)
        if self._cache is None or self._cache[0] != name:
            roles = {role: stored for role, stored in self._roles[name].items() if role != "alpha"}
            kind: Kind = KINDS[self.kinds[name]]
            self._cache = (name, kind.lift({role: self._file.get(stored) for role, stored in roles.items()}))
        factor = self._cache[1][index]
        return factor if self.kinds[name] == "lora" else factor.contiguous()


def open_single_file(path: Path) -> SingleFile | None:
    """The single-file LoRA that `path` names (see `locate`), read; None for a PEFT folder."""
    found = locate(path)
    return None if found is None else SingleFile(found)

