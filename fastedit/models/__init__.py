"""Architecture adapters: where keys, values, blocks, final norm and LM head live. Knows
nothing of editing methods."""
from fastedit.models.adapters import LAYOUTS, Layout, ModelAdapter, get_adapter, load_layout
from fastedit.models.hooks import StopForward, capture, edit_output, forward_until
from fastedit.models.tiny import tiny_model

__all__ = ["LAYOUTS", "Layout", "ModelAdapter", "get_adapter", "load_layout", "StopForward", "capture", "edit_output",
           "forward_until", "tiny_model"]
