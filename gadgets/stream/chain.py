"""Chain files → :class:`ChainSpec` → a list of configured gadgets.

Three dialects load into the same :class:`ChainSpec`:

* **YAML** (native)::

      version: 1                 # optional, must be 1
      name: default              # optional, defaults to the file stem
      device: auto               # optional: auto | cpu | cuda | cuda:N (server default when absent)
      description: ...           # optional, shown by ``torchgadgets chains``
      chain:                     # required; may be empty (echo chain)
        - gadget: buffer         # a registered gadget name (gadgets.registry.GADGETS)
          name: sort             # optional label used in messages
          params: {trigger: slice}

  Unknown keys at any level, duplicate keys, and wrong value types are errors naming file and line.

* **Gadgetron legacy XML** (root ``<gadgetronStreamConfiguration>``, flat ``<reader>``, ``<writer>``,
  ``<gadget>`` children) and **Gadgetron v2 XML** (root ``<configuration>`` with
  ``<version>2</version>``, ``<readers>``, ``<writers>``, ``<stream>``). Properties may be written
  ``<property><name>k</name><value>v</value></property>`` or ``<property name="k" value="v"/>``;
  both in one property is an error. A value ``prop@GadgetName`` refers to another gadget's
  property (resolved, cycles rejected).

  ``classname`` is a Gadgetron class listed in :data:`gadgets.registry.GADGETRON_CLASSES`, or one of
  our gadget names with ``dll`` ``torchgadgets``. Consecutive Gadgetron gadgets that map to the
  same gadget of ours (AcquisitionAccumulateTriggerGadget + BucketToBufferGadget → ``buffer``)
  merge into one step. Gadgetron property names are translated where the meaning matches
  (:data:`GADGETRON_PROPERTIES`); properties in :data:`IGNORED_GADGETRON_PROPERTIES` are dropped
  with a log line (they only tune Gadgetron internals); any other Gadgetron property is an error
  naming it. Readers and writers must be known Gadgetron classes (:data:`KNOWN_READERS`,
  :data:`KNOWN_WRITERS`); this server always reads and writes ISMRMRD messages itself.
  ``<external>``, ``<parallel>``, ``<distributed>``, ``<parallelprocess>`` and ``<puredistributed>``
  are refused with a ChainError (not supported by this server yet).

Parsing only checks structure; :func:`build_chain` resolves gadget names through the registry and
checks parameters with each gadget's ``Params.from_mapping``. A chain name that arrives over the
network is only looked up as a file in the chain directory (:func:`load_chain` with
``allow_paths=False``), never imported.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from xml.parsers import expat

import yaml

from gadgets.base import ChainContext, ChainError, Gadget
from gadgets import registry

log = logging.getLogger("torchgadgets.chain")

#: The chain directory shipped inside the package (``gadgets/chains``, package data), found through
#: ``importlib.resources`` so a non-editable install (wheel) has it too.
DEFAULT_CHAINS_DIR: Path = Path(str(importlib.resources.files("gadgets") / "chains"))
#: Environment variable overriding :data:`DEFAULT_CHAINS_DIR`.
CHAINS_ENV = "TORCHGADGETS_CHAINS"
#: File extensions tried, in this order, when a chain is named without one.
CHAIN_EXTENSIONS: tuple[str, ...] = (".yaml", ".yml", ".xml")
#: Files in the chain directory that are not chains.
NON_CHAIN_FILES: frozenset[str] = frozenset({"selection.yaml", "selection.yml"})

#: Our DLL name in Gadgetron-style XML (``<dll>torchgadgets</dll>``).
OUR_DLL = "torchgadgets"

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")

# --------------------------------------------------------------------------------------------
# Gadgetron translation tables
# --------------------------------------------------------------------------------------------


def _lower_or_drop(value: str) -> Optional[str]:
    """Gadgetron dimension names: ``""``/``none`` mean "Gadgetron default" → leave ours at default."""
    v = value.strip().lower()
    return None if v in {"", "none"} else v


def _same(value: str) -> Optional[str]:
    return value


#: Per Gadgetron class: Gadgetron property → (our parameter key, value translation). A translation
#: returning None drops the property (the Gadgetron value means "use the default").
GADGETRON_PROPERTIES: dict[str, dict[str, tuple[str, Callable[[str], Optional[str]]]]] = {
    "NoiseAdjustGadget": {},
    "RemoveROOversamplingGadget": {},
    "AcquisitionAccumulateTriggerGadget": {"trigger_dimension": ("trigger", _lower_or_drop)},
    # ``merge`` is a torchgadgets extension (Gadgetron has no such property): see gadgets/buffer.py
    "BucketToBufferGadget": {"N_dimension": ("frames", _lower_or_drop), "merge": ("merge", _same)},
    "PCACoilGadget": {},
    "CoilReductionGadget": {"coils_out": ("n_virtual", _same)},
    "GenericReconEigenChannelGadget": {},
    "GenericReconCartesianReferencePrepGadget": {},
    "CoilMapGadget": {},
    "GenericReconCartesianGrappaGadget": {},
    "GenericReconCartesianSpiritGadget": {},
    "GenericReconCartesianNonLinearSpirit2DTGadget": {},
    "ImageFinishGadget": {},
}

#: Gadgetron properties that only tune Gadgetron internals (sorting inside its buffers, debug
#: output, timing); dropped with an info log line instead of an error.
IGNORED_GADGETRON_PROPERTIES: frozenset[str] = frozenset({
    "split_slices", "ignore_segment", "sorting_dimension", "verbose", "debug_folder", "perform_timing",
    "pass_nonconformant_data",
})

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
})

_UNSUPPORTED_NODES = ("external", "parallel", "distributed", "parallelprocess", "puredistributed")


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """Text form of a parameter value, so YAML ``30`` and XML ``"30"`` compare equal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(_canonical(v)) for v in value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if value is None:
        return "none"
    return str(value).strip()


@dataclass(eq=False)
class GadgetSpec:
    """One step of a chain: registered gadget name, raw parameters, and where it was written.

    ``where`` reads ``"file:line (gadget #i 'label')"`` and starts every error about this step.
    Parameters are raw (XML gives strings, YAML typed values); ``Params.from_mapping`` coerces
    them. Equality ignores ``where``/``label`` and compares parameter values in text form.
    """

    gadget: str
    params: dict[str, Any]
    where: str
    label: str = ""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GadgetSpec):
            return NotImplemented
        return self.gadget == other.gadget and _canonical(self.params) == _canonical(other.params)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class ChainSpec:
    """A parsed chain: name, optional device override, steps, and the file it came from.

    ``device`` is None when the chain does not override the server's default. Equality compares
    name, device and steps (not where it came from).
    """

    name: str
    device: Optional[str]
    gadgets: list[GadgetSpec]
    source: str = field(default="<inline>", compare=False)
    description: str = field(default="", compare=False)
    dialect: str = field(default="yaml", compare=False)        # yaml | gadgetron-legacy | gadgetron-v2
    readers: list[str] = field(default_factory=list, compare=False)
    writers: list[str] = field(default_factory=list, compare=False)
    #: False for chain text that arrived over the network: its parameters may not name local files
    trusted: bool = field(default=True, compare=False)

    @property
    def gadget_names(self) -> list[str]:
        """The registered gadget names, in order."""
        return [g.gadget for g in self.gadgets]


def _where(source: str, line: int, index: int, label: str) -> str:
    return f"{source}:{line} (gadget #{index} {label!r})"


def _check_device(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DEVICE_RE.match(value.strip().lower()):
        raise ChainError(f"{where}: 'device' must be one of auto, cpu, cuda, cuda:N; got {value!r}")
    return value.strip().lower()


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------

_TOP_KEYS = ("version", "name", "device", "description", "chain")
_ENTRY_KEYS = ("gadget", "name", "params")


def _yaml_mapping(node: yaml.Node, source: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Keys of a YAML mapping node → (key node, value node); duplicates and non-string keys raise."""
    if not isinstance(node, yaml.MappingNode):
        raise ChainError(f"{source}:{node.start_mark.line + 1}: {what} must be a mapping, got {_kind(node)}")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in node.value:
        line = knode.start_mark.line + 1
        if not isinstance(knode, yaml.ScalarNode) or knode.tag != "tag:yaml.org,2002:str":
            raise ChainError(f"{source}:{line}: {what}: keys must be plain strings, got {knode.value!r}")
        if knode.value in out:
            raise ChainError(f"{source}:{line}: {what}: duplicate key {knode.value!r}")
        out[knode.value] = (knode, vnode)
    return out


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _parse_yaml(text: str, source: str, default_name: str) -> ChainSpec:
    # Anchors and aliases are refused before anything is built: an alias tree ("billion laughs")
    # is small on the wire but expands to gigabytes once constructed or formatted into a message.
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                mark = event.start_mark
                raise ChainError(f"{source}:{mark.line + 1}:{mark.column + 1}: YAML anchors and aliases "
                                 f"(&name, *name, <<: *name) are not allowed in chain files; write the "
                                 f"values out")
    except yaml.YAMLError:
        pass   # reported with its position by the composer below
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            pos = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            context = exc.context or ""
            if context and exc.context_mark is not None and exc.context_mark is not mark:
                cm = exc.context_mark
                context += f" (started at line {cm.line + 1}, column {cm.column + 1})"
            detail = "; ".join(p for p in (context, exc.problem) if p)
            raise ChainError(f"{pos}: malformed YAML: {detail}") from None
        except yaml.YAMLError as exc:
            raise ChainError(f"{source}: malformed YAML: {exc}") from None
        if root is None:
            raise ChainError(f"{source}: empty chain file (expected a mapping with a 'chain' list)")

        def value(node: yaml.Node) -> Any:
            return loader.construct_object(node, deep=True)

        top = _yaml_mapping(root, source, "chain file")
        unknown = [k for k in top if k not in _TOP_KEYS]
        if unknown:
            line = top[unknown[0]][0].start_mark.line + 1
            raise ChainError(f"{source}:{line}: unknown top-level key(s) {unknown}; allowed: "
                             f"{list(_TOP_KEYS)}")
        if "chain" not in top:
            raise ChainError(f"{source}:{root.start_mark.line + 1}: missing required key 'chain' (a list of "
                             f"{{gadget: NAME, params: {{...}}}} entries)")

        def scalar_str(key: str) -> Optional[str]:
            if key not in top:
                return None
            knode, vnode = top[key]
            v = value(vnode)
            if not isinstance(v, str):
                raise ChainError(f"{source}:{knode.start_mark.line + 1}: {key!r} must be a string, got {v!r}")
            return v

        if "version" in top:
            knode, vnode = top["version"]
            v = value(vnode)
            if v != 1 or isinstance(v, bool):
                raise ChainError(f"{source}:{knode.start_mark.line + 1}: unsupported chain file version "
                                 f"{v!r}; this server reads version 1")
        name = scalar_str("name") or default_name
        description = scalar_str("description") or ""
        device = None
        if "device" in top:
            knode, vnode = top["device"]
            device = _check_device(value(vnode), f"{source}:{knode.start_mark.line + 1}")

        chain_key, chain_node = top["chain"]
        if isinstance(chain_node, yaml.ScalarNode) and chain_node.tag == "tag:yaml.org,2002:null":
            entries: list[yaml.Node] = []
        elif isinstance(chain_node, yaml.SequenceNode):
            entries = list(chain_node.value)
        else:
            raise ChainError(f"{source}:{chain_key.start_mark.line + 1}: 'chain' must be a list of "
                             f"{{gadget: NAME, params: {{...}}}} entries, got {_kind(chain_node)}")

        steps: list[GadgetSpec] = []
        for i, entry in enumerate(entries, start=1):
            line = entry.start_mark.line + 1
            if isinstance(entry, yaml.ScalarNode) and entry.tag == "tag:yaml.org,2002:str":
                steps.append(GadgetSpec(entry.value, {}, _where(source, line, i, entry.value), entry.value))
                continue
            fields_ = _yaml_mapping(entry, source, f"chain entry #{i}")
            unknown = [k for k in fields_ if k not in _ENTRY_KEYS]
            if unknown:
                raise ChainError(f"{source}:{line} (gadget #{i}): unknown key(s) {unknown} in chain entry; "
                                 f"allowed: {list(_ENTRY_KEYS)}")
            if "gadget" not in fields_:
                raise ChainError(f"{source}:{line} (gadget #{i}): chain entry needs a 'gadget' key; "
                                 f"allowed keys: {list(_ENTRY_KEYS)}")
            gname = value(fields_["gadget"][1])
            if not isinstance(gname, str) or not gname:
                raise ChainError(f"{source}:{line} (gadget #{i}): 'gadget' must be a gadget name, got "
                                 f"{gname!r}")
            label = gname
            if "name" in fields_:
                label = value(fields_["name"][1])
                if not isinstance(label, str):
                    raise ChainError(f"{source}:{line} (gadget #{i}): 'name' must be a string, got {label!r}")
            where = _where(source, line, i, label)
            params: dict[str, Any] = {}
            if "params" in fields_:
                pnode = fields_["params"][1]
                if not (isinstance(pnode, yaml.ScalarNode) and pnode.tag == "tag:yaml.org,2002:null"):
                    pmap = _yaml_mapping(pnode, source, f"params of gadget #{i} {label!r}")
                    params = {k: value(v) for k, (_, v) in pmap.items()}
            steps.append(GadgetSpec(gname, params, where, label))
    finally:
        loader.dispose()
    return ChainSpec(name=name, device=device, gadgets=steps, source=source, description=description,
                     dialect="yaml")


# --------------------------------------------------------------------------------------------
# XML (a tiny element tree with line numbers, built with expat)
# --------------------------------------------------------------------------------------------


@dataclass
class _Elem:
    tag: str
    attrib: dict[str, str]
    line: int
    children: list["_Elem"] = field(default_factory=list)
    text: str = ""

    def child_text(self, tag: str) -> Optional[str]:
        """Text of the single child ``tag`` (None when absent)."""
        found = [c for c in self.children if c.tag == tag]
        if len(found) > 1:
            raise ValueError(tag)
        return found[0].text.strip() if found else None


def _local(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def _parse_xml_tree(text: str, source: str) -> tuple[_Elem, list[str]]:
    """Parse XML into :class:`_Elem` nodes with line numbers; returns (root, comments)."""
    # Leading blank lines would make expat reject an XML declaration; drop them, keep line numbers.
    body = text.lstrip("\ufeff \t\r\n")
    skipped = text[: len(text) - len(body)].count("\n")
    parser = expat.ParserCreate("UTF-8")
    stack: list[_Elem] = []
    root: list[_Elem] = []
    comments: list[str] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        el = _Elem(_local(name), {_local(k): v for k, v in attrs.items() if not k.startswith("xmlns")},
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


def _field(el: _Elem, key: str, source: str) -> Optional[str]:
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


def _properties(el: _Elem, source: str) -> dict[str, tuple[str, int]]:
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
class _RawNode:
    line: int
    label: str
    dll: str
    classname: str
    props: dict[str, tuple[str, int]]


def _resolve_references(nodes: list[_RawNode], source: str) -> None:
    """Replace ``prop@GadgetName`` values by the referenced gadget's property (recursively)."""
    by_label = {n.label: n for n in nodes if n.label}

    def resolve(node: _RawNode, key: str, seen: tuple[tuple[str, str], ...]) -> str:
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


def _gadget_node(el: _Elem, source: str) -> _RawNode:
    classname = _field(el, "classname", source)
    if not classname:
        raise ChainError(f"{source}:{el.line}: <gadget> without a classname")
    dll = _field(el, "dll", source) or ""
    label = _field(el, "name", source) or ""
    allowed_children = {"name", "dll", "classname", "property"}
    extra = sorted({c.tag for c in el.children} - allowed_children)
    if extra:
        raise ChainError(f"{source}:{el.line}: <gadget> {classname!r}: unknown child element(s) {extra}; "
                         f"allowed: {sorted(allowed_children)}")
    if classname == "PythonGadget":
        raise ChainError(f"{source}:{el.line}: PythonGadget (a Gadgetron <external> Python module) is not "
                         f"supported by this server (yet); use our gadgets with dll '{OUR_DLL}'")
    return _RawNode(el.line, label, dll, classname, _properties(el, source))


def _check_io(el: _Elem, kind: str, known: frozenset[str], source: str) -> str:
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


def _unsupported(el: _Elem, source: str) -> ChainError:
    return ChainError(f"{source}:{el.line}: <{el.tag}> nodes are not supported by this server (yet); only a "
                      f"linear stream of <gadget> nodes is")


def _translate(nodes: list[_RawNode], source: str) -> list[GadgetSpec]:
    """Map Gadgetron classes to our gadgets, translate properties, merge consecutive duplicates."""
    steps: list[GadgetSpec] = []
    first_lines: list[int] = []                 # line of each step's first XML node
    prev_gadgetron: Optional[str] = None        # our name of the previous step if it came from Gadgetron
    merged_from: dict[str, int] = {}            # our param key → line where it was set (merged steps)
    for n in nodes:
        if n.classname in registry.GADGETRON_CLASSES:
            ours = registry.GADGETRON_CLASSES[n.classname]
            table = GADGETRON_PROPERTIES.get(n.classname, {})
            params: dict[str, Any] = {}
            for key, (value, line) in n.props.items():
                if key in table:
                    our_key, convert = table[key]
                    converted = convert(value)
                    if converted is not None:
                        params[our_key] = converted
                elif key in IGNORED_GADGETRON_PROPERTIES:
                    log.info("%s:%d: ignoring Gadgetron property %r of %s (no meaning in this server)",
                             source, line, key, n.classname)
                else:
                    known = sorted(table) + sorted(IGNORED_GADGETRON_PROPERTIES)
                    raise ChainError(f"{source}:{line}: Gadgetron property {key!r} of {n.classname} (mapped "
                                     f"to our {ours!r} gadget) has no equivalent here; translated or ignored "
                                     f"properties are: {known}")
            label = n.label or n.classname
            if prev_gadgetron == ours and steps:
                last = steps[-1]
                for key, value in params.items():
                    if key in last.params and _canonical(last.params[key]) != _canonical(value):
                        raise ChainError(f"{source}:{n.line}: {n.classname} sets {ours} parameter {key!r} to "
                                         f"{value!r}, but the merged {last.label!r} (line "
                                         f"{merged_from[key]}) already set it to {last.params[key]!r}")
                    last.params[key] = value
                    merged_from[key] = n.line
                last.label = f"{last.label}+{label}"
                last.where = _where(source, first_lines[-1], len(steps), last.label)
                continue
            steps.append(GadgetSpec(ours, params, _where(source, n.line, len(steps) + 1, label), label))
            first_lines.append(n.line)
            merged_from = {k: n.line for k in params}
            prev_gadgetron = ours
        elif n.dll == OUR_DLL or (not n.dll and n.classname in registry.GADGETS):
            label = n.label or n.classname
            params = {k: v for k, (v, _) in n.props.items()}
            where = _where(source, n.line, len(steps) + 1, label)
            steps.append(GadgetSpec(n.classname, params, where, label))
            first_lines.append(n.line)
            prev_gadgetron = None
        else:
            raise ChainError(f"{source}:{n.line}: unknown gadget class {n.classname!r} (dll {n.dll!r}); "
                             f"known Gadgetron classes: {sorted(registry.GADGETRON_CLASSES)}; or use dll "
                             f"{OUR_DLL!r} with one of our gadgets: {registry.available_gadgets()}")
    return steps


def _parse_xml(text: str, source: str, default_name: str) -> ChainSpec:
    root, comments = _parse_xml_tree(text, source)
    readers: list[str] = []
    writers: list[str] = []
    nodes: list[_RawNode] = []
    if root.tag == "gadgetronStreamConfiguration":
        dialect = "gadgetron-legacy"
        for el in root.children:
            if el.tag == "reader":
                readers.append(_check_io(el, "reader", KNOWN_READERS, source))
            elif el.tag == "writer":
                writers.append(_check_io(el, "writer", KNOWN_WRITERS, source))
            elif el.tag == "gadget":
                nodes.append(_gadget_node(el, source))
            elif el.tag in _UNSUPPORTED_NODES:
                raise _unsupported(el, source)
            else:
                raise ChainError(f"{source}:{el.line}: unknown element <{el.tag}> in "
                                 f"<gadgetronStreamConfiguration>; allowed: <reader>, <writer>, <gadget>")
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
            elif el.tag == "stream":
                for g in el.children:
                    if g.tag == "gadget":
                        nodes.append(_gadget_node(g, source))
                    elif g.tag in _UNSUPPORTED_NODES:
                        raise _unsupported(g, source)
                    else:
                        raise ChainError(f"{source}:{g.line}: unknown element <{g.tag}> in <stream>; "
                                         f"allowed: <gadget> (Gadgetron's {list(_UNSUPPORTED_NODES)} "
                                         "are not supported here)")
            elif el.tag in _UNSUPPORTED_NODES:
                raise _unsupported(el, source)
            elif el.tag != "version":
                raise ChainError(f"{source}:{el.line}: unknown element <{el.tag}> in <configuration>; "
                                 f"allowed: <version>, <readers>, <writers>, <stream>")
    else:
        raise ChainError(f"{source}:{root.line}: no parser accepts root element <{root.tag}>; expected "
                         "<gadgetronStreamConfiguration> (legacy) or <configuration> with "
                         "<version>2</version>")
    _resolve_references(nodes, source)
    steps = _translate(nodes, source)
    description = comments[0] if comments else ""
    return ChainSpec(name=default_name, device=None, gadgets=steps, source=source, description=description,
                     dialect=dialect, readers=readers, writers=writers)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def default_chains_dir() -> Path:
    """The chain directory in use: ``$TORCHGADGETS_CHAINS`` if set, else :data:`DEFAULT_CHAINS_DIR`."""
    env = os.environ.get(CHAINS_ENV)
    return Path(env) if env else DEFAULT_CHAINS_DIR


def _display(path: Path) -> str:
    """Path as shown in messages: relative to the working directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_chain_text(text: str, source: str = "<inline>", name: Optional[str] = None) -> ChainSpec:
    """Parse chain text (YAML or either Gadgetron XML dialect, detected from the content).

    Parameters
    ----------
    text
        The chain file content (e.g. an inline chain sent as CONFIG id 2).
    source
        Shown in error messages before the line number (a file path or ``<inline>``).
    name
        Chain name when the text does not give one (XML never does); defaults to ``source``'s stem.

    Raises
    ------
    ChainError
        Malformed text, unknown keys/elements/classes, unsupported Gadgetron nodes.
    """
    default_name = name or (Path(source).stem if not source.startswith("<") else source.strip("<>"))
    if text.lstrip("\ufeff \t\r\n").startswith("<"):
        return _parse_xml(text, source, default_name)
    return _parse_yaml(text, source, default_name)


def _validate_name(name: str, where: Path) -> None:
    if (not name or name != name.strip() or "/" in name or "\\" in name or ".." in name or "\x00" in name
            or os.path.isabs(name) or not _NAME_RE.match(name)):
        raise ChainError(f"invalid chain name {name!r}: a chain is named by a plain file name in {where} "
                         f"(letters, digits, '_', '-', '.', '+'; no path separators, no '..')")


def _resolve_name(name: str, directory: Path) -> Optional[Path]:
    if name.endswith(CHAIN_EXTENSIONS):
        candidates = [directory / name]
    else:
        candidates = [directory / f"{name}{ext}" for ext in CHAIN_EXTENSIONS]
    base = directory.resolve()
    for c in candidates:
        if c.is_file():
            real = c.resolve()
            if base != real.parent and base not in real.parents:
                raise ChainError(f"chain {name!r} resolves outside the chain directory {directory}")
            return c
    return None


def load_chain(name_or_path: str | os.PathLike[str], chains_dir: Optional[Path] = None, *,
               allow_paths: bool = False) -> ChainSpec:
    """Load a chain by name from the chain directory, or (with ``allow_paths``) from a file path.

    Parameters
    ----------
    name_or_path
        A chain name with or without extension (``default``, ``default.xml``), looked up in the chain
        directory trying ``.yaml``, ``.yml``, ``.xml`` in that order; or a file path when
        ``allow_paths`` is true.
    chains_dir
        The chain directory; default :func:`default_chains_dir` (``$TORCHGADGETS_CHAINS`` or the shipped ``gadgets/chains``).
    allow_paths
        Accept file paths (command line). Keep False for names that arrive over the network: then
        absolute paths, ``..`` and path separators are refused, so nothing outside the chain
        directory is ever read.

    Raises
    ------
    ChainError
        Invalid or unknown name (the message lists the available chains), or an invalid file.
    """
    directory = Path(chains_dir) if chains_dir is not None else default_chains_dir()
    raw = os.fspath(name_or_path)
    if allow_paths:
        p = Path(raw)
        if p.is_file():
            return parse_chain_text(_read(p), _display(p))
        if os.sep in raw or "/" in raw or p.is_absolute():
            raise ChainError(f"chain file not found: {raw}")
    _validate_name(raw, directory)
    path = _resolve_name(raw, directory)
    if path is None:
        available = [n for n, _ in list_chains(directory)]
        raise ChainError(f"unknown chain {raw!r}: no "
                         f"{raw}{'' if raw.endswith(CHAIN_EXTENSIONS) else '.yaml/.yml/.xml'}"
                         f" in {directory}; available: {available}")
    return parse_chain_text(_read(path), _display(path))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ChainError(f"{_display(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def list_chains(chains_dir: Optional[Path] = None) -> list[tuple[str, str]]:
    """The chains in a directory as ``(name, description)``, sorted by name.

    The name is what :func:`load_chain` accepts for that file: the stem when the stem alone
    resolves to it (``default`` → ``default.yaml``), else the file name (``default.xml``). A file
    that does not parse is listed with ``"(invalid: <reason>)"`` as description and a warning log.
    """
    directory = Path(chains_dir) if chains_dir is not None else default_chains_dir()
    if not directory.is_dir():
        return []
    out: list[tuple[str, str]] = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix not in CHAIN_EXTENSIONS or path.name in NON_CHAIN_FILES:
            continue
        name = path.name
        try:
            stem_target = _resolve_name(path.stem, directory) if _NAME_RE.match(path.stem) else None
            if stem_target is not None and stem_target.name == path.name:
                name = path.stem
            spec = parse_chain_text(_read(path), _display(path))
            description = spec.description
        except ChainError as exc:
            log.warning("chain file %s is invalid: %s", path, exc)
            description = f"(invalid: {exc})"
        out.append((name, description))
    return sorted(out)


def chain_context(spec: ChainSpec, default_device: Any = "auto", **fields: Any) -> ChainContext:
    """A :class:`ChainContext` for running ``spec``, with its device resolved once.

    The chain's ``device`` overrides ``default_device`` (the server's ``--device``); both go through
    :func:`recon_core.device.resolve_device`. The logger is per chain (``torchgadgets.chain.<name>``)
    unless given. Other ``fields`` (header, progress, storage_dir …) are passed to ChainContext.

    Raises
    ------
    ChainError
        The requested device does not exist on this machine (names the chain file).
    """
    from recon_core.device import resolve_device

    wanted = spec.device if spec.device is not None else default_device
    try:
        device = resolve_device(wanted)
    except ValueError as exc:
        origin = f"chain {spec.name!r} ({spec.source})" if spec.device is not None else "the server default"
        raise ChainError(f"{spec.source}: device {wanted!r} from {origin}: {exc}") from None
    fields.setdefault("chain_name", spec.name)
    fields.setdefault("logger", logging.getLogger(f"torchgadgets.chain.{spec.name}"))
    return ChainContext(device=device, **fields)


def build_chain(spec: ChainSpec, ctx: ChainContext) -> list[Gadget]:
    """Instantiate the gadgets of ``spec`` with checked parameters.

    Each gadget class comes from :func:`gadgets.registry.get_gadget`; its parameters from
    ``cls.Params.from_mapping(params, where)`` (unknown keys and bad types raise, naming file, line,
    gadget, key and allowed keys). Sets ``ctx.chain_name`` when empty.

    Raises
    ------
    ChainError
        Unknown gadget, a registered gadget whose module cannot be imported, or bad parameters.
    """
    if not ctx.chain_name:
        ctx.chain_name = spec.name
    gadgets: list[Gadget] = []
    for step in spec.gadgets:
        try:
            cls = registry.get_gadget(step.gadget)
        except KeyError:
            raise ChainError(f"unknown gadget {step.gadget!r} at {step.where}; available: "
                             f"{registry.available_gadgets()}") from None
        except (ImportError, AttributeError) as exc:
            raise ChainError(f"{step.where}: gadget {step.gadget!r} is registered as "
                             f"{registry.GADGETS.get(step.gadget)!r} but cannot be loaded: {exc}") from exc
        if not spec.trusted:
            cls.Params.check_untrusted(step.params, step.where)
        params = cls.Params.from_mapping(step.params, step.where)
        gadgets.append(cls(params, ctx))
    return gadgets
