"""Offline reconstruction: an ISMRMRD file through a chain to an HDF5 file (``torchgadgets run``).

The same gadgets and runner as the server; the output layout is the one ``gadgetron_ismrmrd_client``
writes (``/GROUP/image_<series>/{data,header,attributes}``).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ismrmrd

from gadgets.base import ProgressSink
from gadgets.ismrmrd_io import IsmrmrdFileError, iter_ismrmrd, parse_header
from gadgets.stream.chain import ChainSpec, build_chain, chain_context, load_chain
from gadgets.stream.h5out import ImageH5Writer
from gadgets.stream.runner import ChainResult, ChainRunner


class OfflineRunError(RuntimeError):
    """A chain run produced errors; ``errors`` holds the "[gadget] ERROR: …" lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class OfflineResult:
    images: list[Any]
    result: ChainResult
    output_path: Optional[Path]
    out_group: str
    wall_s: float
    chain: ChainSpec
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


def default_out_group() -> str:
    """Like ``gadgetron_ismrmrd_client``: the local date and time."""
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def run_offline(chain: str | os.PathLike | ChainSpec, input_path: str | os.PathLike,
                output_path: str | os.PathLike | None = None, out_group: str | None = None,
                in_group: str = "dataset", device: str | None = None, chains_dir: Path | None = None,
                progress: Optional[ProgressSink] = None, storage_dir: Path | None = None,
                raise_on_error: bool = True) -> OfflineResult:
    """Reconstruct ``input_path`` with ``chain`` (a name, a path or a ChainSpec).

    ``device`` is the default device (``auto`` if None); a chain that names its own device wins.
    Images are appended to ``output_path`` as they arrive. Raises :class:`OfflineRunError` when the
    chain reports errors (after writing whatever images were produced), unless ``raise_on_error``
    is False.
    """
    t0 = time.perf_counter()
    spec = chain if isinstance(chain, ChainSpec) else load_chain(chain, chains_dir, allow_paths=True)
    source = os.fspath(input_path)
    stream = iter_ismrmrd(input_path, in_group.strip("/"))
    header_xml = next(stream)
    header = parse_header(header_xml, source)
    ctx = chain_context(spec, default_device=device or "auto", header=header, header_xml=header_xml,
                        progress=progress, storage_dir=storage_dir)
    gadgets = build_chain(spec, ctx)
    group = out_group or default_out_group()
    writer = ImageH5Writer(output_path, group) if output_path is not None else None
    images: list[Any] = []

    def on_output(msg: Any) -> None:
        if isinstance(msg, ismrmrd.Image):
            images.append(msg)
            if writer is not None:
                writer.append(msg)

    runner = ChainRunner(gadgets, ctx, on_output=on_output)
    try:
        try:
            for msg in stream:
                if not runner.put(msg):
                    break
        except IsmrmrdFileError:
            runner.cancel("input file error")
            runner.wait()
            raise
        runner.close()
        result = runner.wait()
    finally:
        if writer is not None:
            writer.close()
    out = OfflineResult(images=images, result=result, output_path=Path(output_path) if output_path else None,
                        out_group=group, wall_s=time.perf_counter() - t0, chain=spec, device=str(ctx.device))
    if result.errors and raise_on_error:
        raise OfflineRunError(list(result.errors))
    return out
