"""The math on tensors: covariance, closed-form solvers, null space, norm anchor.

Knows nothing of models. Every op has a plain PyTorch reference; faster backends are picked
per device and dtype and can be forced with ``backend=``.
"""

# Covariance statistics and norm anchoring (kernels branch).
from fastedit.linalg.covariance import CovarianceAccumulator
from fastedit.linalg.norm_anchor import anchor_from_norms, clamp_norm, norm_anchor
