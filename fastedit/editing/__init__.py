"""Requests, context templates, batched v*, keys, the method drivers and the Editor."""
from fastedit.editing.context import context_templates
from fastedit.editing.editor import BatchReport, EditReport, Editor
from fastedit.editing.hparams import EditParams
from fastedit.editing.keys import block_outputs_at_lookup, compute_keys
from fastedit.editing.requests import Request, load_records, requests_from_records, validate_requests
from fastedit.editing.targets import Targets, VStarParams, compute_targets

__all__ = ["BatchReport", "EditParams", "EditReport", "Editor", "Request", "Targets", "VStarParams",
           "block_outputs_at_lookup", "compute_keys", "compute_targets", "context_templates", "load_records",
           "requests_from_records", "validate_requests"]
