"""The math on tensors: covariance, closed-form solvers, null space, norm anchor.

Knows nothing of models. Every op has a plain PyTorch reference; faster backends (Triton
kernels, compiled ops) are picked per device and dtype in one place,
:mod:`fastedit.linalg.backends`, and can be forced with ``backend=``.
"""

# Closed-form solvers (cholesky, woodbury, solver, null_space).
from fastedit.linalg.cholesky import cholesky_ex, cholesky_factor, pivot_ratio
from fastedit.linalg.null_space import NullSpace, alphaedit_dense_reference
from fastedit.linalg.solver import UpdateSolver, memit_solve
from fastedit.linalg.woodbury import woodbury_solve

# Covariance statistics and norm anchoring (kernels branch).
from fastedit.linalg.covariance import CovarianceAccumulator
from fastedit.linalg.norm_anchor import anchor_from_norms, clamp_norm, norm_anchor
