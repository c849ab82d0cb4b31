"""Compatibility of a set of adapters; every error names the adapters, the module and the cause."""

from __future__ import annotations

import re

from ctm_cli.adapter import Adapter
from ctm_cli.errors import IncompatibleError, InputError, UsageError
from ctm_cli.module_spec import ModuleSpec
from ctm_cli.peft_layout import CONFIG_NAME

# Tensors of LoRA variants that a plain LoRA cannot express: (pattern of the key, config flag, what it is).
_UNSUPPORTED = (
    (re.compile(r"\.lora_magnitude_vector(\.weight)?$"), "use_dora", "a DoRA adapter (lora_magnitude_vector)"),
    (re.compile(r"\.lora_B\.bias$"), "lora_bias", "an adapter with a LoRA bias (lora_bias)"),
    (re.compile(r"\.token_adapter\."), "trainable_token_indices", "an adapter with trainable tokens"),
)


def _refuse_unsupported(adapter: Adapter) -> None:
    """Refuse LoRA variants whose extra parameters a merged plain LoRA cannot carry, naming the file and why."""
    for pattern, flag, what in _UNSUPPORTED:
        keys = [key for key in adapter.extra_keys if pattern.search(key)]
        if keys or adapter.config.get(flag):
            where = adapter.weights_path if keys else adapter.folder / CONFIG_NAME
            raise IncompatibleError(f"{where}: {what}; ctm merges plain LoRA factors only")
    unknown = [key for key in adapter.extra_keys if ".lora_" in key]
    if unknown:
        raise InputError(f"{adapter.weights_path}: unrecognised LoRA tensor {unknown[0]}")


def _missing_message(holder: Adapter, lacking: Adapter, names: list[str]) -> str:
    more = f" (and {len(names) - 1} more: {', '.join(names[1:3])}{' ...' if len(names) > 3 else ''})"
    return (
        f"{lacking.folder}: has no module {names[0]}{more if len(names) > 1 else ''} that {holder.folder} has; "
        "pass --allow-missing to treat a missing module as a zero update"
    )


def check_compatible(adapters: list[Adapter], allow_missing: bool = False) -> list[ModuleSpec]:
    """The modules to merge, after checking module sets and shapes agree across adapters (base models are
    compared by base_model.resolve_base_model).

    With `allow_missing`, a module some adapters lack is merged with rank 0 (a zero update) for them.
    """
    if len(adapters) < 2:
        raise UsageError("a merge needs at least two adapters")
    for adapter in adapters:
        _refuse_unsupported(adapter)
    names = sorted(set().union(*(a.modules for a in adapters)))
    if not allow_missing:
        for holder in adapters:
            for lacking in adapters:
                missing = sorted(set(holder.modules) - set(lacking.modules))
                if missing:
                    raise IncompatibleError(_missing_message(holder, lacking, missing))
    specs = []
    for name in names:
        holders = [a for a in adapters if name in a.modules]
        first = holders[0].modules[name]
        for adapter in holders[1:]:
            other = adapter.modules[name]
            if (other.out_features, other.in_features, other.embedding) != (
                first.out_features,
                first.in_features,
                first.embedding,
            ):
                raise IncompatibleError(
                    f"{adapter.weights_path}: module {name} has shape {other.out_features}×{other.in_features}"
                    f"{' (embedding)' if other.embedding else ''} but {first.out_features}×{first.in_features}"
                    f"{' (embedding)' if first.embedding else ''} in {holders[0].weights_path}"
                )
        specs.append(
            ModuleSpec(
                name=name,
                out_features=first.out_features,
                in_features=first.in_features,
                ranks=tuple(a.modules[name].rank if name in a.modules else 0 for a in adapters),
                embedding=first.embedding,
            )
        )
    return specs


def missing_modules(adapters: list[Adapter], specs: list[ModuleSpec]) -> list[list[str]]:
    """Per adapter, the merged modules it lacks (merged as zero updates with --allow-missing)."""
    return [[spec.name for spec in specs if spec.name not in adapter.modules] for adapter in adapters]


def repeated_inputs(adapters: list[Adapter]) -> list[str]:
    """A warning for each adapter given more than once (the same weights file, by any path): it is merged once per
    mention, which weighs it more, and a rule that counts tasks (TIES' sign election, TSV's 1/T share) counts it
    twice."""
    first: dict[tuple[int, int], Adapter] = {}
    warnings = []
    for adapter in adapters:
        status = adapter.weights_path.stat()
        earlier = first.setdefault((status.st_dev, status.st_ino), adapter)
        if earlier is not adapter:
            same = "is given twice" if adapter.source == earlier.source else f"is the same adapter as {earlier.source}"
            warnings.append(
                f"{adapter.source} {same} (one weights file): it is merged twice, as one more task; to weigh it "
                "more, give it once with a larger --weights value"
            )
    return warnings
