"""Read and write BART ``.cfl``/``.hdr`` file pairs (numpy arrays, complex64).

BART stores an array as two files: ``name.hdr``, a text header ``# Dimensions`` followed by the
sizes on one line, and ``name.cfl``, the raw interleaved float32 (real, imaginary) samples in
column-major (Fortran) order, i.e. BART's dimension 0 varies fastest. Tests and benchmarks use
this to hand data to the ``bart`` command line tool and read its answer; nothing at run time
depends on BART.

Remember that BART's dimension 0 is the readout (x), 1 is y, 2 is z and 3 the coil, so a
``[C, Ny, Nx]`` tensor of this project is ``array.transpose(2, 1, 0)[:, :, None, :]`` in BART.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["readcfl", "writecfl"]


def _base(name: str | os.PathLike) -> Path:
    """Strip a trailing ``.cfl``/``.hdr`` so both files can be addressed from one name."""
    p = Path(name)
    if p.suffix in (".cfl", ".hdr"):
        p = p.with_suffix("")
    return p


def readcfl(name: str | os.PathLike) -> np.ndarray:
    """Read ``name.hdr`` + ``name.cfl`` into a complex64 array (Fortran order, BART's dimensions).

    Parameters
    ----------
    name : path without extension (``.cfl``/``.hdr`` is accepted and ignored).

    Returns
    -------
    numpy.ndarray with BART's dimensions; trailing singleton dimensions are dropped.

    Raises
    ------
    ValueError
        When the header is malformed or the data file has the wrong size.
    """
    base = _base(name)
    hdr = base.with_suffix(".hdr")
    lines = [ln.strip() for ln in hdr.read_text().splitlines()]
    try:
        i = lines.index("# Dimensions")
        dims = [int(v) for v in lines[i + 1].split()]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"readcfl: {hdr} has no valid '# Dimensions' line") from exc
    if not dims or any(d < 0 for d in dims):
        raise ValueError(f"readcfl: {hdr} lists invalid dimensions {dims}")
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    n = int(np.prod(dims))
    data = np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64)
    if data.size != n:
        raise ValueError(f"readcfl: {base}.cfl holds {data.size} samples but the header says {dims} ({n})")
    return data.reshape(dims, order="F")


def writecfl(name: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as ``name.hdr`` + ``name.cfl`` (complex64, Fortran order).

    Parameters
    ----------
    name : path without extension (``.cfl``/``.hdr`` is accepted and ignored).
    array : array-like of any numeric dtype; its axes are BART's dimensions 0, 1, 2 …
        (a torch tensor is accepted when it lives on the CPU).
    """
    base = _base(name)
    arr = np.asarray(array)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"writecfl: array must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.complex64)
    dims = arr.shape if arr.ndim > 0 else (1,)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(d) for d in dims) + "\n")
    np.asfortranarray(arr).ravel(order="F").tofile(base.with_suffix(".cfl"))
