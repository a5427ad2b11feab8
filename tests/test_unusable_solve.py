"""An unusable iHVP solve never becomes a ranking, even with ``solver.allow_unconverged=true``
(issue 10): a CG breakdown at the first step (``s = 0``) or a diverging series is refused in
one line; a loose but useful solve is still returned with its residual."""

from __future__ import annotations

import pytest
import torch

from metaif_cli.errors import MetaifError
from metaif_cli.influence import compute
from metaif_cli.influence.config import HessianConfig, SolverConfig
from metaif_cli.score.config import ScoreConfig

DT = torch.float64


class MatrixProblem:
    """A stand-in problem whose total Hessian is a fixed matrix."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h, self.n, self.delta_reg = h, 4, 0.0

    def hvp(self, theta, vec, index, form):
        return self.h @ vec


def _cfg(solver: str, **kw) -> ScoreConfig:
    return ScoreConfig(hessian=HessianConfig(damping=0.0, auto_damping=False, num_tasks=None),
                       solver=SolverConfig(name=solver, allow_unconverged=True, **kw), progress=False)


INDEFINITE = torch.diag(torch.tensor([-2.0, 1.0, 3.0], dtype=DT))
B = torch.tensor([1.0, 0.1, 0.1], dtype=DT)  # mostly along the negative direction: b^T H b < 0


@pytest.mark.parametrize("solver, kw", [("cg", {}), ("neumann", dict(terms=50)),
                                        ("lissa", dict(depth=50, lissa_tasks=4))])
def test_unusable_solve_is_refused_even_when_unconverged_is_allowed(solver, kw):
    with pytest.raises(MetaifError) as info:
        compute.solve_ihvp(MatrixProblem(INDEFINITE), torch.zeros(3, dtype=DT), B, _cfg(solver, **kw))
    msg = str(info.value)
    assert "\n" not in msg and "allow_unconverged" in msg and repr(solver) in msg


def test_loose_solve_is_returned_with_its_residual():
    h = torch.diag(torch.tensor([1.0, 2.0, 30.0], dtype=DT))
    res, _ = compute.solve_ihvp(MatrixProblem(h), torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT),
                                _cfg("neumann", terms=3, tol=1e-8))
    assert not res.converged and 0 < res.residual < 1 and bool(res.x.ne(0).any())


def test_dense_solves_the_indefinite_system():
    res, _ = compute.solve_ihvp(MatrixProblem(INDEFINITE), torch.zeros(3, dtype=DT), B, _cfg("dense"))
    torch.testing.assert_close(INDEFINITE @ res.x, B)
