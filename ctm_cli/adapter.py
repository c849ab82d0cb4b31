"""A PEFT LoRA adapter on disk: its parsed config and lazy, per-module access to its factors."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ctm_cli.errors import IncompatibleError, InputError, first_line, unreadable
from ctm_cli.formats.single_file import SingleFile, open_single_file
from ctm_cli.patterns import MAX_NAME_LENGTH, pattern_problem
from ctm_cli.peft_layout import CONFIG_NAME, FLOAT_DTYPES, LEGACY_NAME, MODEL_PREFIX, SAFETENSORS_NAME, LoraModule
from ctm_cli.safetensors_format import FORMAT_NAMES, ITEM_SIZES, SafetensorsFile, dtype_name
from ctm_cli.untrusted import TooLargeError, read_limited

# (module name, factor) from a weight key; PEFT drops the adapter name when saving.
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")
_UNPICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # what torch's weights-only unpickler names as refused
CONFIG_LIMIT = 64 * 1024**2  # bytes read of an adapter_config.json at most


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """Look up a rank/alpha pattern exactly as PEFT does: first key that matches the name's suffix (the keys
    were checked by `patterns.pattern_problem`, so matching them takes bounded time)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _config_text(folder: Path) -> str:
    """The text of the folder's adapter config, refusing a missing, unreadable or oversized one."""
    path = folder / CONFIG_NAME
    try:
        if not folder.exists():
            raise InputError(f"{folder}: no such adapter folder")
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder (an adapter is a folder with {CONFIG_NAME})")
        if not os.access(folder, os.X_OK):  # the files are opened by name: listing the folder is not needed
            raise InputError(f"{folder}: cannot be read (Permission denied)")
        if not path.is_file():
            raise InputError(f"{path}: missing; {folder} is not a PEFT adapter folder")
        data = read_limited(path, CONFIG_LIMIT)
    except OSError as exc:
        raise unreadable(path, exc) from exc
    except TooLargeError as exc:
        raise InputError(f"{path}: {exc}; not an adapter config") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from exc


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(_config_text(folder))
    except RecursionError as exc:
        raise InputError(f"{path}: not an adapter config (JSON nested too deeply)") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    except ValueError as exc:  # Python refuses integers of thousands of digits
        raise InputError(f"{path}: not an adapter config (a number of thousands of digits)") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise InputError(f"{path}: no peft_type field; not a PEFT adapter config")
    if peft_type != "LORA":
        raise IncompatibleError(f"{path}: peft_type is {peft_type!r}; ctm merges LoRA adapters only")
    for key in ("r", "lora_alpha"):
        if not _is_number(config.get(key)):
            raise InputError(f"{path}: field {key!r} is missing or not a finite number")
    if config["r"] <= 0:
        raise InputError(f"{path}: r must be positive, got {config['r']}")
    for key, (is_valid, expected) in _OPTIONAL_FIELDS.items():
        if config.get(key) is not None and not is_valid(config[key]):
            raise InputError(f"{path}: field {key!r} must be {expected}, got {_shown(config[key])}")
    for key, is_rank in (("rank_pattern", True), ("alpha_pattern", False)):
        _check_pattern(path, key, config.get(key) or {}, is_rank)
    return config


def _shown(value: Any, limit: int = 80) -> str:
    """A config value as an error shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_pattern(path: Path, field: str, patterns: dict[str, Any], is_rank: bool) -> None:
    """Refuse, naming the key, a rank/alpha pattern whose key is not a safe regular expression (see
    `patterns.pattern_problem`) or whose value is not a positive integer rank / a finite alpha."""
    for key, value in patterns.items():
        problem = pattern_problem(key)
        if problem:
            raise InputError(f"{path}: {field} key {_shown(key)} refused: {problem}")
        if is_rank and not (_is_number(value) and value >= 1 and float(value).is_integer()):
            raise InputError(
                f"{path}: {field} key {_shown(key)} gives rank {_shown(value)}; ranks are positive integers"
            )
        if not _is_number(value):
            raise InputError(f"{path}: {field} key {_shown(key)} gives {_shown(value)}; expected a finite number")


def _is_number(value: Any) -> bool:
    """A finite int or float that a float can hold (JSON allows integers of any size)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# Optional config fields ctm reads: (check, what the value must be).
_OPTIONAL_FIELDS = {
    "base_model_name_or_path": (lambda value: isinstance(value, str), "a model name or path"),
    "task_type": (lambda value: isinstance(value, str), "a PEFT task type"),
    "use_rslora": (lambda value: isinstance(value, bool), "true or false"),
    "fan_in_fan_out": (lambda value: isinstance(value, bool), "true or false"),
    "rank_pattern": (lambda value: isinstance(value, dict), "an object of regular expressions to ranks"),
    "alpha_pattern": (lambda value: isinstance(value, dict), "an object of regular expressions to numbers"),
    "target_modules": (lambda value: isinstance(value, str) or _is_names(value), "a list of names or a regex"),
    "modules_to_save": (_is_names, "a list of names"),
}


class _BinReader:
    """Tensors of a legacy `adapter_model.bin`, loaded with `weights_only=True` (never runs code)."""

    def __init__(self, path: Path):
        try:
            self._tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's text advises unsafe loading: it is not passed on
            found = _UNPICKLED_GLOBAL.search(str(exc))
            detail = f" (it calls {found[1]})" if found else ""
            raise InputError(
                f"{path}: refused: the pickle holds code or objects other than tensors{detail}; ctm loads .bin "
                "files weights-only and never runs their code: ask its owner for a safetensors file, or convert "
                "it yourself only if you trust where it came from"
            ) from exc
        except OSError as exc:
            raise unreadable(path, exc) from exc
        except Exception as exc:
            raise InputError(f"{path}: not a loadable torch file ({first_line(str(exc))})") from exc
        if not isinstance(self._tensors, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in self._tensors.items()
        ):
            raise InputError(f"{path}: expected a dict of named tensors")

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> str:
        return dtype_name(self._tensors[key].dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def output_keys(adapters: list[Adapter], name: str) -> tuple[str, str]:
    """The (A, B) weight keys a merged module is written under: as the first adapter that has it spells them."""
    module = next(adapter.modules[name] for adapter in adapters if name in adapter.modules)
    return module.a_key, module.b_key


class Adapter:
    """A PEFT LoRA folder: config fields, the LoRA modules found in its weights, lazy factor access."""

    def __init__(self, folder: Path, source: str | None = None):
        self.folder = Path(folder)
        self.source = source or str(folder)
        self.single_file = open_single_file(self.folder)  # kohya / diffusers / LyCORIS files (ctm_cli/formats)
        if self.single_file is not None:
            self.config, self.weights_path = self.single_file.config, self.single_file.path
            self._reader: SafetensorsFile | _BinReader | SingleFile = self.single_file
            self.modules, self.extra_keys = self.single_file.modules, list[str]()
            return
        self.config = _read_config(self.folder)
        self.weights_path = self._find_weights()
        self._reader = (
            SafetensorsFile(self.weights_path)
            if self.weights_path.suffix == ".safetensors"
            else _BinReader(self.weights_path)
        )
        self.modules, self.extra_keys = self._find_modules()

    @property
    def base_model(self) -> str | None:
        """The `base_model_name_or_path` the adapter was trained on."""
        return self.config.get("base_model_name_or_path")

    @property
    def use_rslora(self) -> bool:
        """Whether the adapter scales by alpha / sqrt(r)."""
        return bool(self.config.get("use_rslora", False))

    def _find_weights(self) -> Path:
        for name in (SAFETENSORS_NAME, LEGACY_NAME):
            path = self.folder / name
            if path.is_file():
                return path
        raise InputError(f"{self.folder}: no {SAFETENSORS_NAME} (or legacy {LEGACY_NAME}) in the folder")

    def _find_modules(self) -> tuple[dict[str, LoraModule], list[str]]:
        factors: dict[str, dict[str, str]] = {}
        extra: list[str] = []
        for key in self._reader.names():
            if len(key) > MAX_NAME_LENGTH:
                raise InputError(
                    f"{self.weights_path}: tensor key {_shown(key)} has {len(key)} characters, more than "
                    f"{MAX_NAME_LENGTH}; not a PEFT weight name"
                )
            match = _FACTOR_KEY.match(key)
            if match is None:
                extra.append(key)
                continue
            seen = factors.setdefault(match["module"], {})
            if match["factor"] in seen:
                raise InputError(
                    f"{self.weights_path}: tensors {seen[match['factor']]} and {key} are both the "
                    f"{match['factor']} factor of module {match['module']}; keep one of them"
                )
            seen[match["factor"]] = key
        modules = {name: self._module(name, keys) for name, keys in sorted(factors.items())}
        if not modules:
            raise InputError(f"{self.weights_path}: no LoRA factors (lora_A/lora_B) found")
        return modules, extra

    def _module(self, name: str, keys: dict[str, str]) -> LoraModule:
        embedding = "lora_embedding_A" in keys or "lora_embedding_B" in keys
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a_name not in keys or b_name not in keys:
            missing = b_name if a_name in keys else a_name
            raise InputError(f"{self.weights_path}: module {name} has no {missing} factor")
        a_shape, b_shape = self._reader.shape(keys[a_name]), self._reader.shape(keys[b_name])
        if max(len(a_shape), len(b_shape)) > 2:
            raise IncompatibleError(
                f"{self.weights_path}: module {name} has {max(len(a_shape), len(b_shape))}-d factors (a convolution "
                "LoRA?); only linear and embedding LoRA (2-d factors) can be merged"
            )
        for factor, shape in ((a_name, a_shape), (b_name, b_shape)):
            if len(shape) != 2:
                raise InputError(f"{self.weights_path}: module {name}: {factor} has shape {list(shape)}, not a matrix")
        for key in (keys[a_name], keys[b_name]):
            if self._reader.dtype(key) not in FLOAT_DTYPES:
                raise InputError(f"{self.weights_path}: tensor {key} is not a float16/bfloat16/float32/float64 tensor")
        rank = a_shape[0]
        if b_shape[1] != rank:
            raise InputError(
                f"{self.weights_path}: module {name}: {a_name} has rank {rank} but {b_name} has {b_shape[1]}"
            )
        model_key = name.removeprefix(MODEL_PREFIX)
        config_rank = pattern_value(self.config.get("rank_pattern") or {}, model_key, self.config["r"])
        if config_rank != rank:
            raise InputError(f"{self.weights_path}: module {name} has rank {rank} but the config says r={config_rank}")
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, model_key, self.config["lora_alpha"])
        return LoraModule(
            name=name,
            a_key=keys[a_name],
            b_key=keys[b_name],
            rank=rank,
            alpha=float(alpha),
            scale=lora_scale(float(alpha), rank, self.use_rslora),
            out_features=b_shape[0],
            in_features=a_shape[1],
            embedding=embedding,
        )

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module as stored: A is r × in, B is out × r."""
        module = self.modules[name]
        return self._reader.get(module.a_key), self._reader.get(module.b_key)

    def tensor(self, key: str) -> torch.Tensor:
        """Any stored tensor by key (e.g. a modules_to_save weight)."""
        return self._reader.get(key)

    def dtypes(self) -> set[str]:
        """The dtype names (`float32`...) of the stored LoRA factors (floats: `_module` refuses any other)."""
        keys = [key for module in self.modules.values() for key in (module.a_key, module.b_key)]
        return {dtype for dtype in map(self._reader.dtype, keys) if dtype is not None}

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a stored tensor without reading it."""
        return self._reader.shape(key)

    def dtype(self, key: str) -> str | None:
        """dtype name (`float32`...) of a stored tensor without reading it (None for one ctm does not read)."""
        return self._reader.dtype(key)

    def nbytes(self, key: str) -> int:
        """Bytes of a stored float tensor (a LoRA factor), without reading it."""
        return math.prod(self.shape(key)) * ITEM_SIZES[FORMAT_NAMES[self.dtype(key) or "float32"]]
