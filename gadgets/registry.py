"""Registry of gadgets: chain name → ``"module:Class"`` (imported lazily), and Gadgetron class names.

A name arriving over the network is only ever looked up here, never imported as a module.
"""

from __future__ import annotations

import importlib

from gadgets.base import Gadget

GADGETS: dict[str, str] = {
    "noise": "gadgets.noise:NoiseGadget",
    "remove_oversampling": "gadgets.oversampling:RemoveOversamplingGadget",
    "buffer": "gadgets.buffer:BufferGadget",
    "coil_compress": "gadgets.coils:CoilCompressGadget",
    "coil_estimate": "gadgets.coils:CoilEstimateGadget",
    "recon": "gadgets.recon:ReconGadget",
    "image_export": "gadgets.export:ImageExportGadget",
}

# Gadgetron class names whose meaning matches one of ours (CHAINS.md §3).
GADGETRON_CLASSES: dict[str, str] = {
    "NoiseAdjustGadget": "noise",
    "RemoveROOversamplingGadget": "remove_oversampling",
    "AcquisitionAccumulateTriggerGadget": "buffer",
    "BucketToBufferGadget": "buffer",
    "PCACoilGadget": "coil_compress",
    "CoilReductionGadget": "coil_compress",
    "GenericReconEigenChannelGadget": "coil_compress",
    "GenericReconCartesianReferencePrepGadget": "coil_estimate",
    "CoilMapGadget": "coil_estimate",
    "GenericReconCartesianGrappaGadget": "recon",
    "GenericReconCartesianSpiritGadget": "recon",
    "GenericReconCartesianNonLinearSpirit2DTGadget": "recon",
    "ImageFinishGadget": "image_export",
}


def available_gadgets() -> list[str]:
    return sorted(GADGETS)


def get_gadget(name: str) -> type[Gadget]:
    """The gadget class registered as ``name`` (KeyError listing valid names otherwise)."""
    try:
        target = GADGETS[name]
    except KeyError:
        raise KeyError(f"unknown gadget {name!r}; available: {available_gadgets()}") from None
    module_name, _, cls_name = target.partition(":")
    return getattr(importlib.import_module(module_name), cls_name)
