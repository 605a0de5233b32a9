"""Faithful baselines: the reference research code's algorithms, re-written here (our own code)
so that benchmarks can run them side by side with fastedit in one process.

Each helper appends its functions as one contiguous block, headed by the op it stands for.
"""
from __future__ import annotations

import torch


# --- covariance statistics (fastedit.stats) -------------------------------------------------
# The references' layer_stats: for each layer separately, a float32 forward pass over every
# batch, stopped once the layer's rewrite module has run, and a float32 running sum
# mom2 += xᵀx of its input over the non-pad tokens (SecondMoment.add on flattened features).

class _StopAfterLayer(Exception):
    pass


def covariance_per_layer_fp32(model, module_names, batches):
    """{name: (Σ xᵀx float32 (d_k, d_k), token count)} with one pass per module, as the references.

    ``batches`` yields (input_ids, attention_mask) pairs on the model's device.
    """
    out = {}
    for name in module_names:
        module = model.get_submodule(name)
        seen = {}

        def hook(mod, args, output):
            seen["x"] = args[0]
            raise _StopAfterLayer

        handle = module.register_forward_hook(hook)
        mom2, count = None, 0
        try:
            with torch.no_grad():
                for input_ids, attention_mask in batches:
                    try:
                        model(input_ids=input_ids, attention_mask=attention_mask)
                    except _StopAfterLayer:
                        pass
                    feats = seen.pop("x")[attention_mask.bool()].to(torch.float32)
                    mom2 = feats.T @ feats if mom2 is None else mom2 + feats.T @ feats
                    count += feats.shape[0]
        finally:
            handle.remove()
        out[name] = (mom2, count)
    return out
# --- end covariance statistics -------------------------------------------------------------
