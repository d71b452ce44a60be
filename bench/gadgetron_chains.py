"""Load every chain file Gadgetron ships and print a table: loaded (our gadgets) / refused (reason).

Usage::

    python -m bench.gadgetron_chains [--repo GIT_DIR | --dir FOLDER] [--build] [--json OUT.json]

``--repo`` reads ``*/config/*.xml`` from a bare Gadgetron mirror (``fetch github:gadgetron/gadgetron``:
``/work/.mirror/gadgetron+gadgetron/repo`` by default) with ``git show``; ``--dir`` reads a folder of
XML files (e.g. ``tests/data/gadgetron_chains``). ``--build`` also instantiates each loaded chain's
gadgets (parameters checked by each gadget). No file may crash the loader: anything other than a
ChainError is reported as ``CRASH`` and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from gadgets.base import ChainError
from gadgets.stream.chain import build_chain, chain_context, parse_chain_text

DEFAULT_REPO = Path("/work/.mirror/gadgetron+gadgetron/repo")


def repo_chain_files(git_dir: Path) -> Iterator[tuple[str, str]]:
    """(path, text) of every ``config/*.xml`` at the mirror's HEAD."""
    names = subprocess.run(["git", f"--git-dir={git_dir}", "ls-tree", "-r", "--name-only", "HEAD"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in sorted(n for n in names if "/config/" in n and n.endswith(".xml")):
        text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"HEAD:{name}"], check=True,
                              capture_output=True).stdout.decode("utf-8", "replace")
        yield name, text


def dir_chain_files(folder: Path) -> Iterator[tuple[str, str]]:
    for p in sorted(folder.rglob("*.xml")):
        yield str(p.relative_to(folder)), p.read_text(encoding="utf-8", errors="replace")


def classify(name: str, text: str, build: bool = False) -> dict[str, str]:
    """``{"file", "status": loaded|refused|CRASH, "detail"}`` for one chain file."""
    try:
        spec = parse_chain_text(text, Path(name).name)
        if build:
            build_chain(spec, chain_context(spec, "cpu"))
        return {"file": name, "status": "loaded", "detail": " -> ".join(spec.gadget_names)}
    except ChainError as exc:
        return {"file": name, "status": "refused", "detail": str(exc).split("\n")[0]}
    except Exception as exc:  # noqa: BLE001 - the point is to report any crash
        return {"file": name, "status": "CRASH", "detail": f"{type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", type=Path, default=None, help="bare Gadgetron git mirror")
    ap.add_argument("--dir", type=Path, default=None, help="folder of chain XML files instead")
    ap.add_argument("--build", action="store_true", help="also build each loaded chain's gadgets")
    ap.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.dir is not None:
        files = list(dir_chain_files(args.dir))
    else:
        repo = args.repo or DEFAULT_REPO
        if not repo.exists():
            print(f"no Gadgetron mirror at {repo} (fetch github:gadgetron/gadgetron, or use --dir)", file=sys.stderr)
            return 2
        files = list(repo_chain_files(repo))
    rows = [classify(n, t, args.build) for n, t in files]
    width = max((len(r["file"]) for r in rows), default=10)
    for r in rows:
        print(f"{r['file']:<{width}}  {r['status']:<7}  {r['detail'][:160]}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("loaded", "refused", "CRASH")}
    print(f"\n{len(rows)} files: {counts['loaded']} loaded, {counts['refused']} refused, {counts['CRASH']} crashed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))
    return 1 if counts["CRASH"] else 0


if __name__ == "__main__":
    sys.exit(main())
