"""Trained weights: files with embedded metadata, a registry (name → file, sha256, metadata), one loader.

A weights file is a ``torch.save`` of ``{"format": FORMAT, "meta": {...}, "state_dict": {...}}``
where ``meta`` holds ``method``, ``arch`` (the architecture parameters the state dict was built
with), ``trained_on`` (a sentence and the training command), ``package_version`` and ``created``.

The registry is ``registry.json`` in a weights folder: ``{"weights": {NAME: entry}}`` with entries
``name, file, sha256, method, arch, trained_on, package_version, created``. The shipped registry
is ``recon_core/weights/`` (package data); folders named in the environment variable
``TORCHGADGETS_WEIGHTS`` (``os.pathsep``-separated) are searched first, so users and tests register
their own weights without writing into the installed package.

:func:`load_weights` is the one place learned methods read weights: ``torch.load`` with
``map_location`` and ``weights_only=True``, the sha256 checked against the registry (registry
names), and the embedded method and architecture checked against what the caller builds; a
mismatch raises :class:`WeightsMismatchError` naming both sides.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

Tensor = torch.Tensor

__all__ = ["FORMAT", "ENV_VAR", "PACKAGE_WEIGHTS_DIR", "WeightsError", "WeightsMismatchError", "RegistryEntry",
           "ResolvedWeights", "save_weights", "read_metadata", "register_weights", "registry_dirs", "read_registry",
           "resolve_weights", "default_weights_name", "load_weights", "sha256_file", "package_version"]

FORMAT = "torchgadgets-weights/1"
ENV_VAR = "TORCHGADGETS_WEIGHTS"
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
REGISTRY_FILE = "registry.json"


class WeightsError(ValueError):
    """A weights file or registry entry is missing, unreadable or inconsistent."""


class WeightsMismatchError(WeightsError):
    """The weights do not fit what the caller builds (hash, method or architecture)."""


@dataclass
class RegistryEntry:
    """One registered weights file (``file`` relative to the registry folder)."""

    name: str
    file: str
    sha256: str
    method: str
    arch: dict[str, Any]
    trained_on: str
    package_version: str
    created: str


@dataclass
class ResolvedWeights:
    """Where a ``weights:`` value points: the file, and its registry entry (None for a plain path)."""

    path: Path
    entry: Optional[RegistryEntry]
    label: str


def package_version() -> str:
    """The torchgadgets version recorded in weights metadata."""
    from recon_core import __version__

    return str(__version__)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(v: Any) -> Any:
    """Architecture values as JSON-able plain types (tuples → lists) so saved and asked arch compare equal."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"architecture values must be plain (bool, int, float, str, list, dict), got {type(v).__name__}")


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, Tensor], method: str, arch: Mapping[str, Any],
                 trained_on: str, extra: Mapping[str, Any] | None = None) -> str:
    """Write ``state_dict`` (moved to the CPU) with its metadata embedded; returns the file's sha256."""
    meta = {"method": str(method), "arch": _plain(dict(arch)), "trained_on": str(trained_on),
            "package_version": package_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
    if extra:
        meta["extra"] = _plain(dict(extra))
    sd = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "meta": meta, "state_dict": sd}, tmp)
    os.replace(tmp, path)
    return sha256_file(path)


#: weights already read by this process, by (path, mtime, size, device): a long-lived worker (a server
#: session process, a Ray worker) reads and verifies each file once, however many scans it reconstructs
_FILE_CACHE: dict[tuple[str, int, int, str], dict[str, Any]] = {}
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), int(st.st_mtime_ns), int(st.st_size)


def _cached_sha256(path: Path) -> str:
    key = _file_key(path)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def _load_file(path: Path, device: torch.device | str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"trained weights not found: {path}")
    key = (*_file_key(path), str(device))
    if key in _FILE_CACHE:
        hit = _FILE_CACHE[key]
        return {**hit, "state_dict": dict(hit["state_dict"])}
    obj = _read_file(path, device)
    _FILE_CACHE[key] = obj
    return {**obj, "state_dict": dict(obj["state_dict"])}


def _read_file(path: Path, device: torch.device | str) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several types for non-torch / tampered files
        raise WeightsError(f"weights file {path} cannot be read as torchgadgets weights: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "state_dict" not in obj:
        raise WeightsError(f"weights file {path} has no torchgadgets metadata (format {FORMAT!r}); "
                           "write it with recon_core.training.weights.save_weights")
    return obj


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata embedded in a weights file (loaded on the CPU)."""
    return dict(_load_file(Path(path), "cpu")["meta"])


# ------------------------------------------------------------------------------------------ registry
def registry_dirs(registry_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for registry names, first match wins: ``registry_dir`` if given, the
    folders in ``$TORCHGADGETS_WEIGHTS``, then the shipped ``recon_core/weights``."""
    dirs: list[Path] = []
    if registry_dir is not None:
        dirs.append(Path(registry_dir))
    env = os.environ.get(ENV_VAR, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p.strip()]
    dirs.append(PACKAGE_WEIGHTS_DIR)
    return dirs


def read_registry(folder: str | os.PathLike) -> dict[str, RegistryEntry]:
    """The entries of ``folder/registry.json`` (empty when the file does not exist)."""
    f = Path(folder) / REGISTRY_FILE
    if not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text())
        return {name: RegistryEntry(**e) for name, e in raw.get("weights", {}).items()}
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"weights registry {f} is malformed: {exc}") from exc


def register_weights(name: str, path: str | os.PathLike, registry_dir: str | os.PathLike | None = None,
                     overwrite: bool = False) -> RegistryEntry:
    """Add a weights file written by :func:`save_weights` to a registry as ``name``.

    The file is copied into the registry folder (``NAME.pt``) unless it is already there; the entry
    records its sha256 and the embedded metadata. ``registry_dir`` defaults to the first folder of
    ``$TORCHGADGETS_WEIGHTS``, else the package's own folder (for maintainers shipping weights).
    """
    if not name or any(c in name for c in "/\\") or name.endswith(".pt"):
        raise ValueError(f"registry name must be a plain name (no path, no .pt), got {name!r}")
    folder = Path(registry_dir) if registry_dir is not None else registry_dirs()[0]
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(path)
    meta = read_metadata(src)
    entries = read_registry(folder)
    if name in entries and not overwrite:
        raise WeightsError(f"weights {name!r} are already registered in {folder}; pass overwrite=True to replace")
    dest = folder / f"{name}.pt"
    if src.resolve() != dest.resolve():
        shutil.copyfile(src, dest)
    entry = RegistryEntry(name=name, file=dest.name, sha256=sha256_file(dest), method=meta["method"],
                          arch=meta["arch"], trained_on=meta["trained_on"], package_version=meta["package_version"],
                          created=meta["created"])
    entries[name] = entry
    data = {"weights": {k: asdict(v) for k, v in sorted(entries.items())}}
    tmp = folder / (REGISTRY_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / REGISTRY_FILE)
    return entry


def _looks_like_path(value: str) -> bool:
    return value.endswith(".pt") or "/" in value or "\\" in value or value.startswith(".")


def resolve_weights(name_or_path: str | os.PathLike, registry_dir: str | os.PathLike | None = None
                    ) -> ResolvedWeights:
    """A registry name (looked up in :func:`registry_dirs`) or a path to a weights file.

    Raises ``KeyError`` listing the registered names for an unknown name, ``FileNotFoundError``
    for a missing path."""
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(str(name_or_path)):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"trained weights not found: {path}")
        return ResolvedWeights(path=path, entry=None, label=str(path))
    name = str(name_or_path)
    known: list[str] = []
    for folder in registry_dirs(registry_dir):
        entries = read_registry(folder)
        if name in entries:
            e = entries[name]
            return ResolvedWeights(path=folder / e.file, entry=e, label=name)
        known += list(entries)
    raise KeyError(f"unknown weights {name!r}; registered: {sorted(set(known))} "
                   f"(searched {[str(d) for d in registry_dirs(registry_dir)]}); or give a path to a .pt file")


def default_weights_name(method: str, arch: Mapping[str, Any], registry_dir: str | os.PathLike | None = None) -> str:
    """The registered weights for ``method`` whose architecture equals ``arch`` (first folder wins)."""
    want = _plain(dict(arch))
    candidates: list[str] = []
    for folder in registry_dirs(registry_dir):
        for name, e in read_registry(folder).items():
            if e.method != method:
                continue
            if {k: e.arch.get(k) for k in want} == want:
                return name
            candidates.append(f"{name} ({_fmt_arch(e.arch)})")
    raise WeightsError(f"no registered weights for {method} with {_fmt_arch(want)}; registered for {method}: "
                       f"{candidates or 'none'}. Train some with `torchgadgets train {method} ... --register NAME` "
                       "or choose an architecture that has weights (e.g. preset: fast)")


def _fmt_arch(arch: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in arch.items())


def load_weights(name_or_path: str | os.PathLike, device: torch.device | str, method: str | None = None,
                 arch: Mapping[str, Any] | None = None, registry_dir: str | os.PathLike | None = None
                 ) -> dict[str, Tensor]:
    """Load a state dict onto ``device``, verified.

    * registry names: the file's sha256 must equal the registry's;
    * the embedded ``method`` must equal ``method`` and every key of ``arch`` must equal the
      embedded architecture (the method builds its network from ``arch`` before loading).

    Raises
    ------
    WeightsMismatchError
        Hash, method or architecture differ; the message names both sides.
    KeyError, FileNotFoundError
        Unknown registry name or missing file.
    """
    res = resolve_weights(name_or_path, registry_dir)
    if res.entry is not None:
        digest = _cached_sha256(res.path) if res.path.is_file() else None
        if digest is None:
            raise FileNotFoundError(f"weights {res.label!r}: registered file {res.path} is missing")
        if digest != res.entry.sha256:
            raise WeightsMismatchError(
                f"weights {res.label!r}: file {res.path} has sha256 {digest}, the registry expects "
                f"{res.entry.sha256} (file changed or corrupted; re-register it or restore the file)")
    obj = _load_file(res.path, device)
    meta = obj.get("meta", {})
    got_method = meta.get("method")
    if method is not None and got_method != method:
        raise WeightsMismatchError(f"weights {res.label!r} were trained for {got_method}, this chain asks {method}")
    if res.entry is not None and _plain(res.entry.arch) != _plain(meta.get("arch", {})):
        raise WeightsMismatchError(f"weights {res.label!r}: registry says {_fmt_arch(res.entry.arch)}, the file "
                                   f"says {_fmt_arch(meta.get('arch', {}))}")
    if arch is not None:
        have = meta.get("arch", {})
        diffs = [(k, have.get(k, "<missing>"), v) for k, v in _plain(dict(arch)).items() if have.get(k, "<missing>") != v]
        if diffs:
            trained = ", ".join(f"{k}={h}" for k, h, _ in diffs)
            asked = ", ".join(f"{k}={v}" for k, _, v in diffs)
            raise WeightsMismatchError(f"weights {res.label!r} were trained for {got_method} with {trained}, "
                                       f"this chain asks {asked}")
    return obj["state_dict"]


def load_trained_network(method: Any, device: torch.device | str) -> torch.nn.Module:
    """``method``'s network (``build_network()``) with its configured weights on ``device``, in eval
    mode: ``params.weights`` is a registry name or path; ``""``/``default`` = the registered weights of
    ``method.name`` whose architecture equals ``method.arch()``. Verified by hash and architecture."""
    arch = method.arch()
    ref = method.params.weights
    if ref in ("", "default"):
        ref = default_weights_name(method.name, arch)
    state = load_weights(ref, device, method=method.name, arch=arch)
    net = method.build_network().to(device)
    net.load_state_dict(state)
    net.eval()
    return net

