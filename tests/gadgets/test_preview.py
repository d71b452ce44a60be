"""The labelled comparison figure (gadgets.preview): panels, error maps, temporal profiles."""

from __future__ import annotations

import numpy as np
from PIL import Image

from gadgets.preview import motion_row, panels_for, write_comparison_figure


def _cine(frames: int = 6, n: int = 32) -> np.ndarray:
    x = np.zeros((frames, n, n), np.float32)
    x[:, 4:10, 4:28] = 1.0                       # static block
    for f in range(frames):                      # a block moving along x in rows 20..23
        x[f, 20:24, 2 + 3 * f: 8 + 3 * f] = 2.0
    return x


def test_motion_row_finds_the_moving_anatomy():
    assert 20 <= motion_row(_cine()) < 24
    assert motion_row(_cine()[:1]) == 16          # one frame: the centre row


def test_panels_error_and_profile():
    ref = _cine()
    noisy = ref + 0.1
    panels = panels_for(ref, [("same", ref, 99.0), ("offset", noisy, 20.0)], frame=2)
    assert [p.caption for p in panels] == ["reference", "same  99.00 dB", "offset  20.00 dB"]
    assert panels[0].error is None
    np.testing.assert_allclose(panels[1].error, 0.0)
    np.testing.assert_allclose(panels[2].error, 0.1, rtol=1e-5)
    r = motion_row(ref)
    np.testing.assert_array_equal(panels[1].profile, ref[:, r, :])
    assert panels[0].profile.shape == (6, 32)
    two_d = panels_for(ref[:1], [("m", ref[:1], None)])
    assert two_d[1].profile is None and two_d[1].caption == "m"


def test_figure_layout(tmp_path):
    ref = _cine()
    rows = [("case A", panels_for(ref, [("m1", ref, 30.0), ("m2", ref * 0.5, 10.0)])),
            ("case B (2-D)", panels_for(ref[:1], [("m1", ref[:1], 25.0)]))]
    path = write_comparison_figure(rows, tmp_path / "fig.png", zoom=2, note="note")
    im = np.asarray(Image.open(path))
    assert im.shape[1] >= 3 * 64                  # 3 panels of 32 px at zoom 2 in the widest row
    # the first block's second panel (identical to the reference) has an all-dark error tile
    top = 22
    err = im[top + 64 + 4 + 14: top + 64 + 4 + 64, 64 + 4: 64 + 4 + 64]
    assert err.max() <= 40
    # m2 (half the reference) has a bright error tile
    err2 = im[top + 64 + 4 + 14: top + 64 + 4 + 64, 2 * (64 + 4): 2 * (64 + 4) + 64]
    assert err2.max() > 200
