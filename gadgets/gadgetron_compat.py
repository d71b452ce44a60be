"""Gadgets that stand in for Gadgetron gadgets with no image output of their own.

* ``noise_summary`` (NoiseSummaryGadget, ``NoiseSummary.xml``): answers a dependency query with the
  stored noise statistics of ``noise_file`` as a 1019 MetaContainer at the end of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from gadgets.base import Gadget, GadgetParams

#: Gadgetron's file-name prefix of stored noise covariances (``…_<measurement id>``)
NOISE_FILE_PREFIX = "GadgetronNoiseCovarianceMatrix_"


@dataclass
class NoiseSummaryParams(GadgetParams):
    """noise_file: the stored noise dependency (``GadgetronNoiseCovarianceMatrix_<id>`` or ``<id>``)."""

    noise_file: str = ""

    @classmethod
    def check_untrusted(cls, values: Any, where: str) -> None:
        """The name is only ever looked up as a measurement ID in the server's noise store."""


class NoiseSummaryGadget(Gadget):
    """Emit the summary of a stored noise dependency (status, channels, sigma range, dwell time)."""

    name = "noise_summary"
    Params = NoiseSummaryParams
    accepts = ()

    def handle(self, msg: Any) -> Iterator[Any]:
        return iter(())          # a dependency chain carries no data worth passing on

    def flush(self) -> Iterator[Any]:
        from gadgets.stream.protocol import DependencyQuery, meta_to_xml
        from gadgets.stream.storage import NoiseStore, noise_summary

        p: NoiseSummaryParams = self.params  # type: ignore[assignment]
        mid = p.noise_file
        if mid.startswith(NOISE_FILE_PREFIX):
            mid = mid[len(NOISE_FILE_PREFIX):]
        stats = None
        if self.ctx.storage_dir is not None and mid and "/" not in mid and ".." not in mid:
            try:
                stats = NoiseStore(self.ctx.storage_dir).load(mid)
            except ValueError as exc:
                self.log.warning("noise dependency %r unreadable: %s", mid, exc)
        summary = noise_summary(stats)
        self.log.info("noise summary for %r: %s", mid, summary.get("status"))
        yield DependencyQuery(meta_to_xml(summary))
