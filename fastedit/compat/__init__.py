"""Drop-in entry points for users of EasyEdit and of the MEMIT / AlphaEdit / BLUE research code.

- :func:`load_hparams`: the references' JSON and EasyEdit's YAML hyper-parameter files →
  :class:`ReferenceConfig` (EditParams + method/strategy/NAS/regulariser), every key accounted for.
- :func:`apply_memit_to_model`, :func:`apply_AlphaEdit_to_model`: the reference signatures and
  return values (AlphaEdit's P / cache_c carried as an :class:`AlphaEditState`).
- :class:`ReferenceStats`, :func:`export_reference_stats`: the references' ``.npz`` statistics,
  read with their normalisation, and fastedit's statistics written in their layout.
- :func:`to_request`, :func:`easyedit_records`: the reference's and EasyEdit's request shapes.
"""
from fastedit.compat.hparams import ReferenceConfig, load_hparams
from fastedit.compat.reference import AlphaEditState, apply_AlphaEdit_to_model, apply_memit_to_model
from fastedit.compat.requests import easyedit_records, to_request
from fastedit.stats.reference import ReferenceStats, export_reference_stats, is_reference_dir

__all__ = ["AlphaEditState", "ReferenceConfig", "ReferenceStats", "apply_AlphaEdit_to_model", "apply_memit_to_model",
           "easyedit_records", "export_reference_stats", "is_reference_dir", "load_hparams", "to_request"]
