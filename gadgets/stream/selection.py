"""Chain selection per protocol: rules on ISMRMRD header facts → a chain name.

A scanner often sends one generic config name for every protocol (``auto``, or a name listed under
``generic_names:``). The server then reads the header and picks the chain with the first rule that
matches; the decision is logged with the rule. Rules live in ``<chains_dir>/selection.yaml``::

    version: 1
    generic_names: [auto, torchgadgets_auto]      # config names that trigger selection
    rules:
      - name: radial or golden-angle cine         # shown in logs and by `torchgadgets select`
        match: {trajectory: [radial, goldenangle], phases: {min: 2}}
        chain: radial_cine_cg_sense
      - name: Cartesian
        match: {trajectory: cartesian, protocol: "(?i)cine|sense"}
        chain: cartesian_sense
    default: default                              # used when no rule matches

Matcher keys (all given keys must match; a rule with an empty ``match`` always matches):

========================  ==========================================================  =================
key                       fact                                                        value
========================  ==========================================================  =================
``protocol``              ``measurementInformation/protocolName``                     regex (search)
``sequence_type``         ``sequenceParameters/sequence_type``                        regex (search)
``sequence_name``         ``measurementInformation/sequenceName``                     regex (search)
``trajectory``            ``encoding[0]/trajectory`` (cartesian, radial, goldenangle,  name or list
                          spiral, epi, other)
``phases``                ``encodingLimits/phase`` maximum + 1 (1 without limits)      number, list or
``channels``              ``acquisitionSystemInformation/receiverChannels`` (0: absent) ``{min, max}``
``matrix``                encoded matrix ``[x, y]`` or ``[x, y, z]``                   list (exact)
``matrix_x`` … ``_z``     one encoded matrix size                                     number, list or
                                                                                      ``{min, max}``
========================  ==========================================================  =================

Unknown keys anywhere are errors naming the file and line. Regexes are compiled when the file is
loaded (a bad regex is an error there, not at scan time).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from gadgets.base import ChainError

__all__ = ["SelectionRule", "SelectionRules", "SelectionError", "header_facts", "load_rules",
           "parse_rules", "select_chain", "select_for_file", "RULES_FILE", "DEFAULT_GENERIC_NAMES",
           "MATCH_KEYS"]

log = logging.getLogger("torchgadgets.selection")

#: File name of the rules inside the chain directory.
RULES_FILE = "selection.yaml"
#: Config names that always trigger selection (more can be listed under ``generic_names``).
DEFAULT_GENERIC_NAMES: tuple[str, ...] = ("auto",)

_REGEX_KEYS = ("protocol", "sequence_type", "sequence_name")
_NUMBER_KEYS = ("phases", "channels", "matrix_x", "matrix_y", "matrix_z")
#: Every matcher key a rule may use.
MATCH_KEYS: tuple[str, ...] = _REGEX_KEYS + _NUMBER_KEYS + ("trajectory", "matrix")
_TRAJECTORIES = ("cartesian", "epi", "radial", "goldenangle", "spiral", "other")


class SelectionError(ChainError):
    """A selection file that cannot be used, or a header that cannot be classified."""


@dataclass
class SelectionRule:
    """One rule: matchers (key → predicate on the facts) and the chain chosen when all match."""

    name: str
    chain: str
    match: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    _tests: list[tuple[str, Callable[[Any], bool]]] = field(default_factory=list, repr=False)

    def matches(self, facts: dict[str, Any]) -> bool:
        """True when every matcher of the rule accepts the corresponding fact."""
        return all(test(facts.get(key)) for key, test in self._tests)

    def describe(self) -> str:
        """``"rule 'name' (file:line): match {...} → chain"``."""
        return f"rule {self.name!r} ({self.where}): match {self.match or '{}'} -> {self.chain}"


@dataclass
class SelectionRules:
    """A parsed selection file: generic names, ordered rules (first match wins), default chain."""

    rules: list[SelectionRule] = field(default_factory=list)
    default: Optional[str] = None
    generic_names: tuple[str, ...] = DEFAULT_GENERIC_NAMES
    source: str = "<rules>"

    def is_generic(self, name: str) -> bool:
        """True when ``name`` (compared without a ``.xml``/``.yaml`` extension) triggers selection."""
        stem = re.sub(r"\.(xml|yaml|yml)$", "", name.strip())
        return stem in self.generic_names or name.strip() in self.generic_names


# ---------------------------------------------------------------------------------------------
# facts


def _parse_header(header: Any) -> Any:
    if isinstance(header, (str, bytes)):
        import ismrmrd.xsd

        text = header.decode("utf-8") if isinstance(header, bytes) else header
        try:
            return ismrmrd.xsd.CreateFromDocument(text.rstrip("\0"))
        except Exception as exc:  # the xsdata parser raises several types; keep its message
            raise SelectionError(f"ISMRMRD header does not parse: {type(exc).__name__}: {exc}") from None
    return header


def header_facts(header: Any) -> dict[str, Any]:
    """The facts selection rules look at, from a header (XML text or parsed ``ismrmrdHeader``).

    Returns
    -------
    dict
        ``protocol``, ``sequence_name``, ``sequence_type`` (str, "" when absent), ``trajectory``
        (lower-case name), ``phases``, ``channels``, ``matrix_x/y/z`` (int) and ``matrix`` (list),
        ``measurement_id``.

    Raises
    ------
    SelectionError
        The XML does not parse, or the header has no ``<encoding>``.
    """
    hdr = _parse_header(header)
    encs = list(getattr(hdr, "encoding", None) or [])
    if not encs:
        raise SelectionError("ISMRMRD header has no <encoding> element; cannot select a chain")
    enc = encs[0]
    info = getattr(hdr, "measurementInformation", None)
    seq = getattr(hdr, "sequenceParameters", None)
    sysinfo = getattr(hdr, "acquisitionSystemInformation", None)
    traj = getattr(enc, "trajectory", None)
    traj_name = str(getattr(traj, "value", traj) or "other").lower()
    limits = getattr(enc, "encodingLimits", None)
    phase = getattr(limits, "phase", None) if limits is not None else None
    phases = int(phase.maximum) + 1 if phase is not None and phase.maximum is not None else 1
    msize = getattr(getattr(enc, "encodedSpace", None), "matrixSize", None)
    mx = int(getattr(msize, "x", 0) or 0)
    my = int(getattr(msize, "y", 0) or 0)
    mz = int(getattr(msize, "z", 1) or 1)
    return {
        "protocol": str(getattr(info, "protocolName", None) or ""),
        "sequence_name": str(getattr(info, "sequenceName", None) or ""),
        "sequence_type": str(getattr(seq, "sequence_type", None) or ""),
        "measurement_id": str(getattr(info, "measurementID", None) or ""),
        "trajectory": traj_name,
        "phases": phases,
        "channels": int(getattr(sysinfo, "receiverChannels", None) or 0),
        "matrix_x": mx, "matrix_y": my, "matrix_z": mz,
        "matrix": [mx, my, mz],
    }


# ---------------------------------------------------------------------------------------------
# parsing


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _mapping(node: yaml.Node, source: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise SelectionError(f"{source}:{_line(node)}: {what} must be a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode):
            raise SelectionError(f"{source}:{_line(k)}: {what}: keys must be plain names")
        if k.value in out:
            raise SelectionError(f"{source}:{_line(k)}: {what}: duplicate key {k.value!r}")
        out[k.value] = (k, v)
    return out


def _unknown(keys: dict[str, Any], allowed: tuple[str, ...], source: str, what: str) -> None:
    for key, (knode, _) in keys.items():
        if key not in allowed:
            raise SelectionError(f"{source}:{_line(knode)}: {what}: unknown key {key!r}; allowed: "
                                 f"{', '.join(allowed)}")


def _number_test(value: Any, where: str, key: str) -> Callable[[Any], bool]:
    def as_int(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SelectionError(f"{where}: {key!r} expects integers, got {v!r}")
        return v

    if isinstance(value, dict):
        bad = set(value) - {"min", "max"}
        if bad or not value:
            raise SelectionError(f"{where}: {key!r} range takes 'min' and/or 'max', got {sorted(value)}")
        lo = as_int(value["min"]) if "min" in value else None
        hi = as_int(value["max"]) if "max" in value else None
        return lambda f: f is not None and (lo is None or f >= lo) and (hi is None or f <= hi)
    if isinstance(value, list):
        allowed = {as_int(v) for v in value}
        return lambda f: f in allowed
    n = as_int(value)
    return lambda f: f == n


def _matcher(key: str, value: Any, where: str) -> Callable[[Any], bool]:
    if key in _REGEX_KEYS:
        if not isinstance(value, str):
            raise SelectionError(f"{where}: {key!r} expects a regular expression (text), got {value!r}")
        try:
            rx = re.compile(value)
        except re.error as exc:
            raise SelectionError(f"{where}: {key!r}: bad regular expression {value!r}: {exc}") from None
        return lambda f: f is not None and rx.search(str(f)) is not None
    if key == "trajectory":
        names = value if isinstance(value, list) else [value]
        for n in names:
            if not isinstance(n, str) or n.lower() not in _TRAJECTORIES:
                raise SelectionError(f"{where}: 'trajectory' must be one of {', '.join(_TRAJECTORIES)} "
                                     f"(or a list of them), got {n!r}")
        wanted = {n.lower() for n in names}
        return lambda f: f in wanted
    if key == "matrix":
        if (not isinstance(value, list) or len(value) not in (2, 3)
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise SelectionError(f"{where}: 'matrix' expects [x, y] or [x, y, z] integers, got {value!r}")
        want = list(value)
        return lambda f: f is not None and list(f[:len(want)]) == want
    return _number_test(value, where, key)


def parse_rules(text: str, source: str = "<rules>") -> SelectionRules:
    """Parse selection rules from YAML text (see the module docstring for the format).

    Raises
    ------
    SelectionError
        Malformed YAML, unknown keys (naming file and line), bad values or regexes.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise SelectionError(f"{source}: not valid YAML: {exc}") from None
    if root is None:
        raise SelectionError(f"{source}: empty selection file")
    top = _mapping(root, source, "selection file")
    _unknown(top, ("version", "generic_names", "rules", "default"), source, "selection file")
    constructor = yaml.SafeLoader("")

    def value(node: yaml.Node) -> Any:
        return constructor.construct_object(node, deep=True)

    if "version" in top and value(top["version"][1]) != 1:
        raise SelectionError(f"{source}:{_line(top['version'][1])}: version must be 1")
    generic = list(DEFAULT_GENERIC_NAMES)
    if "generic_names" in top:
        names = value(top["generic_names"][1])
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise SelectionError(f"{source}:{_line(top['generic_names'][1])}: generic_names must be a list "
                                 f"of names")
        generic += [n.strip() for n in names if n.strip() not in generic]
    default = None
    if "default" in top:
        default = value(top["default"][1])
        if not isinstance(default, str) or not default.strip():
            raise SelectionError(f"{source}:{_line(top['default'][1])}: default must be a chain name")
    rules: list[SelectionRule] = []
    if "rules" in top:
        rnode = top["rules"][1]
        if not isinstance(rnode, yaml.SequenceNode):
            raise SelectionError(f"{source}:{_line(rnode)}: rules must be a list")
        for i, item in enumerate(rnode.value):
            where = f"{source}:{_line(item)}"
            keys = _mapping(item, source, f"rule {i}")
            _unknown(keys, ("name", "match", "chain"), source, f"rule {i}")
            if "chain" not in keys:
                raise SelectionError(f"{where}: rule {i} has no 'chain'")
            chain = value(keys["chain"][1])
            if not isinstance(chain, str) or not chain.strip():
                raise SelectionError(f"{where}: rule {i}: 'chain' must be a chain name")
            name = str(value(keys["name"][1])) if "name" in keys else f"rule {i}"
            rule = SelectionRule(name=name, chain=chain.strip(), where=where)
            if "match" in keys:
                mnode = keys["match"][1]
                if not (isinstance(mnode, yaml.ScalarNode) and mnode.value in ("", "~", "null")):
                    mkeys = _mapping(mnode, source, f"rule {name!r} match")
                    _unknown(mkeys, MATCH_KEYS, source, f"rule {name!r} match")
                    for key, (knode, vnode) in mkeys.items():
                        v = value(vnode)
                        rule.match[key] = v
                        rule._tests.append((key, _matcher(key, v, f"{source}:{_line(knode)}")))
            rules.append(rule)
    return SelectionRules(rules=rules, default=default.strip() if default else None,
                          generic_names=tuple(generic), source=source)


def load_rules(path_or_dir: Union[str, os.PathLike[str], None] = None) -> SelectionRules:
    """Load ``selection.yaml`` from a chain directory (default: the chain directory in use) or a file.

    A directory without ``selection.yaml`` gives empty rules (only ``auto`` is generic; selection
    then fails with a clear message unless the file exists).
    """
    from gadgets.stream.chain import default_chains_dir

    p = Path(path_or_dir) if path_or_dir is not None else default_chains_dir()
    if p.is_dir():
        p = p / RULES_FILE
        if not p.is_file():
            return SelectionRules(source=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SelectionError(f"cannot read selection rules {p}: {exc}") from None
    return parse_rules(text, str(p))


def select_chain(header_xml: Any, rules: SelectionRules) -> tuple[str, str, dict[str, Any]]:
    """Pick the chain for a header: the first rule that matches, else the default.

    Parameters
    ----------
    header_xml
        The ISMRMRD header as XML text or a parsed ``ismrmrdHeader``.
    rules
        From :func:`load_rules` / :func:`parse_rules`.

    Returns
    -------
    (chain_name, rule_description, facts)

    Raises
    ------
    SelectionError
        Bad header, or no rule matches and there is no default.
    """
    facts = header_facts(header_xml)
    for rule in rules.rules:
        if rule.matches(facts):
            desc = rule.describe()
            log.info("selected chain %s by %s", rule.chain, desc)
            return rule.chain, desc, facts
    if rules.default:
        desc = f"default of {rules.source} (no rule matched)"
        log.info("selected chain %s: %s", rules.default, desc)
        return rules.default, desc, facts
    shown = {k: v for k, v in facts.items() if k != "matrix"}
    raise SelectionError(f"no selection rule in {rules.source} matches this header ({shown}) and there "
                         f"is no default")


def select_for_file(path: Union[str, os.PathLike[str]], group: str = "dataset",
                    rules: Optional[SelectionRules] = None,
                    chains_dir: Union[str, os.PathLike[str], None] = None) -> str:
    """Explain which chain the server would pick for an ISMRMRD file (``torchgadgets select``).

    Returns
    -------
    str
        Several lines: the file, the facts, every rule with match/no match, the chosen chain.

    Raises
    ------
    SelectionError
        The file has no usable header, or nothing matches and there is no default.
    """
    from gadgets.ismrmrd_io import iter_ismrmrd

    if rules is None:
        rules = load_rules(chains_dir)
    it = iter_ismrmrd(path, group.strip("/") or "dataset")
    try:
        header = next(it)
    finally:
        it.close()
    chain, desc, facts = select_chain(header, rules)
    lines = [f"file: {os.fspath(path)} (group {group})", f"rules: {rules.source}",
             "facts: " + ", ".join(f"{k}={v!r}" for k, v in facts.items() if k != "matrix")]
    first = True
    for rule in rules.rules:
        hit = rule.matches(facts)
        mark = "MATCH" if hit and first else ("match (later)" if hit else "no match")
        first = first and not hit
        lines.append(f"  {mark:14s} {rule.describe()}")
    lines.append(f"chain: {chain}    <- {desc}")
    return "\n".join(lines)
