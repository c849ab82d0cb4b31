"""Compatibility of a set of adapters; every error names the adapters, the module and the cause."""

from __future__ import annotations

from dataclasses import dataclass

from ctm_cli.adapter import Adapter
from ctm_cli.errors import IncompatibleError, InputError, UsageError
from ctm_cli.methods import Method
from ctm_cli.rules import Rule


@dataclass(frozen=True)
class ModuleSpec:
    """A module present in every adapter: its shape and each adapter's rank."""

    name: str
    out_features: int
    in_features: int
    ranks: tuple[int, ...]
    embedding: bool

    @property
    def total_rank(self) -> int:
        """R = Σ r_t for this module."""
        return sum(self.ranks)


def _refuse_unsupported(adapter: Adapter) -> None:
    config = adapter.config
    where = adapter.folder / "adapter_config.json"
    if config.get("use_dora"):
        raise InputError(f"{where}: DoRA adapters (use_dora) cannot be merged into a plain LoRA")
    if config.get("lora_bias"):
        raise InputError(f"{where}: adapters with a LoRA bias (lora_bias) are not supported")
    if adapter.extra_keys:
        shown = ", ".join(adapter.extra_keys[:3]) + (" ..." if len(adapter.extra_keys) > 3 else "")
        raise IncompatibleError(
            f"{adapter.weights_path}: carries {len(adapter.extra_keys)} non-LoRA tensors "
            f"(modules_to_save: {shown}); ctm merges LoRA factors only and will not drop them silently"
        )


def check_compatible(adapters: list[Adapter]) -> list[ModuleSpec]:
    """The modules to merge, after checking base model, module sets and shapes agree across adapters."""
    if len(adapters) < 2:
        raise UsageError("a merge needs at least two adapters")
    for adapter in adapters:
        _refuse_unsupported(adapter)
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        listing = "; ".join(f"{a.source}: {a.base_model}" for a in adapters)
        raise IncompatibleError(f"adapters were trained on different base models ({listing})")
    first = adapters[0]
    specs = []
    for adapter in adapters[1:]:
        missing = sorted(set(first.modules) ^ set(adapter.modules))
        if missing:
            holder = first if missing[0] in first.modules else adapter
            other = adapter if holder is first else first
            raise IncompatibleError(
                f"module {missing[0]} is in {holder.source} but not in {other.source}"
                + (f" (and {len(missing) - 1} more modules differ)" if len(missing) > 1 else "")
            )
    for name, module in first.modules.items():
        for adapter in adapters[1:]:
            other = adapter.modules[name]
            if (other.out_features, other.in_features, other.embedding) != (
                module.out_features,
                module.in_features,
                module.embedding,
            ):
                raise IncompatibleError(
                    f"module {name}: shape {module.out_features}×{module.in_features} in {first.source} "
                    f"but {other.out_features}×{other.in_features} in {adapter.source}"
                )
        specs.append(
            ModuleSpec(
                name=name,
                out_features=module.out_features,
                in_features=module.in_features,
                ranks=tuple(a.modules[name].rank for a in adapters),
                embedding=module.embedding,
            )
        )
    return specs


def check_rank(specs: list[ModuleSpec], rank: int, method: Method, rule: Rule) -> None:
    """Refuse an output rank the method cannot write for some module, naming the allowed range.

    Methods with a natural rank (cat, robustmerge) ignore --rank; core and knots take 0 for "no
    truncation" (rank R); otherwise 1 ≤ rank ≤ the method's limit for every module.
    """
    if method.natural_rank is not None or (rank == 0 and method.zero_is_full):
        return
    full = " (or 0 for the full rank R)" if method.zero_is_full else ""
    if rank <= 0:
        raise UsageError(f"--rank must be a positive integer for method {method.name}{full}, got {rank}")

    def limit(spec: ModuleSpec) -> int:
        return method.rank_limit(spec.total_rank, spec.out_features, spec.in_features, rule)

    tightest = min(specs, key=limit)
    if rank > limit(tightest):
        raise UsageError(
            f"--rank {rank} is larger than possible for method {method.name}: module {tightest.name} allows at "
            f"most {limit(tightest)} (R={tightest.total_rank}, out={tightest.out_features}, "
            f"in={tightest.in_features}); choose 1..{limit(tightest)}{full}"
        )
