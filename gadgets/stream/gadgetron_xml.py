"""Gadgetron chain XML (legacy ``<gadgetronStreamConfiguration>`` and v2 ``<configuration>``) → ChainSpec.

Gadgetron's classes are mapped onto our gadgets class by class and property by property
(:data:`CLASSES`). Each Gadgetron property is either

* **translated** into a parameter of ours with the same meaning,
* **ignored with a logged reason** when it cannot change the images (debug folders, verbosity,
  timing, sorting inside Gadgetron's own buffers …: :data:`COMMON_IGNORED` and each class's own), or
* **refused** with a ChainError naming the file, line, class, property and value when it would
  change the images in a way we do not reproduce.

A class with no step of its own (AsymmetricEchoAdjustRO: the buffer places asymmetric echoes itself;
GenericReconCartesianReferencePrep: the buffer keeps calibration lines apart) is logged with the
reason. Consecutive AcquisitionAccumulateTrigger + BucketToBuffer merge into one ``buffer`` step.
Gadgetron's acquisition-level coil reduction (PCACoil + CoilReduction) becomes ``coil_compress``
right after the buffer (our coil gadgets work on k-space buffers). An image-stage gadget
(ComplexToFloat, Extract, AutoScale, FloatToUShort) after a reconstruction gets an ``image_export``
(complex, Gadgetron's ImageArraySplit) in front of it; a chain that ends on image arrays gets one at
the end. ``image_series`` of a reconstruction becomes the series index of the images.

Stream nodes other than ``<gadget>``:

* ``<parallel>``: Gadgetron's GRAPPA pattern (branch AcquisitionFanout, streams ImageAccumulator and
  cpu/gpuWeightsCalculator, merge Unmixing) is a GRAPPA reconstruction (coil maps + ``recon`` with
  ``method: grappa``); any other branch/merge is refused naming both classes.
* ``<parallelprocess>``: its ``<purestream>`` gadgets run in line (the same images, one worker).
* ``<external>`` with ``<execute name="gadgets.external" target=T type="python"/>``: our own
  module, run in-process: the ``<configuration>`` (``chain``, ``device``, ``output``,
  ``GADGET.KEY`` overrides, or an inline ``<chain>``) selects one of our chains and the part of it
  that fits where the node stands (``recon_acquisitions``: the whole chain; ``recon_buffers``: what
  follows its buffer; ``recon_image_arrays``: what follows its reconstruction; ``recon``: by
  position). Any other module is refused and never imported; ``<connect>`` is refused (no
  out-of-process modules here).
* ``<distributed>``, ``<puredistributed>``: refused (no remote workers).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional
from xml.parsers import expat

from gadgets import registry
from gadgets.base import ChainError
from gadgets.stream.chain import OUR_DLL, ChainSpec, GadgetSpec, _canonical, _check_device, _where

log = logging.getLogger("torchgadgets.chain")

#: Gadgetron reader class names accepted in ``<reader>`` (legacy mricore and v2 core names).
KNOWN_READERS: frozenset[str] = frozenset({
    "GadgetIsmrmrdAcquisitionMessageReader", "GadgetIsmrmrdWaveformMessageReader",
    "AcquisitionReader", "WaveformReader", "ImageReader", "IsmrmrdImageArrayReader",
    "BufferReader", "AcquisitionBucketReader", "MRIImageReader",
})

#: Gadgetron writer class names accepted in ``<writer>``.
KNOWN_WRITERS: frozenset[str] = frozenset({
    "MRIImageWriter", "MRIImageWriterCPLX", "MRIImageWriterFLOAT", "MRIImageWriterUSHORT",
    "ImageWriter", "IsmrmrdImageArrayWriter", "AcquisitionWriter", "WaveformWriter", "BufferWriter",
    "AcquisitionBucketWriter", "GadgetIsmrmrdAcquisitionMessageWriter", "TextWriter",
    "DependencyQueryWriter",
})

#: The one external module this server runs (in-process): ``<execute name="gadgets.external" …>``.
EXTERNAL_MODULE = "gadgets.external"
EXTERNAL_TARGETS = ("recon", "recon_acquisitions", "recon_buffers", "recon_image_arrays")

_REFUSED_NODES = {
    "distributed": "distributes work to remote Gadgetron workers; this server runs every gadget itself",
    "puredistributed": "distributes work to remote Gadgetron workers; this server runs every gadget itself",
}

# --------------------------------------------------------------------------------------------
# XML tree with line numbers
# --------------------------------------------------------------------------------------------


@dataclass
class Elem:
    tag: str
    attrib: dict[str, str]
    line: int
    children: list["Elem"] = field(default_factory=list)
    text: str = ""

    def child_text(self, tag: str) -> Optional[str]:
        """Text of the single child ``tag`` (None when absent)."""
        found = [c for c in self.children if c.tag == tag]
        if len(found) > 1:
            raise ValueError(tag)
        return found[0].text.strip() if found else None


def _local(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def parse_xml_tree(text: str, source: str) -> tuple[Elem, list[str]]:
    """Parse XML into :class:`Elem` nodes with line numbers; returns (root, comments)."""
    body = text.lstrip("\ufeff \t\r\n")
    skipped = text[: len(text) - len(body)].count("\n")
    parser = expat.ParserCreate("UTF-8")
    stack: list[Elem] = []
    root: list[Elem] = []
    comments: list[str] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        el = Elem(_local(name), {_local(k): v for k, v in attrs.items() if not k.startswith("xmlns")},
                  parser.CurrentLineNumber + skipped)
        if stack:
            stack[-1].children.append(el)
        else:
            root.append(el)
        stack.append(el)

    def end(name: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        if stack:
            stack[-1].text += data

    def doctype(*args: Any) -> None:
        raise ChainError(f"{source}:{parser.CurrentLineNumber + skipped}: DOCTYPE declarations are not "
                         "allowed in chain XML")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.CommentHandler = lambda data: comments.append(data.strip())
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(body.encode("utf-8"), True)
    except expat.ExpatError as exc:
        raise ChainError(f"{source}:{exc.lineno + skipped}:{exc.offset + 1}: malformed XML: "
                         f"{expat.ErrorString(exc.code)}") from None
    if not root:
        raise ChainError(f"{source}: empty XML document")
    return root[0], comments


def _field(el: Elem, key: str, source: str) -> Optional[str]:
    """``dll``/``classname``/``name``/``slot`` given as a child element or an attribute."""
    try:
        child = el.child_text(key)
    except ValueError:
        raise ChainError(f"{source}:{el.line}: <{el.tag}> has more than one <{key}>") from None
    attr = el.attrib.get(key)
    if child is not None and attr is not None and child != attr.strip():
        raise ChainError(f"{source}:{el.line}: <{el.tag}> gives {key} both as attribute ({attr!r}) and "
                         f"child element ({child!r})")
    return child if child is not None else (attr.strip() if attr is not None else None)


def _properties(el: Elem, source: str) -> dict[str, tuple[str, int]]:
    """Properties of a node: name → (value, line). Either style, never both in one property."""
    props: dict[str, tuple[str, int]] = {}
    for p in el.children:
        if p.tag != "property":
            continue
        has_attr = "name" in p.attrib or "value" in p.attrib
        has_child = any(c.tag in ("name", "value") for c in p.children)
        if has_attr and has_child:
            raise ChainError(f"{source}:{p.line}: ambiguous <property>: use either name/value attributes "
                             f"(v2 style) or <name>/<value> child elements (legacy style), not both")
        if has_attr:
            name, value = p.attrib.get("name"), p.attrib.get("value", "")
        else:
            try:
                name, value = p.child_text("name"), p.child_text("value")
            except ValueError as exc:
                raise ChainError(f"{source}:{p.line}: <property> has more than one <{exc}>") from None
            value = value if value is not None else ""
        if not name:
            raise ChainError(f"{source}:{p.line}: <property> without a name")
        name = name.strip()
        if name in props:
            raise ChainError(f"{source}:{p.line}: duplicate property {name!r} (first at line "
                             f"{props[name][1]})")
        props[name] = (value, p.line)
    return props


@dataclass
class RawNode:
    """One stream node: a ``<gadget>`` (kind "gadget"), or a ``<parallel>``/``<external>`` node."""

    line: int
    label: str
    dll: str
    classname: str
    props: dict[str, tuple[str, int]]
    kind: str = "gadget"
    elem: Optional[Elem] = None


def _gadget_node(el: Elem, source: str) -> RawNode:
    classname = _field(el, "classname", source)
    if not classname:
        raise ChainError(f"{source}:{el.line}: <{el.tag}> without a classname")
    dll = _field(el, "dll", source) or ""
    label = _field(el, "name", source) or ""
    allowed_children = {"name", "dll", "classname", "property"}
    extra = sorted({c.tag for c in el.children} - allowed_children)
    if extra:
        raise ChainError(f"{source}:{el.line}: <{el.tag}> {classname!r}: unknown child element(s) {extra}; "
                         f"allowed: {sorted(allowed_children)}")
    props = _properties(el, source)
    if classname == "PythonGadget":
        # Gadgetron rewrites a legacy PythonGadget into an <external> node (CHAINS.md §2)
        module = props.get("python_module", ("", 0))[0].strip()
        target = props.get("python_class", ("", 0))[0].strip()
        return RawNode(el.line, label, dll, classname, props, kind="external-python",
                       elem=Elem("execute", {"name": module, "target": target, "type": "python"}, el.line))
    return RawNode(el.line, label, dll, classname, props)


def _check_io(el: Elem, kind: str, known: frozenset[str], source: str) -> str:
    classname = _field(el, "classname", source)
    if not classname:
        raise ChainError(f"{source}:{el.line}: <{kind}> without a classname")
    if classname not in known:
        raise ChainError(f"{source}:{el.line}: unknown Gadgetron {kind} class {classname!r}; known: "
                         f"{sorted(known)}")
    slot = _field(el, "slot", source)
    if slot is not None:
        if not slot.isdigit() or int(slot) > 0xFFFF:
            raise ChainError(f"{source}:{el.line}: <{kind}> {classname!r}: slot must be an integer 0..65535, "
                             f"got {slot!r}")
    return classname


def _resolve_references(nodes: list[RawNode], source: str) -> None:
    """Replace ``prop@GadgetName`` values by the referenced gadget's property (recursively)."""
    by_label = {n.label: n for n in nodes if n.label}

    def resolve(node: RawNode, key: str, seen: tuple[tuple[str, str], ...]) -> str:
        value, line = node.props[key]
        if "@" not in value:
            return value
        prop, _, target = value.partition("@")
        if (target, prop) in seen:
            chain = " -> ".join(f"{p}@{t}" for t, p in seen + ((target, prop),))
            raise ChainError(f"{source}:{line}: cyclic property reference {chain}")
        if target not in by_label:
            raise ChainError(f"{source}:{line}: property {key!r} refers to gadget {target!r}, which is not "
                             f"in this stream; gadget names: {sorted(by_label)}")
        tnode = by_label[target]
        if prop not in tnode.props:
            raise ChainError(f"{source}:{line}: property {key!r} refers to {prop!r} of gadget {target!r}, "
                             f"which has no such property; it has: {sorted(tnode.props)}")
        return resolve(tnode, prop, seen + ((target, prop),))

    resolved = [{k: (resolve(n, k, ((n.label, k),)), line) for k, (_, line) in n.props.items()}
                for n in nodes]
    for n, props in zip(nodes, resolved):
        n.props = props


# --------------------------------------------------------------------------------------------
# property translations
# --------------------------------------------------------------------------------------------


class Refuse(Exception):
    """A Gadgetron property value we do not reproduce (the message says why)."""


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    raise Refuse(f"expected true/false, got {v!r}")


def _float(v: str) -> float:
    try:
        return float(v.strip())
    except ValueError:
        raise Refuse(f"expected a number, got {v!r}") from None


def _int(v: str) -> int:
    try:
        return int(float(v.strip()))
    except ValueError:
        raise Refuse(f"expected an integer, got {v!r}") from None


PropFn = Callable[[str], dict[str, Any]]


def _to(key: str, conv: Callable[[str], Any] = str) -> PropFn:
    return lambda v: {key: conv(v)}


def _dim(v: str) -> Optional[str]:
    s = v.strip().lower()
    return None if s in ("", "none") else s


def _trigger(v: str) -> dict[str, Any]:
    d = _dim(v)
    if d is None:
        return {"trigger": "none"}     # Gadgetron's NONE: every buffer at the end of the stream
    if d in ("slice", "phase", "repetition"):
        return {"trigger": d}
    if d in ("contrast", "set", "average", "segment", "user_0", "user_1", "user_2", "user_3", "user_4",
             "user_5", "user_6", "user_7", "n_acquisitions"):
        return {"trigger": "none"}     # our buffers are already separate per counter: same images
    raise Refuse(f"unknown trigger dimension {v!r}")


_COUNTERS = ("slice", "contrast", "phase", "repetition", "set", "average", "segment")


def _n_dimension(v: str) -> dict[str, Any]:
    d = _dim(v)
    if d is None:
        return {}
    if d in ("phase", "repetition"):
        return {"frames": d}
    if d == "average":
        return {"frames": "none", "separate": "average"}
    if d in ("contrast", "set", "slice", "segment"):
        return {"frames": "none"}      # one buffer per value instead of an N axis: the same images
    raise Refuse(f"unknown dimension {v!r}; known: {', '.join(_COUNTERS)}")


def _s_dimension(v: str) -> dict[str, Any]:
    d = _dim(v)
    if d is None or d in ("contrast", "set", "slice", "phase", "repetition"):
        return {}                      # separate buffers per value here already: one image per S
    if d == "average":
        return {"separate": "average"}
    if d == "segment":
        raise Refuse("segments as a separate axis are not supported (segments share one k-space here)")
    raise Refuse(f"unknown dimension {v!r}; known: {', '.join(_COUNTERS)}")


def _ignore_segment(v: str) -> dict[str, Any]:
    if not _bool(v):
        raise Refuse("segments are always combined into one k-space here (ignore_segment=false keeps them "
                     "apart)")
    return {}


def _filter_kind(key: str) -> PropFn:
    names = {"gaussian": "gaussian", "hanning": "hanning", "taperedhanning": "tapered_hanning",
             "none": "none",
             "": "none"}

    def conv(v: str) -> dict[str, Any]:
        s = v.strip().lower().replace("_", "")
        if s not in names:
            raise Refuse(f"unknown filter {v!r}; known: Gaussian, Hanning, TaperedHanning, None")
        return {key: names[s]}
    return conv


def _coil_map(v: str) -> dict[str, Any]:
    s = v.strip().lower()
    if s in ("inati", "inati_iter", "walsh"):
        return {"coil_map": "walsh"}
    raise Refuse(f"unknown coil map algorithm {v!r}; known: Inati, Inati_Iter, Walsh")


def _extract_mask(v: str) -> dict[str, Any]:
    m = _int(v)
    if not 0 <= m < 16:
        raise Refuse(f"extract_mask must be 0..15, got {v!r}")
    if m == 0:
        return {}
    return {"magnitude": bool(m & 1), "real": bool(m & 2), "imag": bool(m & 4), "phase": bool(m & 8)}


#: Properties that never change images, whatever the class.
COMMON_IGNORED: dict[str, str] = {
    "debug_folder": "a folder for Gadgetron's debug dumps",
    "perform_timing": "timing log lines",
    "verbose": "log verbosity",
    "pass_on_undesired_data": "passing other messages on is what every gadget here does",
}

_DUMP = "names the raw-data dump file of Gadgetron's IsmrmrdDump; this server saves raw data with --save-raw"
_TWO_D = "this server reconstructs 2D (multi-slice) data only; there is no E2 axis"


@dataclass(frozen=True)
class Rule:
    """How one Gadgetron class maps: our gadget (None: no step, ``why`` says why), its translated
    properties (Gadgetron name → function giving our parameters), ignored ones with their reason,
    fixed parameters, ``merge`` (consecutive steps of this gadget become one), ``expand`` (a custom
    list of steps from the translated parameters)."""

    gadget: Optional[str]
    props: Mapping[str, PropFn] = field(default_factory=dict)
    ignored: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""
    merge: bool = False
    expand: Optional[Callable[[dict[str, Any], "_State"], list[tuple[str, dict[str, Any]]]]] = None


def _grappa_method() -> str:
    from recon_core.methods import METHODS

    return "grappa" if "grappa" in METHODS else "cg_sense"


#: GRAPPA's Tikhonov lambda (relative to trace(AᴴA)/K, as Gadgetron's grappa_reg_lamda) when a chain does
#: not set one: Gadgetron's own default. On prewhitened data the grappa method adds its noise-aware floor
#: (``noise_reg``), which is what keeps noisy scans at R = 4 from amplifying noise.
GRAPPA_LAM = 0.0005


def _expand_recon(method: str) -> Callable[[dict[str, Any], "_State"], list[tuple[str, dict[str, Any]]]]:
    """A Gadgetron generic reconstruction → coil maps + our ``recon`` with ``method``."""

    def expand(params: dict[str, Any], state: "_State") -> list[tuple[str, dict[str, Any]]]:
        m = _grappa_method() if method == "grappa" else method
        if method == "grappa" and m != "grappa":
            state.note("GRAPPA is not registered in this build: reconstructing with cg_sense (SENSE) instead")
        recon: dict[str, Any] = {"method": m}
        if m == "grappa":
            for key in ("kernel_ro", "kernel_e1"):
                if key in params:
                    recon[key] = params[key]
            recon["lam"] = params.get("lam", GRAPPA_LAM)
            if "lam" not in params:
                log.info("%s:%d: GRAPPA Tikhonov lambda %g (grappa_reg_lamda not set: Gadgetron's default; "
                         "noise-aware floor on prewhitened data)", state.source, state.line, GRAPPA_LAM)
        if m == "zero_filled":
            recon["coil_combine"] = "sense"
        if method == "grappa":
            # measured calibration lines join the data: GRAPPA puts embedded ACS lines back (keep_acs)
            buf = next((st for st in reversed(state.steps) if st.gadget == "buffer"), None)
            if buf is not None:
                buf.params.setdefault("acs_in_data", True)
        if "series" in params or method == "grappa":
            # Gadgetron's generic recon: images in series image_series + 1, g-factor + 20, SNR map + 300
            state.series_index = int(params.get("series", 0)) + 1
        maps: list[tuple[str, dict[str, Any]]] = []
        want = {k: bool(params.get(k)) for k in ("gfactor", "snr_map")}
        if any(want.values()):
            if m != "grappa":
                state.note(f"g-factor / SNR maps need GRAPPA; method {m!r} sends none")
            else:
                kernel = {k: recon[k] for k in ("lam", "kernel_e1", "kernel_ro") if k in recon}
                maps.append(("grappa_maps", {"gfactor": want["gfactor"], "snr": want["snr_map"], **kernel}))
        steps = [("coil_estimate", {"method": params.get("coil_map", "walsh")}), *maps]
        return [*steps, ("recon", recon)]
    return expand


_BUFFER_IGNORED = {
    "sorting_dimension": "orders acquisitions inside a Gadgetron bucket; our buffer sorts by encoding "
                         "counters",
    "split_slices": "our buffers always hold one slice each; the images are the same",
}

_REF_IGNORED = {
    "average_all_ref_N": "the buffer pools the calibration lines of all its frames (N) into one block",
    "average_all_ref_S": "calibration lines are pooled per buffer; each S value has its own buffer",
    "prepare_ref_always": "the calibration block is prepared for every buffer",
}

_DOWNSTREAM = ("GRAPPA unmixes into all (eigen-)channels here; downstream compression only saves time and "
               "discards low-energy modes")

_SCALING_DEDICATED = ("applies only to image arrays carrying the 'Use_dedicated_scaling_factor' meta field, "
                      "which no gadget here sets")

#: Gadgetron class → how it maps (see the module docstring).
CLASSES: dict[str, Rule] = {
    # ---- acquisitions
    "NoiseAdjustGadget": Rule("noise", ignored={
        "noise_dependency_prefix": "file-name prefix of Gadgetron's noise store; this server keys its store "
                                   "by measurement ID (--noise-store)",
        "pass_nonconformant_data": "data whose dwell time differs from the noise scan's are passed on here "
                                   "too",
        "noise_dependency_folder": "this server's noise store is --noise-store",
    }),
    "NoiseAdjustGadget_unoptimized": Rule("noise"),
    "IsmrmrdDumpGadget": Rule(None, ignored={
        "file_prefix": _DUMP, "folder": _DUMP, "save_xml_header_only": _DUMP, "use_data_timestamp": _DUMP,
    }, why="it only writes a copy of the raw data to Gadgetron's disk (this server: --save-raw DIR)"),
    "AsymmetricEchoAdjustROGadget": Rule(None, why="the buffer places asymmetric echoes at the k-space "
                                                   "centre "
                                                   "itself (zeros before the first sample)"),
    "RemoveROOversamplingGadget": Rule("remove_oversampling"),
    "PCACoilGadget": Rule("coil_compress", fixed={"method": "svd"}, merge=True, ignored={
        "uncombined_channels_by_name": "no channel is kept out of the PCA here"}),
    "CoilReductionGadget": Rule("coil_compress", props={"coils_out": _to("n_virtual", _int)},
                                fixed={"method": "svd"}, merge=True),
    "AcquisitionAccumulateTriggerGadget": Rule("buffer", props={"trigger_dimension": _trigger},
                                               ignored=_BUFFER_IGNORED, merge=True),
    "BucketToBufferGadget": Rule("buffer", merge=True, props={
        "N_dimension": _n_dimension, "S_dimension": _s_dimension, "ignore_segment": _ignore_segment,
        "merge": _to("merge"),       # torchgadgets extensions (Gadgetron has no such properties)
        "acs_in_data": _to("acs_in_data", _bool),
    }, ignored=_BUFFER_IGNORED),
    "SliceAccumulator": Rule("buffer", fixed={"trigger": "slice"}, merge=True),
    # ---- k-space buffers
    "GenericReconCartesianReferencePrepGadget": Rule(
        None, ignored=_REF_IGNORED,
        why="the buffer keeps calibration (reference) lines apart as the calibration block"),
    "GenericReconEigenChannelGadget": Rule("eigen_channel", props={
        "upstream_coil_compression": lambda v: {"enabled": _bool(v)},
        "upstream_coil_compression_thres": _to("threshold", _float),
        "upstream_coil_compression_num_modesKept": _to("modes", _int),
    }, ignored={k: v for k, v in _REF_IGNORED.items() if k != "prepare_ref_always"}),
    "GenericReconCartesianGrappaGadget": Rule("recon", props={
        "image_series": _to("series", _int), "coil_map_algorithm": _coil_map,
        "send_out_gfactor": _to("gfactor", _bool), "send_out_snr_map": _to("snr_map", _bool),
        "grappa_reg_lamda": _to("lam", _float), "grappa_kSize_RO": _to("kernel_ro", _int),
        "grappa_kSize_E1": _to("kernel_e1", _int),
    }, ignored={
        "grappa_kSize_E2": _TWO_D,
        "grappa_calib_over_determine_ratio": "caps the calibration points Gadgetron fits for speed; every "
                                             "point of "
                                             "the calibration block is fitted here",
        "time_tick": "time stamps are read with the ISMRMRD 2.5 ms tick",
        "downstream_coil_compression": _DOWNSTREAM, "downstream_coil_compression_thres": _DOWNSTREAM,
        "downstream_coil_compression_num_modesKept": _DOWNSTREAM,
    }, expand=_expand_recon("grappa")),
    "GenericReconCartesianFFTGadget": Rule("recon", props={
        "image_series": _to("series", _int), "coil_map_algorithm": _coil_map,
    }, expand=_expand_recon("zero_filled")),
    "SimpleReconGadget": Rule("simple_recon"),
    "CoilMapGadget": Rule("coil_estimate", fixed={"method": "walsh"}),
    # ---- image arrays
    "GenericReconPartialFourierHandlingFilterGadget": Rule(
        "partial_fourier", fixed={"mode": "filter"}, props={
        "skip_processing_meta_field": _to("skip_meta"),
        "partial_fourier_filter_RO_width": _to("ro_width", _float),
        "partial_fourier_filter_E1_width": _to("e1_width", _float),
        "partial_fourier_filter_densityComp": _to("density_comp", _bool),
    }, ignored={"partial_fourier_filter_E2_width": _TWO_D}),
    "GenericReconPartialFourierHandlingPOCSGadget": Rule("partial_fourier", fixed={"mode": "pocs"}, props={
        "skip_processing_meta_field": _to("skip_meta"),
        "partial_fourier_POCS_iters": _to("iterations", _int),
        "partial_fourier_POCS_thres": _to("threshold", _float),
        "partial_fourier_POCS_transitBand": _to("transit_band", _int),
    }, ignored={"partial_fourier_POCS_transitBand_E2": _TWO_D}),
    "GenericReconKSpaceFilteringGadget": Rule("kspace_filter", props={
        "skip_processing_meta_field": _to("skip_meta"),
        "filterRO": _filter_kind("ro"), "filterRO_sigma": _to("ro_sigma", _float),
        "filterRO_width": _to("ro_width", _float),
        "filterE1": _filter_kind("e1"), "filterE1_sigma": _to("e1_sigma", _float),
        "filterE1_width": _to("e1_width", _float),
    }, ignored={"filterE2": _TWO_D, "filterE2_sigma": _TWO_D, "filterE2_width": _TWO_D}),
    "GenericReconFieldOfViewAdjustmentGadget": Rule("fov_adjust"),
    "GenericReconImageArrayScalingGadget": Rule("image_scale", props={
        "use_constant_scalingFactor": _to("constant", _bool), "scalingFactor": _to("factor", _float),
        "min_intensity_value": _to("min_value", _float), "max_intensity_value": _to("max_value", _float),
        "auto_scaling_only_once": _to("once", _bool),
        "scalingFactor_gfactor_map": _to("gfactor_factor", _float),
        "scalingFactor_snr_map": _to("snr_factor", _float),
        "scalingFactor_snr_std_map": _to("std_factor", _float),
    }, ignored={"scalingFactor_dedicated": _SCALING_DEDICATED,
                "use_dedicated_scalingFactor_meta_field": _SCALING_DEDICATED}),
    "GenericReconNoiseStdMapComputingGadget": Rule("noise_std_map", props={
        "start_N_for_std_map": _to("start_frame", _int)}),
    "ImageArraySplitGadget": Rule("image_export", fixed={"output": "complex"}),
    "AugmentImageMetadataGadget": Rule(None, why="our image export writes the image meta itself"),
    # ---- images
    "ComplexToFloatGadget": Rule("complex_to_float"),
    "ExtractGadget": Rule("extract", props={
        "extract_mask": _extract_mask, "extract_magnitude": _to("magnitude", _bool),
        "extract_real": _to("real", _bool), "extract_imag": _to("imag", _bool),
        "extract_phase": _to("phase", _bool), "real_imag_offset": _to("real_imag_offset", _float),
    }),
    "AutoScaleGadget": Rule("auto_scale", props={"max_value": _to("max_value", _float),
                                                 "histogram_bins": _to("histogram_bins", _int)}),
    "FloatToUShortGadget": Rule("float_to_ushort", props={
        "max_intensity": _to("max_intensity", _float), "min_intensity": _to("min_intensity", _float),
        "intensity_offset": _to("intensity_offset", _float)}),
    "ImageFinishGadget": Rule("image_export"),
    "NoiseSummaryGadget": Rule("noise_summary", props={"noise_file": _to("noise_file")}),
}

#: Input and output stage of each of our gadgets: acq(uisitions) → buf(fers) → series → images.
STAGES: dict[str, tuple[str, str]] = {
    "noise": ("acq", "acq"), "remove_oversampling": ("acq", "acq"), "buffer": ("acq", "buf"),
    "coil_compress": ("buf", "buf"), "eigen_channel": ("buf", "buf"), "coil_estimate": ("buf", "buf"),
    "grappa_maps": ("buf", "buf"),
    "recon": ("buf", "series"), "simple_recon": ("buf", "series"),
    "partial_fourier": ("series", "series"), "kspace_filter": ("series", "series"),
    "fov_adjust": ("series", "series"), "image_scale": ("series", "series"),
    "noise_std_map": ("series", "series"), "image_export": ("series", "image"),
    "complex_to_float": ("image", "image"), "extract": ("image", "image"), "auto_scale": ("image", "image"),
    "float_to_ushort": ("image", "image"),
}
_ORDER = ("acq", "buf", "series", "image")


# --------------------------------------------------------------------------------------------
# translation
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    source: str
    steps: list[GadgetSpec] = field(default_factory=list)
    stage: str = "acq"
    series_index: Optional[int] = None
    pending_compress: list[GadgetSpec] = field(default_factory=list)
    prev_merge: Optional[str] = None
    merged_from: dict[str, int] = field(default_factory=dict)
    device: Optional[str] = None
    depth: int = 0
    line: int = 0
    series_ours: bool = False      # the image arrays come from one of our own gadgets (dll torchgadgets)

    def note(self, text: str) -> None:
        log.warning("%s:%d: %s", self.source, self.line, text)

    def add(self, gadget: str, params: dict[str, Any], line: int, label: str, merge: bool = False,
            classname: str = "", ours: bool = False) -> None:
        """Append a step (merging into the previous one when both ask for it), keeping stages in order."""
        if gadget != "buffer":
            self._place_compress()
        if merge and self.prev_merge == gadget and self.steps and self.steps[-1].gadget == gadget:
            last = self.steps[-1]
            for key, value in params.items():
                if key in last.params and _canonical(last.params[key]) != _canonical(value):
                    raise ChainError(f"{self.source}:{line}: {classname} sets {gadget} parameter {key!r} to "
                                     f"{value!r}, but the merged {last.label!r} (line "
                                     f"{self.merged_from.get(key, '?')}) already set it to "
                                     f"{last.params[key]!r}")
                last.params[key] = value
                self.merged_from[key] = line
            last.label = f"{last.label}+{label}"
            self._renumber()
            return
        if gadget == "image_export" and classname == "ImageFinishGadget" and self.stage in ("acq", "buf"):
            log.info("%s:%d: ImageFinishGadget on %s: nothing to finish, no step", self.source, line,
                     _STAGE_NAMES[self.stage])
            self.prev_merge = None
            return
        stages = STAGES.get(gadget)
        if gadget == "coil_compress" and self.stage == "acq":
            # Gadgetron reduces coils per acquisition; ours works on buffers: right after the buffer
            spec = GadgetSpec(gadget, dict(params), _where(self.source, line, 0, label), label)
            if self.pending_compress and self.prev_merge == gadget:
                self.pending_compress[-1].params.update(params)
                self.pending_compress[-1].label += f"+{label}"
            else:
                self.pending_compress.append(spec)
            self.prev_merge = gadget if merge else None
            return
        if stages is not None:
            want, out = stages
            if gadget == "image_export" and self.stage == "image":
                log.info("%s:%d: %s: images already leave the chain as ISMRMRD images here; no step needed",
                         self.source, line, classname or label)
                self.prev_merge = None
                return
            if want == "image" and self.stage == "series":
                self._push("image_export", {"output": "complex"}, line, "ImageArraySplit(implicit)")
                log.info("%s:%d: image arrays split into complex images before %s", self.source, line,
                         classname or label)
            elif _ORDER.index(want) < _ORDER.index(self.stage):
                raise ChainError(f"{self.source}:{line}: {classname or label} ({gadget}) works on "
                                 f"{_STAGE_NAMES[want]}, but the stream carries {_STAGE_NAMES[self.stage]} "
                                 f"at this point")
        self._push(gadget, params, line, label)
        if self.stage == "series" and STAGES.get(gadget, ("", ""))[1] == "series":
            self.series_ours = ours
        self.merged_from = {k: line for k in params}
        self.prev_merge = gadget if merge else None

    def _push(self, gadget: str, params: dict[str, Any], line: int, label: str) -> None:
        if gadget == "image_export" and self.series_index is not None and "series_index" not in params:
            params = {**params, "series_index": self.series_index}
        where = _where(self.source, line, len(self.steps) + 1, label)
        self.steps.append(GadgetSpec(gadget, params, where, label))
        stages = STAGES.get(gadget)
        if stages is not None:
            self.stage = stages[1]
        self._renumber()

    def _place_compress(self) -> None:
        """Coil reduction written before the buffer goes right after it (once the buffer is complete)."""
        if self.pending_compress and self.stage == "buf":
            for spec in self.pending_compress:
                log.info("%s: %s (coil reduction per acquisition in Gadgetron) runs on the k-space buffers, "
                         "right after the buffer", self.source, spec.label)
            self.steps.extend(self.pending_compress)
            self.pending_compress = []
            self._renumber()

    def _renumber(self) -> None:
        for i, s in enumerate(self.steps, start=1):
            head, _, _ = s.where.partition(" (gadget #")
            s.where = f"{head} (gadget #{i} {s.label!r})"

    def finish(self) -> list[GadgetSpec]:
        self._place_compress()
        if self.pending_compress:
            raise ChainError(f"{self.source}: coil reduction ({self.pending_compress[0].label}) without a "
                             f"buffer after it")
        if self.stage == "series" and not self.series_ours:
            log.info("%s: the stream ends on image arrays: they leave as complex ISMRMRD images", self.source)
            self._push("image_export", {"output": "complex"}, 0, "ImageArraySplit(implicit)")
        return self.steps


_STAGE_NAMES = {"acq": "acquisitions", "buf": "k-space buffers", "series": "image arrays", "image": "images"}


def _translate_gadget(n: RawNode, state: _State) -> None:
    state.line = n.line
    label = n.label or n.classname
    if n.classname in CLASSES and n.dll != OUR_DLL:
        rule = CLASSES[n.classname]
        params: dict[str, Any] = dict(rule.fixed)
        for key, (value, line) in n.props.items():
            if key in rule.props:
                try:
                    converted = rule.props[key](value)
                except Refuse as exc:
                    raise ChainError(f"{state.source}:{line}: Gadgetron property {key!r} = {value!r} of "
                                     f"{n.classname}: {exc}") from None
                for k, v in converted.items():
                    if k == "separate" and "separate" in params:
                        continue
                    params[k] = [v] if k in ("separate", "merge") and isinstance(v, str) else v
            elif key in rule.ignored or key in COMMON_IGNORED:
                log.info("%s:%d: ignoring Gadgetron property %r of %s: %s", state.source, line, key,
                         n.classname, rule.ignored.get(key) or COMMON_IGNORED[key])
            else:
                known = sorted(rule.props) + sorted(set(rule.ignored) | set(COMMON_IGNORED))
                raise ChainError(f"{state.source}:{line}: Gadgetron property {key!r} of {n.classname} "
                                 f"(mapped to our {rule.gadget or 'pipeline'!r} gadget) has no equivalent "
                                 "here; "
                                 f"translated or ignored properties are: {known}")
        if rule.gadget is None:
            log.info("%s:%d: %s needs no step here: %s", state.source, n.line, n.classname, rule.why)
            state.prev_merge = None
            return
        if rule.gadget == "eigen_channel" and params.pop("enabled", True) is False:
            log.info("%s:%d: %s with upstream_coil_compression=false: no compression", state.source, n.line,
                     n.classname)
            return
        if rule.expand is not None:
            for gadget, p in rule.expand(params, state):
                state.add(gadget, p, n.line, label if gadget == rule.gadget else f"{label}:{gadget}",
                          classname=n.classname)
            return
        state.add(rule.gadget, params, n.line, label, merge=rule.merge, classname=n.classname)
    elif n.dll == OUR_DLL or (not n.dll and n.classname in registry.GADGETS):
        params = {k: v for k, (v, _) in n.props.items()}
        if n.classname not in STAGES:
            where = _where(state.source, n.line, len(state.steps) + 1, label)
            state.steps.append(GadgetSpec(n.classname, params, where, label))
            state.prev_merge = None
            return
        state.add(n.classname, params, n.line, label, ours=True)
    else:
        raise ChainError(f"{state.source}:{n.line}: unknown gadget class {n.classname!r} (dll {n.dll!r}); "
                         f"known Gadgetron classes: {sorted(CLASSES)}; or use dll {OUR_DLL!r} with one of "
                         f"our gadgets: {registry.available_gadgets()}")


def _classname_of(el: Elem, source: str) -> str:
    return _field(el, "classname", source) or ""


_GRAPPA_WEIGHTS = {"cpuWeightsCalculator", "gpuWeightsCalculator"}


def _translate_parallel(el: Elem, state: _State) -> None:
    """Gadgetron's GRAPPA pattern, or a refusal naming branch and merge."""
    state.line = el.line
    branch = next((c for c in el.children if c.tag == "branch"), None)
    merge = next((c for c in el.children if c.tag == "merge"), None)
    streams = [c for c in el.children if c.tag == "stream"]
    bname = _classname_of(branch, state.source) if branch is not None else ""
    mname = _classname_of(merge, state.source) if merge is not None else ""
    contents: dict[str, list[str]] = {}
    for s in streams:
        names = []
        for g in s.children:
            if g.tag != "gadget":
                raise ChainError(f"{state.source}:{g.line}: <{g.tag}> inside a <parallel> stream is not run "
                                 "here")
            names.append(_classname_of(g, state.source))
        contents[s.attrib.get("key", "")] = names
    flat = sorted(c for names in contents.values() for c in names)
    if (bname == "AcquisitionFanout" and mname == "Unmixing" and len(flat) == 2 and "ImageAccumulator" in flat
            and set(flat) & _GRAPPA_WEIGHTS):
        for part in [branch, merge] + [g for s in streams for g in s.children]:
            if part is not None and _properties(part, state.source):
                raise ChainError(f"{state.source}:{part.line}: properties of Gadgetron's GRAPPA parallel "
                                 f"stream ({_classname_of(part, state.source)}) are not translated here")
        log.info("%s:%d: <parallel> %s -> %s + %s -> %s is Gadgetron's GRAPPA: coil maps + recon (grappa)",
                 state.source, el.line, bname, *flat, mname)
        for gadget, p in _expand_recon("grappa")({}, state):
            state.add(gadget, p, el.line, f"GRAPPA:{gadget}", classname="<parallel>")
        return
    raise ChainError(f"{state.source}:{el.line}: <parallel> with branch {bname!r}, streams "
                     f"{ {k: v for k, v in contents.items()} } and merge {mname!r} is not run by this "
                     "server; "
                     f"only Gadgetron's GRAPPA pattern (AcquisitionFanout -> ImageAccumulator + "
                     f"cpu/gpuWeightsCalculator -> Unmixing) is")


def _external_config(el: Elem, source: str
                     ) -> tuple[Optional[str], str, Optional[str], str, dict[str, dict[str, str]]]:
    """(chain name, inline chain text, device, output, overrides) from an external node's <configuration>."""
    chain: Optional[str] = None
    inline: Optional[str] = None
    device: Optional[str] = None
    output = "images"
    overrides: dict[str, dict[str, str]] = {}
    conf = next((c for c in el.children if c.tag == "configuration"), None)
    if conf is None:
        return chain, "", device, output, overrides
    for c in conf.children:
        if c.tag == "chain" and c.text.strip():
            inline = c.text.strip()
    for name, (value, line) in _properties(conf, source).items():
        value = value.strip()
        if name == "chain":
            chain = value
        elif name == "device":
            device = _check_device(value or "auto", f"{source}:{line}")
        elif name == "output":
            if value not in ("images", "image_array"):
                raise ChainError(f"{source}:{line}: <external> property 'output' must be images or "
                                 "image_array, "
                                 f"got {value!r}")
            output = value
        elif "." in name:
            gadget, _, key = name.partition(".")
            overrides.setdefault(gadget, {})[key] = value
        elif name in ("python_module", "python_class", "python_path"):
            continue
        else:
            raise ChainError(f"{source}:{line}: <external> {EXTERNAL_MODULE}: unknown property {name!r}; "
                             "allowed: "
                             f"chain, device, output, GADGET.KEY")
    return chain, inline or "", device, output, overrides


def _translate_external(execute: Elem, outer: Elem, state: _State) -> None:
    """Our own ``gadgets.external`` module, in-process: the matching part of one of our chains."""
    state.line = execute.line
    module = execute.attrib.get("name", "").strip()
    target = execute.attrib.get("target", "").strip() or "recon"
    kind = execute.attrib.get("type", "python").strip()
    if module != EXTERNAL_MODULE or kind != "python":
        raise ChainError(f"{state.source}:{execute.line}: external {kind} module {module!r} is not run by "
                         "this "
                         f"server (it never imports code named by a chain); only {EXTERNAL_MODULE!r} "
                         f"(this package's own entry points) is")
    if target not in EXTERNAL_TARGETS:
        raise ChainError(f"{state.source}:{execute.line}: {EXTERNAL_MODULE} has no target {target!r}; "
                         "targets: "
                         f"{list(EXTERNAL_TARGETS)}")
    if state.depth >= 2:
        raise ChainError(f"{state.source}:{execute.line}: <external> chains nested too deep")
    from gadgets.stream.chain import load_chain, parse_chain_text

    name, inline, device, output, overrides = _external_config(outer, state.source)
    if inline:
        inner = parse_chain_text(inline, f"{state.source}:{execute.line}<chain>", name="inline")
    else:
        inner = load_chain(name or "default", allow_paths=False)
    steps = [GadgetSpec(s.gadget, dict(s.params), s.where, s.label) for s in inner.gadgets]
    for gadget, values in overrides.items():
        step = next((s for s in steps if s.gadget == gadget), None)
        if step is None:
            raise ChainError(f"{state.source}:{execute.line}: <external> override "
                             f"'{gadget}.{next(iter(values))}' "
                             f"names gadget {gadget!r}, which chain {inner.name!r} does not have; its "
                             "gadgets: "
                             f"{[s.gadget for s in steps]}")
        step.params.update(values)
    names = [s.gadget for s in steps]
    if target == "recon":
        target = {"acq": "recon_acquisitions", "buf": "recon_buffers"}.get(state.stage, "recon_image_arrays")
    cut = {"recon_acquisitions": 0,
           "recon_buffers": names.index("buffer") + 1 if "buffer" in names else 0,
           "recon_image_arrays": max((i + 1 for i, n in enumerate(names)
                                      if STAGES.get(n, ("", ""))[1] == "series"), default=0)}[target]
    want = {"recon_acquisitions": "acq", "recon_buffers": "buf", "recon_image_arrays": "series"}[target]
    if state.stage != want:
        raise ChainError(f"{state.source}:{execute.line}: {EXTERNAL_MODULE} target {target!r} takes "
                         f"{_STAGE_NAMES[want]}, but the stream carries {_STAGE_NAMES[state.stage]} here")
    steps = steps[cut:]
    if target == "recon_acquisitions":
        # Gadgetron's own NoiseAdjust / RemoveROOversampling already ran before the node: not twice
        done = {st.gadget for st in state.steps if STAGES.get(st.gadget, ("", ""))[0] == "acq"}
        twice = [st.gadget for st in steps if st.gadget in done and STAGES[st.gadget][1] == "acq"]
        if twice:
            log.info("%s:%d: %s already in the stream before <external>: not run again", state.source,
                     execute.line, twice)
            steps = [st for st in steps if st.gadget not in twice]
    if output == "image_array":
        steps = [s for s in steps if STAGES.get(s.gadget, ("acq", "acq"))[0] != "image"
                 and s.gadget != "image_export"]
    log.info("%s:%d: <external> %s.%s runs in-process: chain %r, gadgets %s", state.source, execute.line,
             module, target, inner.name, [s.gadget for s in steps])
    if device is not None:
        state.device = device
    elif inner.device is not None:
        state.device = inner.device
    for s in steps:
        state.add(s.gadget, s.params, execute.line, f"external:{s.label}", ours=True)
    state.prev_merge = None


def _translate_stream(children: list[Elem], state: _State, where: str) -> None:
    nodes: list[RawNode] = []
    for g in children:
        if g.tag == "gadget":
            nodes.append(_gadget_node(g, state.source))
        elif g.tag in ("parallel", "external", "parallelprocess"):
            nodes.append(RawNode(g.line, "", "", f"<{g.tag}>", {}, kind=g.tag, elem=g))
        elif g.tag in _REFUSED_NODES:
            raise ChainError(f"{state.source}:{g.line}: <{g.tag}> nodes are not supported by this server: "
                             f"{_REFUSED_NODES[g.tag]}")
        else:
            raise ChainError(f"{state.source}:{g.line}: unknown element <{g.tag}> in {where}; allowed: "
                             "<gadget>, "
                             f"<parallel>, <external>, <parallelprocess>")
    _resolve_references([n for n in nodes if n.kind == "gadget"], state.source)
    for n in nodes:
        if n.kind == "gadget":
            _translate_gadget(n, state)
        elif n.kind == "external-python":
            _translate_external(n.elem, Elem("external", {}, n.line, [
                Elem("configuration", {}, n.line, [Elem("property", {"name": k, "value": v}, line)
                                                   for k, (v, line) in n.props.items()])]), state)
        elif n.kind == "external":
            el = n.elem
            actions = [c for c in el.children if c.tag in ("execute", "connect")]
            if len(actions) != 1:
                raise ChainError(f"{state.source}:{el.line}: <external> needs exactly one <execute> or "
                                 "<connect>")
            if actions[0].tag == "connect":
                a = actions[0].attrib
                raise ChainError(f"{state.source}:{actions[0].line}: <external><connect address="
                                 f"{a.get('address', 'localhost')!r} port={a.get('port', '')!r}/>: this "
                                 "server "
                                 f"runs no out-of-process modules; use <execute "
                                 f"name=\"{EXTERNAL_MODULE}\" …/>, "
                                 f"which runs in-process here")
            _translate_external(actions[0], el, state)
        elif n.kind == "parallel":
            _translate_parallel(n.elem, state)
        elif n.kind == "parallelprocess":
            pure = [c for c in n.elem.children if c.tag == "purestream"]
            if len(pure) != 1:
                raise ChainError(f"{state.source}:{n.line}: <parallelprocess> needs one <purestream>")
            log.info("%s:%d: <parallelprocess workers=%s>: its pure gadgets run in line (the same images)",
                     state.source, n.line, n.elem.attrib.get("workers", "?"))
            _translate_stream(pure[0].children, state, "<purestream>")


def parse_gadgetron_xml(text: str, source: str, default_name: str) -> ChainSpec:
    """Parse either Gadgetron XML dialect into a :class:`ChainSpec` (see the module docstring)."""
    root, comments = parse_xml_tree(text, source)
    readers: list[str] = []
    writers: list[str] = []
    state = _State(source)
    if root.tag == "gadgetronStreamConfiguration":
        dialect = "gadgetron-legacy"
        stream: list[Elem] = []
        for el in root.children:
            if el.tag == "reader":
                readers.append(_check_io(el, "reader", KNOWN_READERS, source))
            elif el.tag == "writer":
                writers.append(_check_io(el, "writer", KNOWN_WRITERS, source))
            elif el.tag in ("gadget", "parallel", "external", "parallelprocess", *_REFUSED_NODES):
                stream.append(el)
            else:
                raise ChainError(f"{source}:{el.line}: unknown element <{el.tag}> in "
                                 f"<gadgetronStreamConfiguration>; allowed: <reader>, <writer>, <gadget>")
        _translate_stream(stream, state, "<gadgetronStreamConfiguration>")
    elif root.tag == "configuration":
        dialect = "gadgetron-v2"
        version = [c for c in root.children if c.tag == "version"]
        if len(version) != 1 or version[0].text.strip() != "2":
            raise ChainError(f"{source}:{root.line}: <configuration> needs exactly one <version>2</version> "
                             f"(Gadgetron v2 dialect)")
        streams = [c for c in root.children if c.tag == "stream"]
        if len(streams) != 1:
            raise ChainError(f"{source}:{root.line}: <configuration> needs exactly one <stream>, found "
                             f"{len(streams)}")
        for el in root.children:
            if el.tag == "readers":
                for r in el.children:
                    if r.tag != "reader":
                        raise ChainError(f"{source}:{r.line}: unknown element <{r.tag}> in <readers>; "
                                         "allowed: <reader>")
                    readers.append(_check_io(r, "reader", KNOWN_READERS, source))
            elif el.tag == "writers":
                for w in el.children:
                    if w.tag != "writer":
                        raise ChainError(f"{source}:{w.line}: unknown element <{w.tag}> in <writers>; "
                                         "allowed: <writer>")
                    writers.append(_check_io(w, "writer", KNOWN_WRITERS, source))
            elif el.tag in ("version", "stream"):
                continue
            else:
                raise ChainError(f"{source}:{el.line}: unknown element <{el.tag}> in <configuration>; "
                                 f"allowed: <version>, <readers>, <writers>, <stream>")
        _translate_stream(streams[0].children, state, "<stream>")
    else:
        raise ChainError(f"{source}:{root.line}: no parser accepts root element <{root.tag}>; expected "
                         "<gadgetronStreamConfiguration> (legacy) or <configuration> with "
                         "<version>2</version>")
    steps = state.finish()
    description = comments[0] if comments else ""
    description = re.sub(r"\s+", " ", description)
    return ChainSpec(name=default_name, device=state.device, gadgets=steps, source=source,
                     description=description, dialect=dialect, readers=readers, writers=writers)
