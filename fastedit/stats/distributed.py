"""Data-parallel statistics: each rank reads its shard of the documents; sums are all-reduced.

Active when ``torch.distributed`` is initialised (NCCL on GPUs, gloo on CPU). Rank r reads
the selected documents at positions r, r + W, r + 2W, ... of the selection (W = world size),
and at the end the float64 sums and the token counts are summed over ranks, so every rank
returns the statistics of the whole selection.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastedit.linalg import CovarianceAccumulator


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(indices: Sequence[int], rank: int, world_size: int) -> Sequence[int]:
    """This rank's documents: every ``world_size``-th selected index, from position ``rank``."""
    return indices[rank::world_size]


def all_reduce(accs: dict) -> dict:
    """Sum each accumulator's float64 sum and its count over all ranks (identity on one rank).

    The counts travel as one int64 tensor, the sums one all_reduce per layer, on the device
    of the accumulators (the process group's backend must support it: NCCL for CUDA tensors,
    gloo for CPU ones).
    """
    if world()[1] == 1:
        return accs
    dist = torch.distributed
    layers = list(accs)
    device = accs[layers[0]].device or torch.device("cpu")
    counts = torch.tensor([accs[l].count for l in layers], dtype=torch.int64, device=device)
    dist.all_reduce(counts)
    out = {}
    for i, l in enumerate(layers):
        total = accs[l].sum.to(device)
        dist.all_reduce(total)
        out[l] = CovarianceAccumulator.from_sum(total, int(counts[i]), backend=accs[l].backend)
    return out
