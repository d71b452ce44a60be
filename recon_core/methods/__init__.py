"""Registry of reconstruction methods: name → ``"module:Class"``, imported lazily.

Adding a method = one file in this folder + one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from recon_core.methods.base import (  # noqa: F401  (re-exported interface)
    PRESETS,
    MethodParams,
    ProgressCallback,
    ProgressEvent,
    ReconMethod,
    ReconProblem,
    StopRequested,
    load_weights,
    make_problem,
    resolve_preset,
)

METHODS: dict[str, str] = {
    "zero_filled": "recon_core.methods.zero_filled:ZeroFilled",
    "grappa": "recon_core.methods.grappa:Grappa",
    "cg_sense": "recon_core.methods.cg_sense:CGSense",
    "tdip": "recon_core.methods.tdip:TDIP",
    "l1_wavelet": "recon_core.methods.l1_wavelet:L1Wavelet",
    "l_plus_s": "recon_core.methods.l_plus_s:LPlusS",
    "kt_slr": "recon_core.methods.kt_slr:KtSLR",
    "grasp": "recon_core.methods.grasp:GRASP",
    "dc_cnn": "recon_core.methods.dc_cnn:DCCNN",
    "inr": "recon_core.methods.inr:INR",
    "cgpd_csnet": "recon_core.methods.cgpd_csnet:CGPDCSNet",
    "slr_net": "recon_core.methods.slr_net:SLRNet",
    "dc_cnn_lr": "recon_core.methods.dc_cnn_lr:DCCNNLR",
    "convdecoder": "recon_core.methods.convdecoder:ConvDecoderMethod",
    "gip": "recon_core.methods.gip:GIP",
}


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[ReconMethod]:
    """The method class registered as ``name``; ``KeyError`` listing valid names otherwise."""
    try:
        target = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown reconstruction method {name!r}; available: {available_methods()}") from None
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls


def make_method(name: str, **params: Any) -> ReconMethod:
    """Instantiate method ``name`` with parameter overrides (unknown keys raise ``KeyError``)."""
    return get_method(name)(**params)
