"""Helpers the tests share (fixtures live in conftest.py): ..."""

from __future__ import annotations

import torch

from ctm_cli import core_space as cs
from ctm_cli.fixed_order import matmul

# ------------------------------------------------------------------------------------------------ core space


def dense_cores(cores: cs.FactoredCores) -> torch.Tensor:
    """The factored cores formed in full (..., T, R, R), as `cs.core_space` gives them."""
    return cs.per_task_products(cores.b, cores.a.mT, cores.ranks) * cores.scales.unsqueeze(-1).unsqueeze(-1)


def project(cores: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Coordinates M_t = uᵀ C_t v of every dense core in the frame (u, v) (..., T, r, r)."""
    return matmul(matmul(u.mT.unsqueeze(-3), cores), v.unsqueeze(-3))


def shared_frame(
    cores: cs.FactoredCores, rank: int, tolerance: float = cs.HOOI_TOLERANCE, max_sweeps: int = cs.HOOI_MAX_SWEEPS
) -> cs.SharedFrame:
    """The HOOI frame of one batch of cores."""
    return cs.shared_frames_factored([cores], [rank], tolerance, max_sweeps)[0]


def hosvd_energy(cores: cs.FactoredCores, rank: int) -> torch.Tensor:
    """Σ_t ‖uᵀ C_t v‖² (...,) in HOOI's start, the HOSVD: u, v the top-r eigenvectors of Σ C_t C_tᵀ, Σ C_tᵀ C_t."""
    left, right = cores.grams()
    u = torch.linalg.eigh(left).eigenvectors[..., -rank:]
    v = torch.linalg.eigh(right).eigenvectors[..., -rank:]
    return matmul(cores.times_left(u).mT, v.unsqueeze(-3)).square().sum(dim=(-3, -2, -1))
