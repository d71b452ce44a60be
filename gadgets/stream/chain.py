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

  ``classname`` is a Gadgetron class mapped in :data:`gadgets.stream.gadgetron_xml.CLASSES`
  (property by property: translated, ignored with a logged reason, or refused naming it), or one
  of our gadget names with ``dll`` ``torchgadgets``. ``<parallel>`` (Gadgetron's GRAPPA pattern),
  ``<parallelprocess>`` and ``<external>`` naming our own ``gadgets.external`` are translated; other
  nodes are refused with a ChainError. Readers and writers must be known Gadgetron classes; this
  server always reads and writes ISMRMRD messages itself. See :mod:`gadgets.stream.gadgetron_xml`.

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


def _parse_xml(text: str, source: str, default_name: str) -> ChainSpec:
    """Gadgetron XML (either dialect): :func:`gadgets.stream.gadgetron_xml.parse_gadgetron_xml`."""
    from gadgets.stream.gadgetron_xml import parse_gadgetron_xml

    return parse_gadgetron_xml(text, source, default_name)


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
