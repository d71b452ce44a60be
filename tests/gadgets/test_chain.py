"""Chain files: YAML and both Gadgetron XML dialects → ChainSpec → configured gadgets."""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from gadgets import registry
from gadgets.base import ChainContext, ChainError, Gadget, GadgetParams
from gadgets.stream import chain as chain_mod
from gadgets.stream.chain import (
    DEFAULT_CHAINS_DIR, ChainSpec, GadgetSpec, build_chain, chain_context, list_chains, load_chain,
    parse_chain_text,
)

# -- small test gadgets, registered with monkeypatch -------------------------------------------


@dataclass
class _SortParams(GadgetParams):
    trigger: Literal["slice", "repetition", "none"] = "slice"
    frames: str = ""


class _Sort(Gadget):
    name = "t_sort"
    Params = _SortParams


@dataclass
class _ReconParams(GadgetParams):
    method: str = "zero_filled"
    max_iter: int = 10


class _Recon(Gadget):
    name = "t_recon"
    Params = _ReconParams


@pytest.fixture
def test_gadgets(monkeypatch):
    """Register t_sort / t_recon under this module; drop every real gadget name."""
    monkeypatch.setattr(registry, "GADGETS", {"t_sort": f"{__name__}:_Sort", "t_recon": f"{__name__}:_Recon"})
    return registry.GADGETS


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


YAML_CHAIN = """
version: 1
name: demo
chain:
  - gadget: noise
  - gadget: buffer
    params: {trigger: slice, frames: phase}
  - gadget: recon
    params:
      method: cg_sense
      max_iter: 30
"""

LEGACY_CHAIN = """
<?xml version="1.0" encoding="UTF-8"?>
<gadgetronStreamConfiguration xmlns="http://gadgetron.sf.net/gadgetron">
  <reader><slot>1008</slot><dll>gadgetron_mricore</dll>
    <classname>GadgetIsmrmrdAcquisitionMessageReader</classname></reader>
  <writer><slot>1022</slot><dll>gadgetron_mricore</dll><classname>MRIImageWriter</classname></writer>
  <gadget><name>Noise</name><dll>gadgetron_mricore</dll><classname>NoiseAdjustGadget</classname></gadget>
  <gadget><name>Acc</name><dll>gadgetron_mricore</dll>
    <classname>AcquisitionAccumulateTriggerGadget</classname>
    <property><name>trigger_dimension</name><value>SLICE</value></property>
    <property><name>sorting_dimension</name><value></value></property>
  </gadget>
  <gadget><name>B2B</name><dll>gadgetron_mricore</dll><classname>BucketToBufferGadget</classname>
    <property><name>N_dimension</name><value>phase</value></property>
    <property><name>split_slices</name><value>true</value></property>
  </gadget>
  <gadget><name>R</name><dll>torchgadgets</dll><classname>recon</classname>
    <property><name>method</name><value>cg_sense</value></property>
    <property><name>max_iter</name><value>30</value></property>
  </gadget>
</gadgetronStreamConfiguration>
"""

V2_CHAIN = """
<?xml version="1.0" encoding="UTF-8"?>
<configuration>
  <version>2</version>
  <readers>
    <reader><dll>gadgetron_core_readers</dll><classname>AcquisitionReader</classname></reader>
  </readers>
  <writers><writer><dll>gadgetron_core_writers</dll><classname>ImageWriter</classname></writer></writers>
  <stream>
    <gadget><dll>gadgetron_mricore</dll><classname>NoiseAdjustGadget</classname></gadget>
    <gadget><dll>gadgetron_mricore</dll><classname>AcquisitionAccumulateTriggerGadget</classname>
      <property name="trigger_dimension" value="slice"/>
    </gadget>
    <gadget><dll>gadgetron_mricore</dll><classname>BucketToBufferGadget</classname>
      <property name="N_dimension" value="phase"/>
    </gadget>
    <gadget><dll>torchgadgets</dll><classname>recon</classname>
      <property name="method" value="cg_sense"/>
      <property name="max_iter" value="30"/>
    </gadget>
  </stream>
</configuration>
"""


# -- equivalence of the three dialects ---------------------------------------------------------


def test_yaml_and_both_xml_dialects_load_to_equal_specs(tmp_path):
    y = load_chain(write(tmp_path, "a/demo.yaml", YAML_CHAIN), allow_paths=True)
    legacy = load_chain(write(tmp_path, "b/demo.xml", LEGACY_CHAIN), allow_paths=True)
    v2 = load_chain(write(tmp_path, "c/demo.xml", V2_CHAIN), allow_paths=True)
    assert y == legacy == v2
    assert y.gadget_names == ["noise", "buffer", "recon"]
    # Gadgetron trigger_dimension/N_dimension → our trigger/frames; the two buckets merged into one step
    assert legacy.gadgets[1].params == {"trigger": "slice", "frames": "phase"}
    assert legacy.gadgets[1].label == "Acc+B2B"
    assert (y.dialect, legacy.dialect, v2.dialect) == ("yaml", "gadgetron-legacy", "gadgetron-v2")
    assert legacy.readers == ["GadgetIsmrmrdAcquisitionMessageReader"] and v2.writers == ["ImageWriter"]


def test_spec_equality_notices_a_different_parameter():
    a = parse_chain_text(YAML_CHAIN)
    b = parse_chain_text(YAML_CHAIN.replace("max_iter: 30", "max_iter: 31"))
    assert a != b
    assert GadgetSpec("recon", {"max_iter": 30}, "x") == GadgetSpec("recon", {"max_iter": "30"}, "y")
    assert GadgetSpec("recon", {"flag": True}, "x") == GadgetSpec("recon", {"flag": "true"}, "y")


def test_shipped_default_twins_are_equal():
    y, legacy, v2 = load_chain("default"), load_chain("default.xml"), load_chain("default_v2")
    assert y.gadgets == legacy.gadgets == v2.gadgets
    assert y.gadget_names == ["noise", "remove_oversampling", "buffer", "coil_estimate", "recon", "image_export"]
    assert y.gadgets[4].params == {"method": "cg_sense", "max_iter": 30, "lam": 0.01}


def test_every_shipped_chain_parses_and_uses_registered_gadgets():
    names = [n for n, _ in list_chains(DEFAULT_CHAINS_DIR)]
    for required in ("default", "default.xml", "default_v2", "cartesian_sense", "radial_cine_cg_sense",
                     "spiral_cine_cg_sense", "passthrough"):
        assert required in names
    for name in names:
        spec = load_chain(name)
        assert set(spec.gadget_names) <= set(registry.GADGETS), (name, spec.gadget_names)
    assert load_chain("passthrough").gadgets == []


def test_where_names_file_line_index_and_label(tmp_path):
    spec = load_chain(write(tmp_path, "demo.yaml", YAML_CHAIN), allow_paths=True)
    assert spec.gadgets[2].where.endswith("demo.yaml:7 (gadget #3 'recon')")
    legacy = parse_chain_text(textwrap.dedent(LEGACY_CHAIN).lstrip("\n"), "g.xml")
    assert legacy.gadgets[0].where == "g.xml:6 (gadget #1 'Noise')"
    assert legacy.gadgets[1].where == "g.xml:7 (gadget #2 'Acc+B2B')"


# -- YAML errors --------------------------------------------------------------------------------


def test_yaml_unknown_top_level_key():
    with pytest.raises(ChainError, match=r"<inline>:3: unknown top-level key\(s\) \['chian'\]; allowed:"):
        parse_chain_text("version: 1\nname: x\nchian: []\n")


def test_yaml_unknown_entry_key_and_missing_gadget():
    with pytest.raises(ChainError, match=r"x.yaml:3 \(gadget #2\): unknown key\(s\) \['parms'\]"):
        parse_chain_text("chain:\n  - gadget: a\n  - gadget: b\n    parms: {}\n", "x.yaml")
    with pytest.raises(ChainError, match=r"x.yaml:2 \(gadget #1\): chain entry needs a 'gadget' key"):
        parse_chain_text("chain:\n  - params: {}\n", "x.yaml")


def test_yaml_duplicate_keys_rejected():
    with pytest.raises(ChainError, match=r"x.yaml:5: params of gadget #1 'buffer': duplicate key 'trigger'"):
        parse_chain_text("chain:\n  - gadget: buffer\n    params:\n"
                         "      trigger: slice\n      trigger: phase\n", "x.yaml")


def test_malformed_yaml_reports_line():
    with pytest.raises(ChainError, match=r"bad.yaml:4:1: malformed YAML: while parsing a flow mapping "
                                         r"\(started at line 3, column 5\); expected ',' or '}'"):
        parse_chain_text("chain:\n  - gadget: a\n  - {gadget: b\n", "bad.yaml")


def test_yaml_bad_device_and_version():
    with pytest.raises(ChainError, match=r"<inline>:1: 'device' must be one of auto, cpu, cuda, "
                                         r"cuda:N; got 'gpu'"):
        parse_chain_text("device: gpu\nchain: []\n")
    assert parse_chain_text("device: cuda:1\nchain: []\n").device == "cuda:1"
    with pytest.raises(ChainError, match="unsupported chain file version 2"):
        parse_chain_text("version: 2\nchain: []\n")
    with pytest.raises(ChainError, match="missing required key 'chain'"):
        parse_chain_text("name: x\n")


# -- XML errors ---------------------------------------------------------------------------------


def test_malformed_xml_reports_line_and_column():
    text = "<configuration>\n  <version>2</version>\n  <stream>\n  </strem>\n</configuration>\n"
    with pytest.raises(ChainError, match=r"bad.xml:4:\d+: malformed XML: mismatched tag"):
        parse_chain_text(text, "bad.xml")


def test_unknown_gadgetron_class_names_class_and_line():
    text = LEGACY_CHAIN.replace("NoiseAdjustGadget", "FancyUnknownGadget")
    with pytest.raises(ChainError, match=r"g.xml:6: unknown gadget class 'FancyUnknownGadget' "
                                         r"\(dll 'gadgetron_mricore'\)"):
        parse_chain_text(textwrap.dedent(text).lstrip("\n"), "g.xml")


def test_unknown_gadgetron_property_is_an_error_but_harmless_ones_are_logged(caplog):
    text = V2_CHAIN.replace('<property name="N_dimension" value="phase"/>',
                            '<property name="N_dimension" value="phase"/>\n'
                            '<property name="frobnicate" value="1"/>')
    with pytest.raises(ChainError, match=r"Gadgetron property 'frobnicate' of BucketToBufferGadget "
                                         r".* has no equivalent here"):
        parse_chain_text(text)
    with caplog.at_level(logging.INFO, logger="torchgadgets.chain"):
        spec = parse_chain_text(LEGACY_CHAIN)
    assert "split_slices" in caplog.text and "sorting_dimension" in caplog.text
    assert "split_slices" not in spec.gadgets[1].params


def test_both_property_styles_at_once_rejected():
    text = V2_CHAIN.replace('<property name="method" value="cg_sense"/>',
                            '<property name="method" value="cg_sense"><value>sense</value></property>')
    with pytest.raises(ChainError, match=r"ambiguous <property>"):
        parse_chain_text(text)


@pytest.mark.parametrize("node, message", [
    ("external", r"x.xml:4: external python module 'm' is not run by this server"),
    ("parallel", r"x.xml:4: <parallel> with branch ''.* is not run by this server"),
    ("distributed", r"x.xml:4: <distributed> nodes are not supported by this server"),
])
def test_unsupported_nodes_refused_with_line(node, message):
    """Only our own module (gadgets.external) runs from an <external> node; other modules are never
    imported (no code from the network), and branch kinds we do not run are refused."""
    text = ("<configuration>\n<version>2</version>\n<stream>\n"
            f"<{node}><execute name=\"m\" target=\"f\" type=\"python\"/></{node}>\n"
            "</stream>\n</configuration>\n")
    with pytest.raises(ChainError, match=message):
        parse_chain_text(text, "x.xml")


def test_python_gadget_refused():
    text = LEGACY_CHAIN.replace("<dll>torchgadgets</dll><classname>recon</classname>",
                                "<dll>gadgetron_python</dll><classname>PythonGadget</classname>")
    with pytest.raises(ChainError, match="external python module '' is not run by this server"):
        parse_chain_text(text)


def test_unknown_reader_and_root_and_version():
    with pytest.raises(ChainError, match=r"unknown Gadgetron reader class 'FancyReader'"):
        parse_chain_text(LEGACY_CHAIN.replace("GadgetIsmrmrdAcquisitionMessageReader", "FancyReader"))
    with pytest.raises(ChainError, match=r"no parser accepts root element <pipeline>"):
        parse_chain_text("<pipeline/>")
    with pytest.raises(ChainError, match=r"needs exactly one <version>2</version>"):
        parse_chain_text(V2_CHAIN.replace("<version>2</version>", "<version>3</version>"))


def test_doctype_refused():
    with pytest.raises(ChainError, match="DOCTYPE"):
        parse_chain_text('<!DOCTYPE x [<!ENTITY a "b">]>\n<configuration/>')


def test_property_references_resolved_and_cycles_rejected():
    text = V2_CHAIN.replace('<gadget><dll>gadgetron_mricore</dll><classname>BucketToBufferGadget</classname>',
                            '<gadget><name>B2B</name><dll>gadgetron_mricore</dll>'
                            '<classname>BucketToBufferGadget</classname>')
    text = text.replace('<property name="max_iter" value="30"/>',
                        '<property name="max_iter" value="n@R"/>')
    text = text.replace("<gadget><dll>torchgadgets</dll>", "<gadget><name>R</name><dll>torchgadgets</dll>")
    text = text.replace('<property name="method" value="cg_sense"/>',
                        '<property name="method" value="cg_sense"/><property name="n" value="30"/>')
    spec = parse_chain_text(text)
    assert spec.gadgets[2].params["max_iter"] == "30"
    cyclic = text.replace('<property name="n" value="30"/>', '<property name="n" value="max_iter@R"/>')
    with pytest.raises(ChainError, match="cyclic property reference"):
        parse_chain_text(cyclic)


def test_conflicting_merge_rejected():
    text = V2_CHAIN.replace(
        '<classname>AcquisitionAccumulateTriggerGadget</classname>\n'
        '      <property name="trigger_dimension" value="slice"/>',
        '<classname>BucketToBufferGadget</classname>\n      <property name="N_dimension" value="contrast"/>')
    with pytest.raises(ChainError, match=r"BucketToBufferGadget sets buffer parameter 'frames' to "
                                         r"'phase', but the merged 'BucketToBufferGadget' \(line 11\) "
                                         r"already set it to 'none'"):
        parse_chain_text(text)


# -- lookup -------------------------------------------------------------------------------------


def test_lookup_with_and_without_extension(tmp_path):
    write(tmp_path, "one.yaml", "name: one\nchain: []\n")
    write(tmp_path, "one.xml", "<configuration><version>2</version><stream/></configuration>")
    write(tmp_path, "two.yml", "chain: []\n")
    assert load_chain("one", tmp_path).dialect == "yaml"            # .yaml preferred over .xml
    assert load_chain("one.xml", tmp_path).dialect == "gadgetron-v2"
    assert load_chain("two", tmp_path).name == "two"
    assert load_chain("two.yml", tmp_path).name == "two"
    with pytest.raises(ChainError, match=r"unknown chain 'three'.*available: \['one', 'one.xml', 'two'\]"):
        load_chain("three", tmp_path)
    assert list_chains(tmp_path) == [("one", ""), ("one.xml", ""), ("two", "")]


@pytest.mark.parametrize("bad", ["../default", "..", "/etc/passwd", "sub/x", "sub\\x", ".hidden", "a\x00b",
                                 ""])
def test_path_escape_refused(tmp_path, bad):
    (tmp_path / "chains").mkdir()
    write(tmp_path, "default.yaml", "chain: []\n")          # a file just outside the chain dir
    write(tmp_path, "chains/sub/x.yaml", "chain: []\n")
    with pytest.raises(ChainError, match="invalid chain name"):
        load_chain(bad, tmp_path / "chains")


def test_symlink_out_of_chain_dir_refused(tmp_path):
    (tmp_path / "chains").mkdir()
    target = write(tmp_path, "secret.yaml", "chain: []\n")
    (tmp_path / "chains" / "evil.yaml").symlink_to(target)
    with pytest.raises(ChainError, match="outside the chain directory"):
        load_chain("evil", tmp_path / "chains")


def test_paths_allowed_only_when_asked(tmp_path):
    p = write(tmp_path, "mine.yaml", "chain: []\n")
    assert load_chain(str(p), allow_paths=True).name == "mine"
    with pytest.raises(ChainError, match="invalid chain name"):
        load_chain(str(p))


def test_env_var_overrides_chain_dir(tmp_path, monkeypatch):
    write(tmp_path, "only_here.yaml", "description: from env\nchain: []\n")
    monkeypatch.setenv(chain_mod.CHAINS_ENV, str(tmp_path))
    assert load_chain("only_here").description == "from env"
    assert list_chains() == [("only_here", "from env")]


# -- build --------------------------------------------------------------------------------------


def test_build_chain_coerces_typed_params(test_gadgets):
    spec = parse_chain_text("""<configuration><version>2</version><stream>
        <gadget><dll>torchgadgets</dll><classname>t_sort</classname></gadget>
        <gadget><dll>torchgadgets</dll><classname>t_recon</classname>
          <property name="method" value="cg_sense"/><property name="max_iter" value="30"/>
        </gadget></stream></configuration>""")
    assert spec.gadget_names == ["t_sort", "t_recon"]
    ctx = ChainContext()
    gadgets = build_chain(spec, ctx)
    assert [type(g) for g in gadgets] == [_Sort, _Recon]
    assert gadgets[1].params.max_iter == 30 and isinstance(gadgets[1].params.max_iter, int)
    assert gadgets[1].params.method == "cg_sense"
    assert gadgets[0].ctx is ctx and ctx.chain_name == "inline"


def test_build_unknown_gadget(tmp_path, test_gadgets):
    p = write(tmp_path, "c.yaml", "chain:\n  - gadget: t_sort\n  - gadget: t_recn\n")
    spec = load_chain(p, allow_paths=True)
    with pytest.raises(ChainError, match=r"unknown gadget 't_recn' at .*c.yaml:3 \(gadget #2 't_recn'\); "
                                         r"available: \['t_recon', 't_sort'\]"):
        build_chain(spec, ChainContext())


def test_build_unknown_parameter_names_file_line_gadget_key_and_allowed(tmp_path, test_gadgets):
    p = write(tmp_path, "c.yaml", """
        name: c
        chain:
          - gadget: t_sort
          - gadget: t_recon
            name: main recon
            params: {method: cg_sense, max_itr: 5}
        """)
    spec = load_chain(p, allow_paths=True)
    with pytest.raises(ChainError) as info:
        build_chain(spec, ChainContext())
    msg = str(info.value)
    assert "c.yaml:4 (gadget #2 'main recon')" in msg
    assert "['max_itr']" in msg and "allowed: ['method', 'max_iter']" in msg


def test_build_wrong_type_and_literal(tmp_path, test_gadgets):
    spec = parse_chain_text("chain:\n  - gadget: t_recon\n    params: {max_iter: lots}\n", "c.yaml")
    with pytest.raises(ChainError, match=r"c.yaml:2 \(gadget #1 't_recon'\): parameter 'max_iter' must be an "
                                         r"integer, got 'lots'"):
        build_chain(spec, ChainContext())
    spec = parse_chain_text("chain:\n  - gadget: t_sort\n    params: {trigger: phase}\n", "c.yaml")
    with pytest.raises(ChainError, match=r"parameter 'trigger' must be one of "
                                         r"\['slice', 'repetition', 'none'\]"):
        build_chain(spec, ChainContext())


def test_build_registered_but_missing_module(monkeypatch):
    monkeypatch.setattr(registry, "GADGETS", {"ghost": "gadgets.no_such_module_here:Ghost"})
    with pytest.raises(ChainError, match=r"gadget 'ghost' is registered as "
                                         r"'gadgets.no_such_module_here:Ghost' "
                                         r"but cannot be loaded"):
        build_chain(parse_chain_text("chain: [ghost]\n"), ChainContext())


def test_chainspec_fields():
    spec = parse_chain_text(YAML_CHAIN, "<inline>")
    assert isinstance(spec, ChainSpec) and spec.name == "demo" and spec.device is None
    assert spec.source == "<inline>"


def test_chain_context_device_and_logger():
    import torch

    spec = parse_chain_text("name: mine\ndevice: cpu\nchain: []\n", "m.yaml")
    ctx = chain_context(spec, default_device="cuda:7")      # the chain's device wins over the default
    assert ctx.device == torch.device("cpu") and ctx.chain_name == "mine"
    assert ctx.logger.name == "torchgadgets.chain.mine"
    if not torch.cuda.is_available():
        spec = parse_chain_text("device: cuda\nchain: []\n", "g.yaml")
        with pytest.raises(ChainError, match=r"g.yaml: device 'cuda' from chain 'g' \(g.yaml\): .*not "
                                             r"available"):
            chain_context(spec)


def test_shipped_chains_build_with_the_real_gadgets():
    """Parameter names in chains/ match the real gadgets (skipped while a gadget module is missing)."""
    import importlib

    for target in sorted(set(registry.GADGETS.values())):
        module = target.partition(":")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            pytest.skip(f"gadget module {module} not importable yet: {exc}")
    for name, _ in list_chains(DEFAULT_CHAINS_DIR):
        spec = load_chain(name)
        gadgets = build_chain(spec, ChainContext())
        assert [type(g) for g in gadgets] == [registry.get_gadget(n) for n in spec.gadget_names]
