"""Pure math of the core space and of CtM's shared subspaces; no I/O.

Every function is batched over leading dimensions so that all modules of one shape are processed by
one kernel launch. Shapes: G modules, T adapters, R = Σ r_t, r the output rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from ctm_cli import progress, small_linalg
from ctm_cli.fixed_order import matmul

# Directions of B_cat / A_cat whose squared singular value is below this fraction of the largest
# are treated as numerically absent (they carry < 1e-12 of the energy).
GRAM_RELATIVE_TOLERANCE = 1e-12
# `_symmetric_frame` takes a Gram matrix of condition number at most this (two orders below the directions the
# eigh route drops, and orthonormal to ~1e-6 in float64); the rest take the eigh route.
GRAM_CONDITION_LIMIT = 1e10
# HOOI's half-sweeps on core spaces up to this size (or twice the block) solve eigh directly; larger ones
# take one step of block subspace iteration from the previous sweep's block (see refine_eigenvectors).
# The block (2r, at most 32, at least r) keeps the Rayleigh–Ritz eigh batched on CUDA (cuSOLVER batches
# eigh up to 32 × 32 and loops one matrix at a time above).
DIRECT_EIGH_MAX_SIZE = 32
# A refinement step multiplies by M + ε·I, ε this share of trace(M): the same eigenvectors as M, and a product
# whose columns stay independent whatever M's rank (condition ≤ 1 / POWER_SHIFT for an orthonormal block).
POWER_SHIFT = 1e-6
# A Cholesky-QR basis further than this from orthonormal (max |QᵀQ − I|, NaN included) is refused.
ORTHONORMAL_TOLERANCE = 1e-10
# HOOI's stopping rule (DESIGN §1): a sweep that raises the captured energy by less than this share (and, so that
# it has settled, moves the subspaces by less than this: root sum of squared sines), or the cap.
HOOI_TOLERANCE = 1e-10
HOOI_MAX_SWEEPS = 500
# HOOI drops the modules that stopped from its batch once at most this fraction of the batch still sweeps.
COMPACTION_FRACTION = 0.75
# HOOI asks whether any module still sweeps (a host sync) once per this many sweeps on CUDA, on the CPU every sweep
# (no sync to save there, and stopped modules leave the batch sooner); a module that stopped keeps its result.
CUDA_CHECK_INTERVAL = 8
CPU_CHECK_INTERVAL = 1
# Sweeps whose results Anderson's extrapolation combines, and the regularisation of its least squares (relative).
ANDERSON_WINDOW = 8
ANDERSON_REGULARIZATION = 1e-10
# Largest multiple of the last sweep that the fallback line search steps beyond it.
LINE_SEARCH_MAX_REACH = 64.0


@dataclass(frozen=True)
class CoreSpace:
    """Orthonormal frames of B_cat and A_cat, as R × R maps, and the per-task R × R cores.

    Q_B = b_cat @ left and Q_A = a_catᵀ @ right are orthonormal (out × R, in × R) without ever being
    formed; ΔW_t = Q_B · cores[t] · Q_Aᵀ exactly.
    """

    left: torch.Tensor  # (..., R, R), float64
    right: torch.Tensor  # (..., R, R), float64
    cores: torch.Tensor  # (..., T, R, R), float64


@dataclass(frozen=True)
class SharedFrame:
    """Shared rank-r subspaces u (R × r) and v (R × r) of a set of cores, and how HOOI found them."""

    u: torch.Tensor  # (..., R, r)
    v: torch.Tensor  # (..., R, r)
    sweeps: torch.Tensor  # (...,) int
    energy: torch.Tensor  # (...,) Σ‖uᵀ C̃_t v‖² at convergence
    total_energy: torch.Tensor  # (...,) Σ‖C̃_t‖²


def gram_frame(gram: torch.Tensor, any_basis: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """From X's Gram matrix XᵀX, the map to an orthonormal basis (Q = X @ map) and Qᵀ X itself.

    Q is X's left singular basis, its columns in decreasing order of singular value (numerically
    absent directions give zero columns, at the end). With `any_basis` (for callers whose results do not depend on
    the basis) a CPU still gets that; an accelerator gets Q = X G^-½ (`_symmetric_frame`).
    """
    if any_basis and small_linalg.iterates_on(gram.device):
        return _symmetric_frame(gram)
    return _singular_frame(gram)


def _symmetric_frame(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gram_frame` as G^-½ and G^½ (Q = X G^-½ is X's polar factor: orthonormal, X's span), by Newton–Schulz
    iterations (batched products, where a GPU's eigh loops over the matrices). Columns of X that are exactly zero
    (a task's padding to the widest rank) give zero columns of Q in their place; the matrices the iterations do not
    settle on, otherwise singular or within GRAM_CONDITION_LIMIT of it (where `_singular_frame` may drop
    directions), take the eigh."""
    root, inverse_root, settled = small_linalg.square_roots(gram, GRAM_CONDITION_LIMIT)
    if not bool(settled.all()):
        unsettled = ~settled
        inverse_root[unsettled], root[unsettled] = _singular_frame(gram[unsettled])
    return inverse_root, root


def _singular_frame(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gram_frame` from the eigendecomposition of G: Q is X's left singular basis."""
    eigenvalues, eigenvectors = small_linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues.flip(-1), eigenvectors.flip(-1)
    largest = eigenvalues[..., :1].clamp_min(torch.finfo(gram.dtype).tiny)
    kept = eigenvalues > GRAM_RELATIVE_TOLERANCE * largest
    root = torch.where(kept, eigenvalues.clamp_min(0).sqrt(), torch.zeros_like(eigenvalues))
    inverse_root = torch.where(kept, 1.0 / root.where(kept, torch.ones_like(root)), torch.zeros_like(root))
    to_basis = eigenvectors * inverse_root.unsqueeze(-2)
    coordinates = (eigenvectors * root.unsqueeze(-2)).mT
    return to_basis, coordinates


def _basis_and_coordinates(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X (..., m, k) as Q · K: Q (..., m, k) an orthonormal basis of X's span (zero columns for numerically absent
    directions) and K (..., k, k), from the Gram matrix of X / max|X| (`gram_frame`, any basis; scaled so that
    squaring neither overflows nor underflows whatever the weights)."""
    scale = columns.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(columns.dtype).tiny)
    unit = columns / scale
    to_basis, coordinates = gram_frame(matmul(unit.mT, unit), any_basis=True)
    return matmul(unit, to_basis), coordinates * scale


def core_space(b_cat: torch.Tensor, a_cat: torch.Tensor, ranks: list[int]) -> CoreSpace:
    """Lossless core space of concatenated scaled factors b_cat (..., out, R) and a_cat (..., R, in).

    Uses the R × R Gram matrices (in float64) instead of QRs of the tall factors: the same span,
    at the cost of one small matrix product per side. The bases are the singular bases of b_cat and
    a_catᵀ (decreasing singular values), which fixes the coordinates element-wise rules see.
    """
    left, r_b = gram_frame(float64_gram(b_cat))
    right, r_a = gram_frame(float64_gram(a_cat.mT))
    cores = torch.stack(
        [matmul(r_b[..., :, cols], r_a[..., :, cols].mT) for cols in column_slices(ranks)],
        dim=-3,
    )
    progress.add("core spaces", math.prod(b_cat.shape[:-2]), "modules")
    return CoreSpace(left=left, right=right, cores=cores)


def float64_gram(columns: torch.Tensor) -> torch.Tensor:
    """XᵀX in float64 for X (..., m, k) of any float dtype. On the CPU a matrix at a time, so that no float64 copy
    of the whole batch is made (the same bits: on one thread a matrix is computed alike alone or in a batch, see
    fixed_order); batched elsewhere."""
    if columns.device.type != "cpu":
        wide = columns.to(torch.float64)
        return matmul(wide.mT, wide)
    flat = columns.reshape(-1, *columns.shape[-2:])
    size = columns.shape[-1]
    gram = torch.empty(flat.shape[0], size, size, dtype=torch.float64)
    for index, matrix in enumerate(flat):
        wide = matrix.to(torch.float64)
        gram[index] = matmul(wide.mT, wide)
    return gram.reshape(*columns.shape[:-2], size, size)


def column_slices(ranks: list[int]) -> list[slice]:
    """Column ranges of each task in the concatenated factors."""
    starts = [sum(ranks[:t]) for t in range(len(ranks))]
    return [slice(start, start + rank) for start, rank in zip(starts, ranks, strict=True)]


def _balancing_factors(norms: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-task factors (..., T) taking each norm to β‖C_t‖ + (1−β)·mean_s ‖C_s‖ (1 for a zero core)."""
    target = beta * norms + (1.0 - beta) * norms.mean(dim=-1, keepdim=True)
    return torch.where(
        norms > 0, target / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.ones_like(norms)
    )


def _top_eigenvectors(gram: torch.Tensor, rank: int, solver: small_linalg.Solver | None = None) -> torch.Tensor:
    """The `rank` leading eigenvectors of a symmetric matrix, largest first. Inside HOOI's sweeps the device's own
    eigh (the default: no host round trip); once per merge `small_linalg.eigh`."""
    _, eigenvectors = (solver or torch.linalg.eigh)(gram)
    return eigenvectors[..., -rank:].flip(-1)


def _orthonormalize(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the columns by Cholesky QR done twice on the columns scaled to unit norm
    (orthonormal to float64 rounding up to a condition number of ~1e7 after scaling; block iteration's
    columns, of norms ~λ_i, are nearly orthogonal), and whether that worked: each matrix had full column rank
    and came out orthonormal (where not, it is unusable)."""
    norms = torch.linalg.vector_norm(columns, dim=-2, keepdim=True)
    basis = columns / norms.clamp_min(torch.finfo(columns.dtype).tiny)
    full_rank = torch.ones(columns.shape[:-2], dtype=torch.bool, device=columns.device)
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(matmul(basis.mT, basis))
        full_rank = full_rank & (info == 0)
        basis = torch.linalg.solve_triangular(factor, basis.mT, upper=False).mT
    eye = torch.eye(columns.shape[-1], dtype=columns.dtype, device=columns.device)
    drift = (matmul(basis.mT, basis) - eye).abs().amax(dim=(-2, -1))
    return basis, full_rank & (drift <= ORTHONORMAL_TOLERANCE)


def refine_eigenvectors(columns: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Leading eigenvectors of M = Y Yᵀ (Y = `columns`, (G, R, K)), as many as `block` (G, R, p) has
    columns, largest first: one step of block subspace iteration with Rayleigh–Ritz from `block`.

    HOOI repeats this from the previous sweep's block instead of solving each half-sweep exactly: its
    fixed points are the same (a block invariant under M whose Ritz vectors are M's top eigenvectors),
    and a step costs a few batched products instead of an eigh of R × R. The step multiplies by M + ε·I
    (ε = POWER_SHIFT · trace(M): the same eigenvectors), whose product with the block has independent columns
    whatever M's rank, so no module needs another path (and no host sync decides which). Small matrices
    (R ≤ 2p or ≤ DIRECT_EIGH_MAX_SIZE) get eigh's exact answer.
    """
    size, width = block.shape[-2:]
    if size <= max(DIRECT_EIGH_MAX_SIZE, 2 * width):
        return _top_eigenvectors(matmul(columns, columns.mT), width)
    shift = POWER_SHIFT * columns.square().sum(dim=(-2, -1))
    basis, usable = _orthonormalize(matmul(columns, matmul(columns.mT, block)) + shift.view(-1, 1, 1) * block)
    basis = torch.where(usable.view(-1, 1, 1), basis, block)  # non-finite input: nothing to mend
    images = matmul(columns.mT, basis)
    _, rotation = torch.linalg.eigh(matmul(images.mT, images))
    return matmul(basis, rotation.flip(-1))


def _task_columns(blocks: torch.Tensor) -> torch.Tensor:
    """(..., T, R, k) → (..., R, T·k): every task's block side by side."""
    return blocks.movedim(-3, -2).flatten(-2)


def _frame_energy(left_images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖uᵀ C_t v‖² from the images C_tᵀ u (..., T, R, r) and v (..., R, r)."""
    return matmul(left_images.mT, v.unsqueeze(-3)).square().sum(dim=(-3, -2, -1))


def _sweep(cores: FactoredCores, blocks: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One HOOI sweep from the blocks (G, 2, R, p) of u and v: u refined against C_t v, then v against C_tᵀ u;
    the new blocks and their energy."""
    u = refine_eigenvectors(_task_columns(cores.times_right(blocks[:, 1, :, :rank])), blocks[:, 0])
    left_images = cores.times_left(u[..., :rank])
    v = refine_eigenvectors(_task_columns(left_images), blocks[:, 1])
    return torch.stack([u, v], dim=1), _frame_energy(left_images, v[..., :rank])


def _subspace_change(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Σ sin² of the principal angles between the spans of orthonormal old and new (G, 2, R, r), the larger of
    the two factors': ‖old − new newᵀ old‖²."""
    return (old - matmul(new, matmul(new.mT, old))).square().sum(dim=(-2, -1)).amax(dim=-1)


def _chart(anchor: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates W (AᵀW)⁻¹ − A of span(W) around span(A) (both orthonormal, (..., R, r)), and whether they are
    usable. They depend on the subspace only (W → WQ leaves them unchanged) and span(A + coordinates) = span(W)."""
    inverse, info = torch.linalg.inv_ex(matmul(anchor.mT, frames))
    coordinates = matmul(frames, inverse) - anchor
    usable = (info == 0) & torch.isfinite(coordinates).all(dim=(-2, -1))
    return torch.where(usable.unsqueeze(-1).unsqueeze(-1), coordinates, torch.zeros_like(coordinates)), usable


def _anderson_weights(residuals: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Weights α (G, m), Σα = 1, minimising ‖Σ α_i g_i‖ over the valid residuals g_i (G, m, ...) (Anderson
    mixing; lightly regularised, invalid entries weigh 0)."""
    flat = residuals.flatten(2)
    mask = valid.to(flat.dtype)
    gram = matmul(flat, flat.mT) * (mask.unsqueeze(-1) * mask.unsqueeze(-2))
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(dim=-1).clamp_min(torch.finfo(flat.dtype).tiny)
    eye = torch.eye(mask.shape[-1], dtype=flat.dtype, device=flat.device)
    system = gram + (ANDERSON_REGULARIZATION * scale).view(-1, 1, 1) * eye + torch.diag_embed(1 - mask)
    solution, _ = torch.linalg.solve_ex(system, mask.unsqueeze(-1))
    solution = solution.squeeze(-1)
    return solution / solution.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class _Extrapolation:
    """What the accelerated HOOI remembers of each module's last sweeps, in the coordinates of a chart around an
    anchor (G, 2, R, r) (see `_chart`): where the next sweep starts (G, 2, R, r), the sweeps' results
    (G, m, 2, R, r) and their residuals (result − start), which entries are valid (G, m), whether the next
    candidate is the line search's rather than Anderson's (G,), and the line search's reach (G,)."""

    anchor: torch.Tensor
    position: torch.Tensor
    results: torch.Tensor
    residuals: torch.Tensor
    valid: torch.Tensor
    searching: torch.Tensor
    reach: torch.Tensor

    @staticmethod
    def start(frames: torch.Tensor) -> _Extrapolation:
        """An empty history anchored at the start frames (G, 2, R, r)."""
        history = frames.new_zeros((frames.shape[0], ANDERSON_WINDOW, *frames.shape[1:]))
        valid = torch.zeros(history.shape[:2], dtype=torch.bool, device=frames.device)
        reach = torch.ones_like(frames[:, 0, 0, 0])
        return _Extrapolation(frames, torch.zeros_like(frames), history, history.clone(), valid, valid[:, 0], reach)

    def select(self, index: torch.Tensor) -> _Extrapolation:
        """The modules `index` picks."""
        return _Extrapolation(*(getattr(self, item.name)[index] for item in fields(self)))


def _completed(frames: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (..., R, p) that start with an orthonormal basis of the frames (..., R, r) and go on with the blocks'
    own other columns (they only seed the next refinement, which needs them independent, not orthonormal), and
    whether that worked (where not: the blocks themselves)."""
    rank = frames.shape[-1]
    basis, usable = _orthonormalize(frames)
    usable = usable.all(dim=-1)  # both factors
    completed = torch.cat([basis, blocks[..., rank:]], dim=-1)
    return torch.where(usable.view(-1, 1, 1, 1), completed, blocks), usable


def _extrapolate(
    cores: FactoredCores,
    memory: _Extrapolation,
    swept: torch.Tensor,
    swept_energy: torch.Tensor,
    sweep: int,
) -> tuple[_Extrapolation, torch.Tensor, torch.Tensor]:
    """After a sweep from memory.position to `swept` (blocks (G, 2, R, p)), the next point: one candidate, taken
    only if it keeps at least the swept energy, else the swept blocks. The candidate is Anderson's extrapolation
    over the last sweeps; once that was refused, a step `reach` times the last sweep's beyond it (a line search,
    its reach doubled while it gains), until that too is refused: then the history restarts at the swept point.
    Returns the new memory, the next blocks and their energy (never below `swept_energy`)."""
    rank, slot = memory.anchor.shape[-1], sweep % ANDERSON_WINDOW
    swept_coordinates, usable = _chart(memory.anchor, swept[..., :rank])
    memory.results[:, slot] = swept_coordinates  # the window's oldest entry makes way
    memory.residuals[:, slot] = swept_coordinates - memory.position
    memory.valid[:, slot] = usable.all(dim=-1)
    weights = _anderson_weights(memory.residuals, memory.valid)
    mixed = torch.einsum("gm,gm...->g...", weights, memory.results)
    beyond = swept_coordinates + memory.reach.view(-1, 1, 1, 1) * memory.residuals[:, slot]
    searching = memory.searching
    coordinates = torch.where(searching.view(-1, 1, 1, 1), beyond, mixed)
    candidate, usable = _completed(memory.anchor + coordinates, swept)
    candidate_energy = cores.energy(candidate[:, 0, :, :rank], candidate[:, 1, :, :rank])
    gains = torch.where(searching, candidate_energy > swept_energy, candidate_energy >= swept_energy)  # NaN: no
    taken = usable & gains
    restart = searching & ~taken
    # where the next sweep starts: span(anchor + c) has coordinates c (Aᵀc = 0 for all coordinates); 0 at a restart
    position = torch.where(taken.view(-1, 1, 1, 1), coordinates, swept_coordinates)
    reach = torch.where(searching & taken, 2 * memory.reach, memory.reach / 2).clamp(1, LINE_SEARCH_MAX_REACH)
    memory = _Extrapolation(
        anchor=torch.where(restart.view(-1, 1, 1, 1), swept[..., :rank], memory.anchor),
        position=torch.where(restart.view(-1, 1, 1, 1), torch.zeros_like(position), position),
        results=memory.results,
        residuals=memory.residuals,
        valid=memory.valid & ~restart.unsqueeze(-1),
        searching=searching == taken,  # Anderson refused: search; the search gains: go on searching
        reach=reach,
    )
    chosen = torch.where(taken.view(-1, 1, 1, 1), candidate, swept)
    return memory, chosen, torch.where(taken, candidate_energy, swept_energy)


def _canonical_frames(cores: FactoredCores, frames: torch.Tensor) -> torch.Tensor:
    """The frames (G, 2, R, r) rotated inside their spans to HOOI's bases: u the left singular vectors of
    [C_1 v … C_T v] within span(u) and v those of [C_1ᵀ u … C_Tᵀ u] within span(v), by decreasing singular
    value; i.e. the eigenvectors of Σ_t M_t M_tᵀ and Σ_t M_tᵀ M_t, M_t = uᵀ C_t v (the coordinates a rule sees
    depend on these bases, not only on the spans)."""
    coordinates = cores.project(frames[:, 0], frames[:, 1])
    left = _top_eigenvectors(matmul(coordinates, coordinates.mT).sum(dim=-3), coordinates.shape[-1], small_linalg.eigh)
    right = _top_eigenvectors(matmul(coordinates.mT, coordinates).sum(dim=-3), coordinates.shape[-1], small_linalg.eigh)
    return torch.stack([matmul(frames[:, 0], left), matmul(frames[:, 1], right)], dim=1)


def _hooi(cores: FactoredCores, rank: int, tolerance: float, max_sweeps: int) -> SharedFrame:
    """HOOI on a flat batch of factored cores (G, ...), started from the HOSVD: the top-r eigenvectors of the Gram
    matrices (Σ_t C_t C_tᵀ, Σ_t C_tᵀ C_t). Each factor is carried as a block of up to 2r leading eigenvectors that
    every half-sweep refines (`refine_eigenvectors`).

    Sweeps are accelerated (`_extrapolate`): after each sweep the next one starts from an extrapolation of the
    last sweeps when that keeps at least the sweep's energy, so the energy never falls and the fixed points are
    HOOI's. A module stops once a plain sweep from where it stands raises its energy by less than `tolerance`
    (relative, DESIGN's rule) and moves each subspace by at most `tolerance` (the root sum of squares of the sines
    of its principal angles): an energy gain alone can be tiny far from the fixed point where the energy is flat.
    Stopped modules leave the batch (compaction), so a sweep costs what the modules still sweeping cost. The
    frames' bases are HOOI's (`_canonical_frames`)."""
    grams = cores.grams()
    width = min(grams[0].shape[-1], max(rank, min(2 * rank, DIRECT_EIGH_MAX_SIZE)))
    blocks = torch.stack([_top_eigenvectors(gram, width, small_linalg.eigh) for gram in grams], dim=1)
    energy = cores.energy(blocks[:, 0, :, :rank], blocks[:, 1, :, :rank])
    sweeps = torch.zeros(energy.shape, dtype=torch.int64, device=energy.device)
    members, batch = torch.arange(energy.shape[0], device=energy.device), cores
    running = torch.ones(members.shape, dtype=torch.bool, device=energy.device)
    memory = _Extrapolation.start(blocks[..., :rank])
    check_interval = CUDA_CHECK_INTERVAL if energy.device.type == "cuda" else CPU_CHECK_INTERVAL
    for sweep in range(max_sweeps):
        old_blocks, old_energy = blocks[members], energy[members]
        new_blocks, new_energy = _sweep(batch, old_blocks, rank)
        gain = (new_energy - old_energy) / old_energy.clamp_min(torch.finfo(energy.dtype).tiny)
        moved = _subspace_change(old_blocks[..., :rank], new_blocks[..., :rank])
        settled = ~(gain >= tolerance) & ~(moved > tolerance**2)  # NaN settles: no sweep can mend it
        memory, next_blocks, next_energy = _extrapolate(batch, memory, new_blocks, new_energy, sweep)
        next_blocks = torch.where(settled.view(-1, 1, 1, 1), new_blocks, next_blocks)
        next_energy = torch.where(settled, new_energy, next_energy)
        keep = running.view(-1, 1, 1, 1)  # index_copy_ with torch.where: no host sync, unlike boolean indexing
        blocks.index_copy_(0, members, torch.where(keep, next_blocks, old_blocks))
        energy.index_copy_(0, members, torch.where(running, next_energy, old_energy))
        sweeps.index_add_(0, members, running.to(torch.int64))
        running = running & ~settled
        if (sweep + 1) % check_interval:
            continue
        still = int(running.sum())
        progress.emit("HOOI", sweep + 1, None, "sweeps", f"{still} of {energy.shape[0]} modules still iterating")
        if still == 0:
            break
        if still <= COMPACTION_FRACTION * members.numel():
            members, batch, memory = members[running], batch.select(running), memory.select(running)
            running = running[running]
    frames = _canonical_frames(cores, blocks[..., :rank])
    total = cores.norms().square().sum(dim=-1)
    return SharedFrame(frames[:, 0], frames[:, 1], sweeps, energy, total)


def per_task_products(left: torch.Tensor, right: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """[left[..., :, I_t] @ right[..., I_t, :]]_t (..., T, m, n): one product per task's columns I_t.

    With equal ranks this is one batched product over a (T, r_t) view; otherwise one per task.
    """
    if len(set(ranks)) == 1:
        tasks, rank = len(ranks), ranks[0]
        return matmul(left.unflatten(-1, (tasks, rank)).movedim(-2, -3), right.unflatten(-2, (tasks, rank)))
    return torch.stack([matmul(left[..., :, cols], right[..., cols, :]) for cols in column_slices(ranks)], dim=-3)


@dataclass(frozen=True)
class FactoredCores:
    """The cores C_t = scales_t · b[..., :, I_t] · a[..., :, I_t]ᵀ, kept as their two R × R factors.

    The T cores take T·R² numbers, the factors 2·R²: at T = 100 adapters of rank 16 (R = 1600) that is
    2 GB against 41 MB per module in float64, and a product C_t v costs R·r_t·r instead of R²·r.
    """

    b: torch.Tensor  # (..., R, R), float64: Q_Bᵀ B_cat
    a: torch.Tensor  # (..., R, R), float64: Q_Aᵀ A_catᵀ
    ranks: list[int]
    scales: torch.Tensor  # (..., T)

    def flat(self) -> FactoredCores:
        """The same cores with the leading dimensions flattened into one (G, ...)."""
        size = self.b.shape[-1]
        return replace(
            self,
            b=self.b.reshape(-1, size, size),
            a=self.a.reshape(-1, size, size),
            scales=self.scales.reshape(-1, self.scales.shape[-1]),
        )

    def select(self, index: torch.Tensor) -> FactoredCores:
        """The modules `index` picks from a flat batch (indices or a boolean mask)."""
        return replace(self, b=self.b[index], a=self.a[index], scales=self.scales[index])

    def _scaled_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (..., R, k) with each task's rows I_t times its scale: the scales applied on the small side of
        a per-task product (built on the device: no host copy, so no host sync, inside HOOI's sweeps)."""
        batch = self.scales.shape[:-1]
        columns = [self.scales[..., t : t + 1].expand(*batch, rank) for t, rank in enumerate(self.ranks)]
        return rows * torch.cat(columns, dim=-1).unsqueeze(-1)

    def times_right(self, v: torch.Tensor) -> torch.Tensor:
        """[C_t v]_t (..., T, R, r) for v (..., R, r)."""
        return per_task_products(self.b, self._scaled_rows(matmul(self.a.mT, v)), self.ranks)

    def times_left(self, u: torch.Tensor) -> torch.Tensor:
        """[C_tᵀ u]_t (..., T, R, r) for u (..., R, r)."""
        return per_task_products(self.a, self._scaled_rows(matmul(self.b.mT, u)), self.ranks)

    def project(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Coordinates M_t = uᵀ C_t v (..., T, r, r), as `project` gives them for dense cores."""
        return per_task_products(matmul(u.mT, self.b), self._scaled_rows(matmul(self.a.mT, v)), self.ranks)

    def energy(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Σ_t ‖uᵀ C_t v‖² (...,): the energy a frame (u, v) captures."""
        return self.project(u, v).square().sum(dim=(-3, -2, -1))

    def norms(self) -> torch.Tensor:
        """‖C_t‖ (..., T) from the r_t × r_t blocks of bᵀb and aᵀa: ‖B A‖² = Σ (BᵀB) ⊙ (AᵀA)."""
        products = matmul(self.b.mT, self.b) * matmul(self.a.mT, self.a)
        squares = torch.stack([products[..., cols, cols].sum(dim=(-2, -1)) for cols in column_slices(self.ranks)], -1)
        return squares.clamp_min(0).sqrt() * self.scales.abs()

    def dense(self) -> torch.Tensor:
        """The cores themselves (..., T, R, R), as `core_space` gives them."""
        return per_task_products(self.b, self._scaled_rows(self.a.mT), self.ranks)

    def combined(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Σ_t c_t C_t (..., R, R) for coefficients (T,) or (..., T): one product b · diag(c_t s_t on I_t) · aᵀ,
        without the T cores."""
        weighted = replace(self, scales=self.scales * coefficients.to(self.scales))
        return matmul(self.b, weighted._scaled_rows(self.a.mT))

    def task_svds(self) -> SvdForm:
        """Every core's thin SVD from its factors, C_t = U_t diag(σ_t) V_tᵀ: U_t, V_t (..., T, R, ρ), σ_t (..., T, ρ)
        decreasing, with ρ = max r_t (σ = 0 past a task's rank). Each task's R × r_t factors split into an
        orthonormal basis and its r_t × r_t coordinates (from their Gram matrix, as the core space itself: an r_t ×
        r_t `eigh` that a GPU solves for the whole batch at once, where a QR of R × r_t loops), then an SVD of
        r_t × r_t: R·r_t² work per task instead of an R × R SVD of the core."""
        q_b, r_b = _basis_and_coordinates(self._task_columns(self.b))
        q_a, r_a = _basis_and_coordinates(self._task_columns(self._scaled_rows(self.a.mT).mT))
        p, s, qh = small_linalg.svd(matmul(r_b, r_a.mT))
        return SvdForm(matmul(q_b, p), s, matmul(q_a, qh.mT))

    def _task_columns(self, factor: torch.Tensor) -> torch.Tensor:
        """(..., R, R) → (..., T, R, ρ): each task's columns I_t, padded with zero columns to ρ = max r_t."""
        tasks, width = len(self.ranks), max(self.ranks)
        if len(set(self.ranks)) == 1:
            return factor.unflatten(-1, (tasks, width)).movedim(-2, -3)
        padded = [
            torch.nn.functional.pad(factor[..., :, cols], (0, width - (cols.stop - cols.start)))
            for cols in column_slices(self.ranks)
        ]
        return torch.stack(padded, dim=-3)

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_t C_t C_tᵀ, Σ_t C_tᵀ C_t), HOOI's HOSVD start, as b·D_a·bᵀ and a·D_b·aᵀ with D block-diagonal."""
        weights = torch.repeat_interleave(self.scales.square(), torch.tensor(self.ranks, device=self.b.device), dim=-1)
        blocks = torch.block_diag(*(torch.ones(rank, rank) for rank in self.ranks)).to(self.b)
        mask = blocks * weights.unsqueeze(-1)
        left = matmul(matmul(self.b, matmul(self.a.mT, self.a) * mask), self.b.mT)
        return left, matmul(matmul(self.a, matmul(self.b.mT, self.b) * mask), self.a.mT)


@dataclass(frozen=True)
class FactoredCoreSpace:
    """`CoreSpace` with the cores kept factored (see FactoredCores)."""

    left: torch.Tensor  # (..., R, R), float64
    right: torch.Tensor  # (..., R, R), float64
    cores: FactoredCores


def factored_core_space(
    b_cat: torch.Tensor, a_cat: torch.Tensor, ranks: list[int], any_basis: bool = False
) -> FactoredCoreSpace:
    """`core_space` without forming the T cores: the same frames, cores.dense() equals its cores; with `any_basis`,
    for a merge whose result does not depend on the basis, any orthonormal one (`gram_frame`)."""
    left, r_b = gram_frame(float64_gram(b_cat), any_basis)
    right, r_a = gram_frame(float64_gram(a_cat.mT), any_basis)
    scales = torch.ones(*r_b.shape[:-2], len(ranks), dtype=torch.float64, device=r_b.device)
    progress.add("core spaces", math.prod(b_cat.shape[:-2]), "modules")
    return FactoredCoreSpace(left=left, right=right, cores=FactoredCores(r_b, r_a, list(ranks), scales))


def balance_factored(cores: FactoredCores, beta: float) -> FactoredCores:
    """CtM's balancing of the cores: rescale each task towards the mean norm (β=1: unchanged, β=0: equal norms);
    only the per-task scales change."""
    return replace(cores, scales=cores.scales * _balancing_factors(cores.norms(), beta))


def shared_frame_factored(
    cores: FactoredCores, rank: int, tolerance: float = HOOI_TOLERANCE, max_sweeps: int = HOOI_MAX_SWEEPS
) -> SharedFrame:
    """Rank-(r, r) partial Tucker of the cores over their first two modes by HOOI (DESIGN §1), each C_t v taken
    as b_t (a_tᵀ v): started from the HOSVD, alternating the two factor updates (accelerated, see `_hooi`) until a
    sweep raises the captured energy by less than `tolerance` (relative) and moves the subspaces by less than it,
    or `max_sweeps` is reached."""
    return shared_frames_factored([cores], [rank], tolerance, max_sweeps)[0]


def shared_frames_factored(
    batches: list[FactoredCores], ranks: list[int], tolerance: float = HOOI_TOLERANCE, max_sweeps: int = HOOI_MAX_SWEEPS
) -> list[SharedFrame]:
    """`shared_frame_factored` of several batches of cores (modules of different shapes, say) at once: batches
    with equal core ranks and output rank run one HOOI together, so a sweep costs one set of kernel launches
    for all of them; each module's result is the one it gets alone."""
    frames: dict[int, SharedFrame] = {}
    buckets: dict[tuple, list[int]] = {}
    for index, (cores, rank) in enumerate(zip(batches, ranks, strict=True)):
        buckets.setdefault((tuple(cores.ranks), rank, cores.b.device), []).append(index)
    for (_, rank, _), members in buckets.items():
        flat = [batches[index].flat() for index in members]
        joined = replace(
            flat[0],
            b=torch.cat([cores.b for cores in flat]),
            a=torch.cat([cores.a for cores in flat]),
            scales=torch.cat([cores.scales for cores in flat]),
        )
        frame = _hooi(joined, rank, tolerance, max_sweeps)
        start = 0
        for index, cores in zip(members, flat, strict=True):
            part = slice(start, start + cores.b.shape[0])
            start = part.stop
            frames[index] = _unflatten(frame, part, batches[index].scales.shape[:-1])
    return [frames[index] for index in range(len(batches))]


def whole_frame(cores: FactoredCores) -> SharedFrame:
    """The frame that is the whole core space (u = v = I, R × R): CtM's frame at r' = R, where no HOOI is needed
    since every direction is kept."""
    size = cores.b.shape[-1]
    batch = cores.scales.shape[:-1]
    eye = torch.eye(size, dtype=cores.b.dtype, device=cores.b.device).expand(*batch, size, size)
    total = cores.norms().square().sum(dim=-1)
    return SharedFrame(eye, eye, torch.zeros(batch, dtype=torch.int64, device=total.device), total, total)


def _unflatten(frame: SharedFrame, part: slice, batch: torch.Size) -> SharedFrame:
    """The modules `part` of a flat frame, with the leading dimensions `batch` restored."""
    size, rank = frame.u.shape[-2:]
    return SharedFrame(
        u=frame.u[part].reshape(*batch, size, rank),
        v=frame.v[part].reshape(*batch, size, rank),
        **{
            name: getattr(frame, name)[part].reshape(batch)
            for name in ("sweeps", "energy", "total_energy")
        },
    )


@dataclass(frozen=True)
class SvdForm:
    """A matrix (or a stack of them) as u·diag(s)·vᵀ, u and v with orthonormal columns, s in any order and of
    any sign: a rule's result that needs no SVD to be cut (`truncate_svd_form`)."""

    u: torch.Tensor  # (..., m, k)
    s: torch.Tensor  # (..., k)
    v: torch.Tensor  # (..., n, k)


@dataclass(frozen=True)
class Truncation:
    """A merged matrix split into LoRA maps at rank k, and the share of its energy the cut dropped."""

    to_b: torch.Tensor  # (..., R or out, k)
    to_a: torch.Tensor  # (..., k, R or in)
    lost_energy: torch.Tensor  # (...,) Σ_{i>k} σ_i² / Σ σ_i² (0 for a zero matrix)
    left_basis: torch.Tensor  # (..., m, k): the kept left singular vectors, in the merged matrix's coordinates
    right_basis: torch.Tensor  # (..., n, k): the kept right singular vectors
    values: torch.Tensor  # (..., k): the kept singular values as written (remapped by `spectrum`; signed)


def truncate(
    merged: torch.Tensor,
    rank: int,
    left_map: torch.Tensor | None = None,
    right_map: torch.Tensor | None = None,
    spectrum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Truncation:
    """Best rank-k split of ΔW = L · merged · Rmᵀ into LoRA maps, the singular values shared evenly.

    Returns to_b = L·P_k·√S_k and to_a = √S_k·Q_kᵀ·Rmᵀ (L, Rm default to the identity), so that
    lora_B = b_cat @ to_b, lora_A = to_a @ a_cat when L, Rm map the concatenated factors to the frame.
    `spectrum` remaps the kept singular values first (a spectral rule's rank-k form; a negative value
    puts its sign into to_b). lost_energy is measured on `merged`. The bases hold the kept singular vectors of
    the numerically nonzero values only (zero columns for σ ≤ max(m, n)·eps·σ_max, whose vectors are arbitrary),
    so that they span the output's column and row spaces, never more.
    """
    p, s, qh = small_linalg.svd(merged)
    return _cut(p[..., :rank], s, qh[..., :rank, :].mT, rank, left_map, right_map, spectrum)


def truncate_svd_form(
    form: SvdForm,
    rank: int,
    left_map: torch.Tensor | None = None,
    right_map: torch.Tensor | None = None,
    spectrum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Truncation:
    """`truncate` of the matrix u·diag(s)·vᵀ given in SVD form (one column per value, at least `rank` of them):
    its singular values are |s|, so the cut only orders them; no SVD."""
    order = form.s.abs().argsort(dim=-1, descending=True, stable=True)
    s = form.s.gather(-1, order)
    top = order[..., :rank].unsqueeze(-2)
    signs = torch.where(s[..., :rank] < 0, -1.0, 1.0).to(s).unsqueeze(-2)
    u = form.u.gather(-1, top.expand(*form.u.shape[:-1], rank)) * signs
    v = form.v.gather(-1, top.expand(*form.v.shape[:-1], rank))
    return _cut(u, s.abs(), v, rank, left_map, right_map, spectrum)


def _cut(
    p: torch.Tensor,
    s: torch.Tensor,
    q: torch.Tensor,
    rank: int,
    left_map: torch.Tensor | None,
    right_map: torch.Tensor | None,
    spectrum: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Truncation:
    """The Truncation of P·diag(s)·Qᵀ from its top `rank` singular vectors p, q (..., m or n, k) and all its
    singular values s (decreasing), as `truncate` documents it."""
    kept = s[..., :rank] if spectrum is None else spectrum(s[..., :rank])
    root = kept.abs().sqrt()
    to_b = p * (kept.sign() * root).unsqueeze(-2)
    to_a = q.mT * root.unsqueeze(-1)
    if left_map is not None:
        to_b = matmul(left_map, to_b)
    if right_map is not None:
        to_a = matmul(to_a, right_map.mT)
    energy = s.square()
    total = energy.sum(dim=-1)
    lost = energy[..., rank:].sum(dim=-1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    lost = torch.where(total > 0, lost, torch.zeros_like(total))
    present = numerical_rank_mask(s[..., :rank], max(p.shape[-2], q.shape[-2])).to(s.dtype).unsqueeze(-2)
    return Truncation(to_b, to_a, lost, p * present, q * present, kept)


def numerical_rank_mask(singular_values: torch.Tensor, size: int) -> torch.Tensor:
    """Singular values (..., k), decreasing, above max(m, n)·eps·σ_max (as matrix_rank counts them); `size` is
    max(m, n). The others are numerically absent and their singular vectors arbitrary."""
    eps = torch.finfo(singular_values.dtype).eps
    largest = singular_values[..., :1]
    return singular_values > size * eps * largest


def _frobenius_squared(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖B·A‖² from the factors: Σ (BᵀB) ⊙ (AAᵀ), without forming B·A."""
    return (matmul(b.mT, b) * matmul(a, a.mT)).sum(dim=(-2, -1)).clamp_min(0)


def lowrank_relative_error(
    b_out: torch.Tensor, a_out: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor
) -> torch.Tensor:
    """‖B_o A_o − B_r A_r‖ / ‖B_r A_r‖ in float64 from the factors alone (O((out+in)·k²) work); each factor is
    converted to float64 once."""
    b_ref, a_ref = b_ref.to(torch.float64), a_ref.to(torch.float64)
    b = torch.cat([b_out.to(torch.float64), b_ref], dim=-1)
    b[..., b_out.shape[-1] :].neg_()
    a = torch.cat([a_out.to(torch.float64), a_ref], dim=-2)
    reference = _frobenius_squared(b_ref, a_ref)
    return (_frobenius_squared(b, a) / reference.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()


def energy_in_output_spaces(
    b_out: torch.Tensor, a_out: torch.Tensor, b_cat: torch.Tensor, a_cat: torch.Tensor, ranks: list[int]
) -> torch.Tensor:
    """Per task, ‖Π_col ΔW_t Π_row‖² / ‖ΔW_t‖²: the share of each update inside the output's column
    and row spaces (1 for a task with no update). Shape (..., T)."""
    b_out, a_out = b_out.to(torch.float64), a_out.to(torch.float64)
    b_cat, a_cat = b_cat.to(torch.float64), a_cat.to(torch.float64)
    to_columns, _ = gram_frame(matmul(b_out.mT, b_out))
    to_rows, _ = gram_frame(matmul(a_out, a_out.mT))
    left = matmul(to_columns.mT, matmul(b_out.mT, b_cat))  # (..., k, R): Q_colᵀ B_cat
    right = matmul(matmul(a_cat, a_out.mT), to_rows)  # (..., R, k): A_cat Q_row
    shares = []
    for cols in column_slices(ranks):
        kept = matmul(left[..., cols], right[..., cols, :]).square().sum(dim=(-2, -1))
        whole = _frobenius_squared(b_cat[..., cols], a_cat[..., cols, :])
        shares.append(torch.where(whole > 0, kept / whole.clamp_min(1e-300), torch.ones_like(whole)))
    return torch.stack(shares, dim=-1)
