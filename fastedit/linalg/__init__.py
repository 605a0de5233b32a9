"""The math on tensors: covariance, closed-form solvers, null space, norm anchor.

Knows nothing of models. Every op has a plain PyTorch reference; faster backends are picked
per device and dtype and can be forced with ``backend=``.
"""
