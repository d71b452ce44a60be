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
    "eigen_channel": "gadgets.image_ops:EigenChannelGadget",
    "coil_estimate": "gadgets.coils:CoilEstimateGadget",
    "grappa_maps": "gadgets.image_ops:GrappaMapsGadget",
    "recon": "gadgets.recon:ReconGadget",
    "simple_recon": "gadgets.image_ops:SimpleReconGadget",
    "partial_fourier": "gadgets.image_ops:PartialFourierGadget",
    "kspace_filter": "gadgets.image_ops:KSpaceFilterGadget",
    "fov_adjust": "gadgets.image_ops:FovAdjustGadget",
    "image_scale": "gadgets.image_ops:ImageScaleGadget",
    "noise_std_map": "gadgets.image_ops:NoiseStdMapGadget",
    "image_export": "gadgets.export:ImageExportGadget",
    "complex_to_float": "gadgets.image_ops:ComplexToFloatGadget",
    "extract": "gadgets.image_ops:ExtractGadget",
    "auto_scale": "gadgets.image_ops:AutoScaleGadget",
    "float_to_ushort": "gadgets.image_ops:FloatToUShortGadget",
    "noise_summary": "gadgets.gadgetron_compat:NoiseSummaryGadget",
}


def gadgetron_classes() -> dict[str, str | None]:
    """Gadgetron class name → our gadget (None: absorbed by another step), from
    :data:`gadgets.stream.gadgetron_xml.CLASSES` (the property-by-property mapping lives there)."""
    from gadgets.stream.gadgetron_xml import CLASSES

    return {name: rule.gadget for name, rule in CLASSES.items()}


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
