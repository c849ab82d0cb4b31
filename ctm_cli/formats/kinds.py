"""Kinds of low-rank module a single-file LoRA holds (plain LoRA / LoCon, LoCon with a Tucker core, LoHa, LoKr),
each turned into exact LoRA factors: ΔW (flattened to out × in·k·k for a convolution) = B · A, unscaled.

The shape of the result is known from the stored shapes alone (`Layout`), so a merge is planned before any tensor
is read; the factors are built from the tensors when the engine reads them (`Kind.lift`). Pure math, no I/O.
Factor roles are named as in the files: `down` / `up` / `mid` (kohya's lora_down / lora_up / lora_mid, diffusers'
lora_A / lora_B), and LyCORIS' own names (`hada_w1_a`, `lokr_w1`, ...)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Shapes = dict[str, tuple[int, ...]]
Tensors = dict[str, torch.Tensor]


class LayoutError(ValueError):
    """Stored shapes that do not fit together as the module's kind requires (the caller names the file)."""


@dataclass(frozen=True)
class Layout:
    """What a module's factors will be: the rank of the exact factors, ΔW's rows and (flattened) columns, the
    weight's own shape where the factors show it (a convolution's kernel), and the rank its alpha is divided by
    (None: the kind has no scale, alpha is ignored)."""

    rank: int
    out_features: int
    in_features: int
    weight_shape: tuple[int, ...] | None
    alpha_rank: int | None


@dataclass(frozen=True)
class Kind:
    """A kind of module: the factor roles it needs and may have, its layout from the shapes, and its exact lift."""

    name: str
    required: frozenset[str]
    optional: frozenset[str]
    layout: Callable[[Shapes], Layout]
    lift: Callable[[Tensors], tuple[torch.Tensor, torch.Tensor]]


def _matrix(shape: tuple[int, ...], what: str) -> tuple[int, int]:
    """(rows, columns) of a factor flattened after its first dimension; refuses a vector or a scalar."""
    if len(shape) < 2:
        raise LayoutError(f"{what} has shape {list(shape)}, not a matrix or a kernel")
    return shape[0], math.prod(shape[1:])


def _weight_shape(out: int, down_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A convolution's weight shape (out, in, k, ...) from its down factor (r, in, k, ...); None for a linear one."""
    return (out, *down_shape[1:]) if len(down_shape) > 2 else None


def capped(rank: int, out: int, columns: int) -> int:
    """The rank of exact factors of an out × columns matrix given as a product of rank `rank`: a product of more
    columns than the matrix has rows or columns is written as the matrix itself times an identity."""
    return min(rank, out, columns)


def exact_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A equal to b·a and at most min(out, in) columns: b·a as it is where its inner size is small
    enough, else the product itself beside an identity (exact, and never larger than the dense matrix)."""
    out, inner, columns = b.shape[0], b.shape[1], a.shape[1]
    if inner <= min(out, columns):
        return a, b
    product = b @ a
    if out <= columns:
        return product, torch.eye(out, dtype=product.dtype)
    return torch.eye(columns, dtype=product.dtype), product


# ------------------------------------------------------------------------------------------ plain LoRA / LoCon


def _lora_layout(shapes: Shapes) -> Layout:
    rank, columns = _matrix(shapes["down"], "down")
    out, up_rank = _matrix(shapes["up"], "up")
    if up_rank != rank:
        raise LayoutError(f"down has rank {rank} but up has {up_rank} (shapes {list(shapes['down'])}, "
                          f"{list(shapes['up'])})")
    return Layout(rank, out, columns, _weight_shape(out, shapes["down"]), rank)


def _lora_lift(tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = tensors["down"], tensors["up"]
    return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)


# ------------------------------------------------------------------------------------------ Tucker (lora_mid)


def tucker_lift(up: torch.Tensor, mid: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-r factors of a Tucker-factored kernel ΔW[o, n, k...] = Σ_ab up[o, a] mid[a, b, k...] down[b, n]:
    B = up (out × r) and A[a, (n, k...)] = Σ_b mid[a, b, k...] down[b, n] (r × in·k·k)."""
    a = torch.einsum("ab...,bn->an...", mid.float(), down.float())
    return a.reshape(a.shape[0], -1), up.float().contiguous()


def _tucker_layout(shapes: Shapes) -> Layout:
    rank, inputs = _matrix(shapes["down"], "down")
    out, up_rank = _matrix(shapes["up"], "up")
    mid = shapes["mid"]
    if len(mid) < 3 or mid[:2] != (up_rank, rank):
        raise LayoutError(f"mid has shape {list(mid)}; expected ({up_rank}, {rank}, k, ...) between up and down")
    kernel = mid[2:]
    return Layout(up_rank, out, inputs * math.prod(kernel), (out, inputs, *kernel), rank)


def _tucker_lift(tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    up, down = tensors["up"], tensors["down"]
    return tucker_lift(up.reshape(up.shape[0], -1), tensors["mid"], down.reshape(down.shape[0], -1))


# ------------------------------------------------------------------------------------------ LoHa


def khatri_rao(
    b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of the Hadamard product (b1·a1) ⊙ (b2·a2): B[o, (p, q)] = b1[o, p]·b2[o, q] and
    A[(p, q), n] = a1[p, n]·a2[q, n], of rank r1·r2."""
    b = (b1.unsqueeze(2) * b2.unsqueeze(1)).reshape(b1.shape[0], -1)
    a = (a1.unsqueeze(1) * a2.unsqueeze(0)).reshape(-1, a1.shape[1])
    return a, b


def _loha_side(shapes: Shapes, index: int) -> tuple[int, int, int, tuple[int, ...]]:
    """(rank, out, columns, kernel) of one Hadamard factor: hada_wI_a (out × r) · hada_wI_b (r × in·k·k), or with a
    Tucker core hada_tI (r × r × k...), hada_wI_a (r × out), hada_wI_b (r × in)."""
    wa, wb, core = shapes[f"hada_w{index}_a"], shapes[f"hada_w{index}_b"], shapes.get(f"hada_t{index}")
    if core is not None:
        if len(wa) != 2 or len(wb) != 2 or len(core) < 3 or core[:2] != (wa[0], wb[0]):
            raise LayoutError(f"hada_t{index} {list(core)}, hada_w{index}_a {list(wa)}, hada_w{index}_b {list(wb)} "
                              "do not form a Tucker factor (r × r × k..., r × out, r × in)")
        return wa[0], wa[1], wb[1] * math.prod(core[2:]), core[2:]
    out, rank = _matrix(wa, f"hada_w{index}_a")
    b_rank, columns = _matrix(wb, f"hada_w{index}_b")
    if b_rank != rank:
        raise LayoutError(f"hada_w{index}_a has rank {rank} but hada_w{index}_b has {b_rank}")
    return rank, out, columns, wb[2:]


def _loha_layout(shapes: Shapes) -> Layout:
    rank1, out, columns, kernel = _loha_side(shapes, 1)
    rank2, out2, columns2, _ = _loha_side(shapes, 2)
    if (out2, columns2) != (out, columns):
        raise LayoutError(f"the two Hadamard factors have shapes {out}×{columns} and {out2}×{columns2}")
    weight_shape = None
    if kernel:
        weight_shape = (out, columns // math.prod(kernel), *kernel)
    return Layout(capped(rank1 * rank2, out, columns), out, columns, weight_shape, shapes["hada_w1_b"][0])


def _loha_factor(tensors: Tensors, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one Hadamard factor, float32."""
    wa, wb = tensors[f"hada_w{index}_a"].float(), tensors[f"hada_w{index}_b"].float()
    core = tensors.get(f"hada_t{index}")
    if core is not None:
        a, b = tucker_lift(wa.T, core, wb)
        return b, a
    return wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1)


def _loha_lift(tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = khatri_rao(*_loha_factor(tensors, 1), *_loha_factor(tensors, 2))
    return exact_factors(b, a)


# ------------------------------------------------------------------------------------------ LoKr


def _lokr_side_shapes(shapes: Shapes, index: int) -> tuple[int, int, int, int | None, tuple[int, ...]]:
    """(rows, columns, rank of its exact factors, its decomposition rank or None, kernel) of one Kronecker factor:
    lokr_wI full, lokr_wI_a · lokr_wI_b, or (second factor) a Tucker core lokr_t2 with lokr_w2_a (r × out),
    lokr_w2_b (r × in)."""
    full = shapes.get(f"lokr_w{index}")
    if full is not None:
        rows, columns = _matrix(full, f"lokr_w{index}")
        return rows, columns, min(rows, columns), None, full[2:]
    wa, wb = shapes.get(f"lokr_w{index}_a"), shapes.get(f"lokr_w{index}_b")
    if wa is None or wb is None:
        raise LayoutError(f"neither lokr_w{index} nor both lokr_w{index}_a and lokr_w{index}_b")
    core = shapes.get(f"lokr_t{index}")
    if core is not None:
        if len(wa) != 2 or len(wb) != 2 or len(core) < 3 or core[:2] != (wa[0], wb[0]):
            raise LayoutError(f"lokr_t{index} {list(core)} does not fit lokr_w{index}_a {list(wa)} and "
                              f"lokr_w{index}_b {list(wb)} (r × r × k..., r × out, r × in)")
        return wa[1], wb[1] * math.prod(core[2:]), wa[0], wb[0], core[2:]
    rows, rank = _matrix(wa, f"lokr_w{index}_a")
    b_rank, columns = _matrix(wb, f"lokr_w{index}_b")
    if b_rank != rank:
        raise LayoutError(f"lokr_w{index}_a has rank {rank} but lokr_w{index}_b has {b_rank}")
    return rows, columns, rank, b_rank, wb[2:]


def _lokr_layout(shapes: Shapes) -> Layout:
    rows1, columns1, rank1, decomposed1, kernel1 = _lokr_side_shapes(shapes, 1)
    rows2, columns2, rank2, decomposed2, kernel2 = _lokr_side_shapes(shapes, 2)
    if kernel1:
        raise LayoutError("lokr_w1 has a kernel; LyCORIS keeps the kernel in the second factor")
    out, columns = rows1 * rows2, columns1 * columns2
    weight_shape = None
    if kernel2:
        weight_shape = (out, columns // math.prod(kernel2), *kernel2)
    # LyCORIS divides alpha by the rank of a decomposed factor; with both factors full there is no scale
    alpha_rank = decomposed1 if decomposed1 is not None else decomposed2
    return Layout(capped(rank1 * rank2, out, columns), out, columns, weight_shape, alpha_rank)


def _lokr_factor(tensors: Tensors, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one Kronecker factor, float32: a full one as itself beside an identity on its smaller side."""
    full = tensors.get(f"lokr_w{index}")
    if full is not None:
        matrix = full.float().reshape(full.shape[0], -1)
        rows, columns = matrix.shape
        return (torch.eye(rows), matrix) if rows <= columns else (matrix, torch.eye(columns))
    wa, wb = tensors[f"lokr_w{index}_a"].float(), tensors[f"lokr_w{index}_b"].float()
    core = tensors.get(f"lokr_t{index}")
    if core is not None:
        a, b = tucker_lift(wa.T, core, wb)
        return b, a
    return wa, wb.reshape(wb.shape[0], -1)


def _lokr_lift(tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    b1, a1 = _lokr_factor(tensors, 1)
    b2, a2 = _lokr_factor(tensors, 2)
    return exact_factors(torch.kron(b1, b2), torch.kron(a1, a2))


KINDS = {
    kind.name: kind
    for kind in (
        Kind("lora", frozenset({"down", "up"}), frozenset({"alpha"}), _lora_layout, _lora_lift),
        Kind("locon_tucker", frozenset({"down", "up", "mid"}), frozenset({"alpha"}), _tucker_layout, _tucker_lift),
        Kind(
            "loha",
            frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
            frozenset({"hada_t1", "hada_t2", "alpha"}),
            _loha_layout,
            _loha_lift,
        ),
        Kind(
            "lokr",
            frozenset(),
            frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}),
            _lokr_layout,
            _lokr_lift,
        ),
    )
}

# Tensors of adapter types whose update is not a function of their own factors, or not low-rank: (role, what).
REFUSED = {
    "dora_scale": "DoRA (dora_scale): its update rescales the base weight's columns, which ctm does not have",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector): its update rescales the base weight's columns, which "
    "ctm does not have",
    "a1.weight": "GLoRA (a1/a2/b1/b2): its update multiplies the base weight, which ctm does not have",
    "oft_blocks": "OFT/BOFT (oft_blocks): a rotation of the base weight, which ctm does not have",
    "oft_diag": "OFT (oft_diag): a rotation of the base weight, which ctm does not have",
    "oft_R": "OFT (oft_R): a rotation of the base weight, which ctm does not have",
    "on_input": "IA3 (on_input): a rescaling of the base weight, which ctm does not have",
    "weight": "IA3 (weight): a rescaling of the base weight, which ctm does not have",
    "diff": "a full weight difference (diff), not a low-rank adapter",
    "w_norm": "a normalisation-layer fine-tune (w_norm), not a low-rank adapter",
}
for _role in ("a2.weight", "b1.weight", "b2.weight"):
    REFUSED[_role] = REFUSED["a1.weight"]
REFUSED["diff_b"] = REFUSED["diff"]
REFUSED["b_norm"] = REFUSED["w_norm"]


def kind_of(roles: set[str]) -> Kind:
    """The kind a module's set of factor roles names (the roles were checked to be known, none of REFUSED)."""
    if any(role.startswith("hada_") for role in roles):
        kind = KINDS["loha"]
    elif any(role.startswith("lokr_") for role in roles):
        kind = KINDS["lokr"]
    else:
        kind = KINDS["locon_tucker" if "mid" in roles else "lora"]
    missing = sorted(kind.required - roles)
    stray = sorted(roles - kind.required - kind.optional)
    if missing or stray:
        problem = f"lacks {', '.join(missing)}" if missing else f"mixes in {', '.join(stray)}"
        raise LayoutError(f"a {kind.name} module that {problem}")
    return kind
