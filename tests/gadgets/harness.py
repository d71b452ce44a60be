"""A tiny gadget test harness: push messages through a list of gadgets, collect what comes out.

Usage::

    ctx = make_context(header_xml, storage_dir=tmp_path)
    out = run_gadgets([NoiseGadget(ctx=ctx), BufferGadget(ctx=ctx)], acquisitions)

or step by step, to see *when* a gadget emits (trigger semantics)::

    h = Harness([BufferGadget(ctx=ctx)])
    emitted = h.push(acq)      # outputs of the last gadget caused by this one message
    rest = h.close()           # flush every gadget in order, passing flushed messages downstream

Messages flow exactly as in the runner: ``gadget.handle(msg)`` (pass-through for types a gadget
does not accept), then at end of stream ``gadget.flush()`` from first to last gadget, each
flushed message travelling through the remaining gadgets.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import h5py
import ismrmrd
import numpy as np

from gadgets.base import ChainContext, Gadget


def make_context(header_xml: str | bytes | None = None, storage_dir: Optional[os.PathLike[str] | str] = None,
                 **kwargs: Any) -> ChainContext:
    """A ChainContext with the header parsed from ``header_xml`` (CPU device by default)."""
    if isinstance(header_xml, bytes):
        header_xml = header_xml.decode("utf-8")
    header = ismrmrd.xsd.CreateFromDocument(header_xml) if header_xml else None
    return ChainContext(header=header, header_xml=header_xml or "",
                        storage_dir=Path(storage_dir) if storage_dir is not None else None, **kwargs)


class Harness:
    """Feed messages one at a time through ``gadgets`` (in order) and record the outputs."""

    def __init__(self, gadgets: Sequence[Gadget]) -> None:
        if not gadgets:
            raise ValueError("Harness needs at least one gadget")
        self.gadgets = list(gadgets)
        self.outputs: list[Any] = []
        self.closed = False

    def _through(self, msgs: Iterable[Any], start: int) -> list[Any]:
        current = list(msgs)
        for g in self.gadgets[start:]:
            nxt: list[Any] = []
            for m in current:
                nxt.extend(g.handle(m))
            current = nxt
        return current

    def push(self, msg: Any) -> list[Any]:
        """Send one message; return (and record) what the last gadget emitted because of it."""
        if self.closed:
            raise RuntimeError("Harness already closed")
        out = self._through([msg], 0)
        self.outputs.extend(out)
        return out

    def close(self) -> list[Any]:
        """End of stream: flush each gadget in order; flushed messages pass through later gadgets."""
        if self.closed:
            raise RuntimeError("Harness already closed")
        self.closed = True
        out: list[Any] = []
        for i, g in enumerate(self.gadgets):
            out.extend(self._through(list(g.flush()), i + 1))
        self.outputs.extend(out)
        return out


def run_gadgets(gadgets: Sequence[Gadget], messages: Iterable[Any]) -> list[Any]:
    """Push all ``messages`` then close; returns every output of the last gadget, in order."""
    h = Harness(gadgets)
    for m in messages:
        h.push(m)
    h.close()
    return h.outputs


def read_acquisitions(path: os.PathLike[str] | str,
                      group: str = "dataset") -> tuple[str, list[ismrmrd.Acquisition]]:
    """(header XML, acquisitions) of an ISMRMRD HDF5 file, opened read-only without file locking."""
    with h5py.File(path, "r", locking=False) as f:
        g = f[group]
        xml = g["xml"][0]
        xml = xml.decode("utf-8") if isinstance(xml, bytes) else str(xml)
        records = g["data"][:] if "data" in g else []
    acqs = []
    for rec in records:
        acq = ismrmrd.Acquisition(rec["head"])
        acq.data[:] = np.asarray(rec["data"]).view(np.complex64).reshape(acq.active_channels,
                                                                         acq.number_of_samples)
        if acq.traj.size > 0:
            acq.traj[:] = np.asarray(rec["traj"]).reshape(acq.number_of_samples, acq.trajectory_dimensions)
        acqs.append(acq)
    return xml, acqs
