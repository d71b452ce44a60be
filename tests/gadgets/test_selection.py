"""Chain selection rules on real phantom headers (radial, spiral, Cartesian) and the shipped rules."""

from __future__ import annotations

import pytest

from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
from gadgets.stream.chain import default_chains_dir, load_chain
from gadgets.stream.selection import (SelectionError, header_facts, load_rules, parse_rules, select_chain,
                                      select_for_file)
from recon_core.phantoms import simulate_scan


@pytest.fixture(scope="module")
def headers():
    out = {}
    for kind, kw in [("cartesian", dict(accel=2, acs_lines=8)), ("radial", dict(spokes_per_frame=8)),
                     ("spiral", dict(interleaves=8, interleaves_per_frame=2))]:
        scan = simulate_scan(kind, matrix=16, n_frames=3, n_coils=2, **kw)
        xml, acqs = scan_to_ismrmrd(scan, protocol_name=f"CV_{kind}_cine")
        out[kind] = (xml, acqs)
    return out


def test_facts(headers):
    f = header_facts(headers["radial"][0])
    assert f["trajectory"] == "goldenangle" and f["phases"] == 3 and f["channels"] == 2
    assert f["protocol"] == "CV_radial_cine" and f["sequence_type"] == "TrueFISP"
    c = header_facts(headers["cartesian"][0])
    assert c["trajectory"] == "cartesian" and c["matrix"] == [32, 16, 1]
    assert header_facts(headers["spiral"][0])["trajectory"] == "spiral"


def test_shipped_rules_pick_existing_chains(headers):
    rules = load_rules(default_chains_dir())
    assert "auto" in rules.generic_names and rules.is_generic("auto") and rules.is_generic("auto.xml")
    expected = {"radial": "radial_cine_cg_sense", "spiral": "spiral_cine_cg_sense", "cartesian": "cartesian_sense"}
    for kind, (xml, _) in headers.items():
        chain, desc, facts = select_chain(xml, rules)
        assert chain == expected[kind], (kind, desc)
        assert "selection.yaml:" in desc and facts["protocol"] == f"CV_{kind}_cine"
        assert load_chain(chain).name == chain            # the chosen chain exists and parses
    for rule in rules.rules:
        load_chain(rule.chain)
    load_chain(rules.default)


RULES = """\
version: 1
generic_names: [scanner]
rules:
  - name: long cine by protocol
    match: {protocol: "(?i)cine", phases: {min: 10}}
    chain: a
  - name: small cartesian
    match: {trajectory: cartesian, matrix: [32, 16], channels: [2, 4], sequence_type: "FISP$"}
    chain: b
  - name: spiral few phases
    match: {trajectory: [spiral], phases: 3, matrix_y: {max: 64}}
    chain: c
  - name: catch-all
    chain: d
"""


def test_first_match_wins_and_matchers(headers):
    rules = parse_rules(RULES, "mem.yaml")
    assert rules.generic_names == ("auto", "scanner")
    assert select_chain(headers["cartesian"][0], rules)[0] == "b"
    assert select_chain(headers["spiral"][0], rules)[0] == "c"
    chain, desc, _ = select_chain(headers["radial"][0], rules)
    assert chain == "d" and "catch-all" in desc and "mem.yaml:13" in desc
    no_default = parse_rules("rules:\n  - match: {trajectory: epi}\n    chain: x\n", "n.yaml")
    with pytest.raises(SelectionError, match="no selection rule in n.yaml"):
        select_chain(headers["radial"][0], no_default)
    with_default = parse_rules("rules: []\ndefault: zz\n", "d.yaml")
    assert select_chain(headers["radial"][0], with_default)[:2] == ("zz", "default of d.yaml (no rule matched)")


@pytest.mark.parametrize("text, needle", [
    ("rules:\n  - match: {trajectry: radial}\n    chain: x\n", "r.yaml:2: rule 'rule 0' match: unknown key 'trajectry'"),
    ("rules:\n  - chain: x\n    when: {}\n", "r.yaml:3: rule 0: unknown key 'when'"),
    ("rulez: []\n", "r.yaml:1: selection file: unknown key 'rulez'"),
    ("rules:\n  - match: {trajectory: helix}\n    chain: x\n", "'trajectory' must be one of"),
    ("rules:\n  - match: {protocol: '('}\n    chain: x\n", "bad regular expression"),
    ("rules:\n  - match: {phases: {least: 2}}\n    chain: x\n", "'phases' range takes"),
    ("rules:\n  - match: {}\n", "has no 'chain'"),
    ("version: 2\n", "version must be 1"),
])
def test_bad_rules_name_file_and_line(text, needle):
    with pytest.raises(SelectionError) as err:
        parse_rules(text, "r.yaml")
    assert needle in str(err.value)


def test_bad_header():
    with pytest.raises(SelectionError, match="does not parse"):
        header_facts("<ismrmrdHeader><broken")


def test_select_for_file(headers, tmp_path):
    xml, acqs = headers["spiral"]
    path = tmp_path / "spiral.h5"
    write_ismrmrd(path, xml, acqs)
    text = select_for_file(path)
    assert "chain: spiral_cine_cg_sense" in text and "trajectory='spiral'" in text
    assert "MATCH" in text and "no match" in text
    rules = parse_rules(RULES, "mem.yaml")
    assert "chain: c " in select_for_file(path, "/dataset", rules=rules)
