"""``torchgadgets`` command line: run | chains | demo | phantom | client | serve | health | external | select | bench | train.

Nothing imports this module; each sub-command imports what it needs lazily so that ``--help`` is
fast and an optional component missing on a machine only affects its own command. An error that no
command reports itself is printed as one line ``torchgadgets CMD: Type: message`` (exit status 1); the
traceback only with ``--debug``.
"""

from __future__ import annotations

import os

# finufft and torch bring their own OpenMP runtimes; with the default (active) wait policy the idle
# threads of one spin after each call and slow the other down ~100x on small machines. Must be set
# before either library is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


# --------------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from gadgets.base import ChainError, GadgetError
    from gadgets.ismrmrd_io import IsmrmrdFileError
    from gadgets.offline import OfflineRunError, run_offline
    from gadgets.progress import TerminalProgress

    if getattr(args, "ray", None):
        return cmd_run_ray(args)
    progress = None if args.quiet else TerminalProgress()
    try:
        res = run_offline(args.chain, args.input, args.output, args.out_group, in_group=args.in_group,
                          device=args.device, chains_dir=args.chains_dir, progress=progress,
                          storage_dir=args.noise_dir)
    except (ChainError, IsmrmrdFileError, FileNotFoundError, GadgetError) as exc:
        print(f"torchgadgets run: {exc}", file=sys.stderr)
        return 2
    except OfflineRunError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    finally:
        if progress is not None:
            progress.close()
    where = f" → {res.output_path} group '{res.out_group}'" if res.output_path else ""
    print(f"{len(res.images)} image(s) from chain '{res.chain.name}' on {res.device} in {res.wall_s:.2f} s{where}")
    return 0


def _batch_inputs(pattern: str) -> list[Path]:
    """A folder (its ``*.h5``), a glob, or one file → sorted input files."""
    import glob

    p = Path(pattern)
    if p.is_dir():
        return sorted(q for q in p.glob("*.h5") if q.is_file())
    if p.is_file():
        return [p]
    return sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())


def cmd_run_ray(args: argparse.Namespace) -> int:
    """``run CHAIN DIR_OR_GLOB --ray ADDRESS -o OUTDIR``: many files in parallel on Ray, resumable."""
    from gadgets.base import ChainError
    from gadgets.stream.ray_backend import RayBackend, print_progress, run_batch

    inputs = _batch_inputs(args.input)
    if not inputs:
        print(f"torchgadgets run: no input files match {args.input!r}", file=sys.stderr)
        return 2
    given = getattr(args, "argv", [])
    if args.output == "out.h5" and "-o" not in given and "--output" not in given:
        print("torchgadgets run: --ray needs -o OUTDIR (the folder the outputs go to)", file=sys.stderr)
        return 2
    outdir = Path(args.output)
    backend = RayBackend(args.ray, num_cpus=args.ray_task_cpus, local_cpus=args.ray_cpus)
    progress = None if args.quiet else (lambda rep, total: print_progress(rep, total))
    try:
        rep = run_batch(args.chain, inputs, outdir, backend, out_group=args.out_group or "dataset_recon",
                        in_group=args.in_group, device=args.device, chains_dir=args.chains_dir, progress=progress)
    except (ChainError, ValueError, FileNotFoundError) as exc:
        print(f"torchgadgets run: {exc}", file=sys.stderr)
        return 2
    for name, errors in sorted(rep.failed.items()):
        for line in errors:
            print(f"{name}: {line}", file=sys.stderr)
    print(f"{len(rep.done)} reconstructed, {len(rep.skipped)} skipped (already done), {len(rep.failed)} failed "
          f"in {rep.wall_s:.1f} s → {outdir}")
    return 1 if rep.failed else 0


# ------------------------------------------------------------------------------------------ chains
def cmd_chains(args: argparse.Namespace) -> int:
    from gadgets.stream.chain import list_chains

    rows = list_chains(args.chains_dir)
    width = max((len(n) for n, _ in rows), default=10)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    return 0


# ------------------------------------------------------------------------------------------ phantom
def cmd_phantom(args: argparse.Namespace) -> int:
    from gadgets.ismrmrd_io import scan_to_ismrmrd, write_ismrmrd
    from recon_core.phantoms import simulate_scan

    kw = dict(matrix=args.matrix, n_frames=args.frames, n_coils=args.coils, seed=args.seed,
              noise_std=args.noise, readout_oversampling=args.readout_oversampling)
    if args.kind == "cartesian":
        kw.update(accel=args.accel, acs_lines=args.acs, mask_kind=args.mask)
    elif args.kind == "radial":
        kw.update(spokes_per_frame=args.spokes)
    else:
        kw.update(interleaves=args.interleaves, interleaves_per_frame=args.interleaves_per_frame)
    scan = simulate_scan(args.kind, **kw)
    header, acqs = scan_to_ismrmrd(scan, protocol_name=args.protocol_name or f"torchgadgets_{args.kind}")
    write_ismrmrd(args.output, header, acqs, ground_truth=scan.ground_truth, coil_maps=scan.coil_maps,
                  overwrite=args.overwrite)
    print(f"wrote {args.output}: {args.kind}, {scan.n_frames} frame(s), {args.coils} coils, {args.matrix}², "
          f"{len(acqs)} acquisitions (noise scan included); ground truth in /dataset/torchgadgets")
    return 0


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from gadgets.demo import run_demo

    return run_demo(out_dir=Path(args.out), device=args.device, matrix=args.matrix, frames=args.frames,
                    coils=args.coils, quiet=args.quiet)


# ------------------------------------------------------------------------------------------- client
def cmd_client(args: argparse.Namespace) -> int:
    from gadgets.stream.client import main_from_args

    return int(main_from_args(args))


# -------------------------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from gadgets.stream.protocol import ProtocolLimits
    from gadgets.stream.server import ReconServer, install_signal_handlers, parse_size

    off = lambda v: v if v and v > 0 else None  # noqa: E731 - 0 = no limit
    limits = ProtocolLimits(max_text_bytes=parse_size(args.max_text_bytes),
                            max_image_bytes=parse_size(args.max_image_bytes),
                            max_acquisition_values=args.max_acquisition_values)
    srv = ReconServer(host=args.host, port=args.port, chains_dir=args.chains_dir, device=args.device,
                      max_sessions=args.max_sessions, queue_limit=args.queue_limit, save_raw_dir=args.save_raw,
                      noise_store_dir=args.noise_store, read_timeout_s=off(args.read_timeout),
                      torch_threads=args.torch_threads, selection_file=args.selection, limits=limits,
                      handshake_timeout_s=off(args.handshake_timeout), session_timeout_s=off(args.session_timeout),
                      chain_timeout_s=off(args.chain_timeout), max_pending=args.max_pending,
                      max_pending_per_peer=args.max_pending_per_peer, max_matrix=args.max_matrix,
                      max_channels=args.max_channels, max_session_bytes=parse_size(args.max_session_memory),
                      queue_bytes=parse_size(args.queue_bytes), inline_chains=args.inline_chains,
                      isolation=args.isolation, shutdown_grace_s=args.shutdown_grace,
                      access_log=not args.no_access_log, ray_address=args.ray,
                      ray_options=({"num_cpus": args.ray_task_cpus, "local_cpus": args.ray_cpus}
                                   if args.ray else None))
    restore = install_signal_handlers(srv)
    try:
        print(f"torchgadgets server listening on {args.host}:{srv.port if srv.port else args.port} "
              f"(device {args.device}, {args.max_sessions} concurrent session(s)"
              f"{', reconstructions on Ray ' + args.ray if args.ray else ''}); Ctrl-C or SIGTERM to stop",
              file=sys.stderr, flush=True)
        srv.serve_forever()
    finally:
        restore()
    return 0


# ------------------------------------------------------------------------------------------- health
def cmd_health(args: argparse.Namespace) -> int:
    """Connect, send QUERY (6), expect the RESPONSE (7) with our correlation id, then CLOSE (4)."""
    import socket

    from gadgets.stream.protocol import (Close, MessageReader, MessageWriter, ProtocolError, Query, Response,
                                         socket_read_exact, socket_write_all)

    correlation = 4242
    try:
        with socket.create_connection((args.address, args.port), timeout=args.timeout) as sock:
            sock.settimeout(args.timeout)
            writer = MessageWriter(socket_write_all(sock))
            writer.write_message(Query(correlation, args.query))
            writer.write_message(Close())
            answer = None
            for msg in MessageReader(socket_read_exact(sock)):
                if isinstance(msg, Response):
                    answer = msg
                elif isinstance(msg, Close):
                    break
    except (OSError, ProtocolError) as exc:
        print(f"torchgadgets health: {args.address}:{args.port}: {exc}", file=sys.stderr)
        return 1
    if answer is None:
        print(f"torchgadgets health: {args.address}:{args.port}: no RESPONSE to the QUERY before CLOSE",
              file=sys.stderr)
        return 1
    if answer.correlation_id != correlation or answer.text.strip() in ("", "Unknown query"):
        print(f"torchgadgets health: {args.address}:{args.port}: bad RESPONSE (correlation id "
              f"{answer.correlation_id}, text {answer.text!r})", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{args.address}:{args.port} OK: {args.query} = {answer.text}")
    return 0


# ----------------------------------------------------------------------------------------- external
def cmd_external(args: argparse.Namespace) -> int:
    """``<connect>`` mode: serve the Gadgetron core(s) that connect to this port."""
    try:
        from gadgets.external import TARGETS, serve_connect
    except ImportError as exc:
        print(f"torchgadgets external: needs the 'gadgetron' package "
              f"(pip install \"torchgadgets[gadgetron]\"): {exc}", file=sys.stderr)
        return 2
    if args.target not in TARGETS:
        print(f"torchgadgets external: unknown target {args.target!r}; choose from {sorted(TARGETS)}",
              file=sys.stderr)
        return 2

    def ready(port: int) -> None:
        print(f"torchgadgets external: waiting for a Gadgetron core on {args.host}:{port} "
              f"(target {args.target})", file=sys.stderr, flush=True)

    return serve_connect(args.port, host=args.host, target=args.target, once=not args.forever, ready=ready)


# ------------------------------------------------------------------------------------------- select
def cmd_select(args: argparse.Namespace) -> int:
    from gadgets.ismrmrd_io import IsmrmrdFileError
    from gadgets.stream.selection import select_for_file

    try:
        print(select_for_file(args.input, group=args.in_group, rules=args.selection, chains_dir=args.chains_dir))
    except (IsmrmrdFileError, FileNotFoundError, ValueError) as exc:
        print(f"torchgadgets select: {exc}", file=sys.stderr)
        return 2
    return 0


# -------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    bench_dir = REPO_ROOT / "bench"
    script = bench_dir / f"{args.which}.py"
    if not script.is_file():
        print(f"torchgadgets bench: {script} not found (benchmarks run from a source checkout)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    sys.argv = [f"bench.{args.which}"] + list(args.bench_args)
    runpy.run_module(f"bench.{args.which}", run_name="__main__")
    return 0


# -------------------------------------------------------------------------------------------- train
def _parse_value(text: str) -> object:
    """A ``--param`` value: int, float, bool (true/false) or string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from gadgets.progress import TerminalProgress
    from recon_core.methods import get_method
    from recon_core.training.data import SamplingSpec, split_datasets
    from recon_core.training.loop import TrainConfig, checkpoint_path, train
    from recon_core.training.weights import WeightsError, register_weights

    try:
        method_cls = get_method(args.method)
    except KeyError as exc:
        print(f"torchgadgets train: {exc.args[0]}", file=sys.stderr)
        return 2
    params: dict[str, object] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"torchgadgets train: --param needs KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        params[key.strip()] = _parse_value(value.strip())
    params.setdefault("preset", "fast")
    try:
        method = method_cls(**params)
    except (KeyError, TypeError, ValueError) as exc:
        print(f"torchgadgets train: {exc}", file=sys.stderr)
        return 2
    if not hasattr(method, "build_network"):
        print(f"torchgadgets train: method {args.method!r} has no trainable network", file=sys.stderr)
        return 2
    sampling = SamplingSpec(kinds=tuple(args.kinds), masks=tuple(args.masks), accel=tuple(args.accel),
                            accel_choices=tuple(args.accel_set or ()),
                            acs_lines=tuple(args.acs), spokes=tuple(args.spokes),
                            interleaves_per_frame=tuple(args.interleaves_per_frame))
    try:
        train_set, val_set, what = split_datasets(
            args.data, args.n_train, args.n_val, args.seed, sampling, matrix=tuple(args.matrix),
            frames=tuple(args.frames), coils=tuple(args.coils), noise=tuple(args.noise))
    except (FileNotFoundError, ValueError) as exc:
        print(f"torchgadgets train: {exc}", file=sys.stderr)
        return 2
    command = "torchgadgets " + " ".join(shlex.quote(a) for a in args.argv)
    trained_on = f"{what}. Command: {command}"
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay,
                      val_every=args.val_every, seed=args.seed)
    bar = None if args.quiet else TerminalProgress()
    try:
        res = train(method, train_set, val_set, args.out, cfg, trained_on=trained_on, resume=args.resume,
                    device=args.device, progress=None if bar is None else (lambda ev: bar("train", ev)))
    except (ValueError, FileNotFoundError) as exc:
        print(f"torchgadgets train: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(f"{args.method} ({method.preset} preset): best validation PSNR {res.best_val_psnr:.2f} dB at step "
          f"{res.best_step} (zero-filled {res.zero_filled_val_psnr:.2f} dB), {res.steps_done} steps in "
          f"{res.wall_s:.1f} s → {res.out} (checkpoint {checkpoint_path(res.out)})")
    if args.register:
        try:
            entry = register_weights(args.register, res.out, registry_dir=args.registry, overwrite=args.overwrite)
        except (WeightsError, ValueError) as exc:
            print(f"torchgadgets train: {exc}", file=sys.stderr)
            return 2
        print(f"registered as {entry.name!r} (sha256 {entry.sha256[:12]}…)"
              f"{' in ' + str(args.registry) if args.registry else ''}")
    return 0


def _add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("Ray (pip install 'torchgadgets[ray]')")
    g.add_argument("--ray", metavar="ADDRESS", default=None,
                   help=f"local | auto | HOST:PORT of a Ray cluster: {what}")
    g.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a --ray local cluster (default 2)")
    g.add_argument("--ray-task-cpus", type=float, default=1.0, help="CPUs each reconstruction task declares")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchgadgets", description=__doc__.splitlines()[0])
    parser.add_argument("-V", "--verbose", dest="log_level", action="count", default=0,
                        help="log more (-VV for debug)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="reconstruct an ISMRMRD file offline through a chain")
    p.add_argument("chain", help="chain name in gadgets/chains/ (with or without extension) or a path to a chain file")
    p.add_argument("input", help="input ISMRMRD HDF5 file")
    p.add_argument("-o", "--output", default="out.h5", help="output HDF5 file (gadgetron_ismrmrd_client layout)")
    p.add_argument("-G", "--out-group", default=None, help="output group (default: local date-time)")
    p.add_argument("-g", "--in-group", default="dataset", help="input group (default: dataset)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (a chain's own device wins)")
    p.add_argument("--chains-dir", type=Path, default=None, help="folder of chain files (default: the shipped gadgets/chains/)")
    p.add_argument("--noise-dir", type=Path, default=None, help="noise dependency folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    _add_ray_arguments(p, "reconstruct many files (INPUT: a folder or a glob; -o: the output folder) in "
                          "parallel on Ray; finished outputs are skipped")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chains", help="list the chains, one line each")
    p.add_argument("--chains-dir", type=Path, default=None)
    p.set_defaults(func=cmd_chains)

    p = sub.add_parser("phantom", help="write a simulated multi-coil (cine) phantom scan as an ISMRMRD file")
    p.add_argument("output")
    p.add_argument("--kind", choices=["cartesian", "radial", "spiral"], default="cartesian")
    p.add_argument("--matrix", type=int, default=128)
    p.add_argument("--frames", type=int, default=16, help="cardiac frames (1 = static 2D)")
    p.add_argument("--coils", type=int, default=12)
    p.add_argument("--accel", type=float, default=4.0, help="Cartesian acceleration")
    p.add_argument("--acs", type=int, default=24, help="Cartesian ACS lines")
    p.add_argument("--mask", choices=["uniform", "variable_density"], default="uniform")
    p.add_argument("--spokes", type=int, default=13, help="radial spokes per frame")
    p.add_argument("--interleaves", type=int, default=32)
    p.add_argument("--interleaves-per-frame", type=int, default=4)
    p.add_argument("--readout-oversampling", type=int, default=2)
    p.add_argument("--noise", type=float, default=0.01, help="noise std relative to the mean object signal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--protocol-name", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("demo", help="phantom → chains → images, PNG/GIF and PSNR vs ground truth")
    p.add_argument("--out", default="torchgadgets_demo", help="output folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--matrix", type=int, default=96)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("client", help="send an ISMRMRD file to a server (gadgetron_ismrmrd_client options)",
                       conflict_handler="resolve")
    from gadgets.stream.client import add_client_arguments

    add_client_arguments(p)
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("serve", help="serve the Gadgetron/MRD protocol (default 127.0.0.1:9002)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("-p", "--port", type=int, default=9002)
    p.add_argument("--chains-dir", type=Path, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (a chain's own device wins)")
    p.add_argument("--max-sessions", type=int, default=2, help="sessions reconstructing at once; others queue")
    p.add_argument("--queue-limit", type=int, default=16, help="connections allowed to wait for a free slot")
    p.add_argument("--save-raw", type=Path, default=None, help="write every session's raw data here first")
    p.add_argument("--noise-store", type=Path, default=None, help="noise dependency folder")
    p.add_argument("--read-timeout", type=float, default=300.0, help="seconds before a stalled client is dropped")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads (0 = cores / max-sessions)")
    p.add_argument("--selection", type=Path, default=None, help="chain selection rules (default gadgets/chains/selection.yaml)")
    h = p.add_argument_group("limits (hardening; 0 = no limit for the times)")
    h.add_argument("--handshake-timeout", type=float, default=30.0, help="s from connect to the ISMRMRD header")
    h.add_argument("--session-timeout", type=float, default=3600.0, help="s per session, reconstruction included")
    h.add_argument("--chain-timeout", type=float, default=0.0, help="s the chain may run after CLOSE")
    h.add_argument("--max-pending", type=int, default=512, help="connections before their header (oldest dropped)")
    h.add_argument("--max-pending-per-peer", type=int, default=64, help="the same, per client address")
    h.add_argument("--max-matrix", type=int, default=1024, help="largest header matrix size per axis")
    h.add_argument("--max-channels", type=int, default=256, help="most receiver channels")
    h.add_argument("--max-session-memory", default="8G", help="memory per session (estimate and data received)")
    h.add_argument("--queue-bytes", default="256M", help="bytes queued in front of each chain stage")
    h.add_argument("--max-text-bytes", default="16M", help="CONFIG/HEADER/TEXT message size")
    h.add_argument("--max-image-bytes", default="256M", help="pixel bytes of one IMAGE message")
    h.add_argument("--max-acquisition-values", type=int, default=1 << 24, help="samples x channels per acquisition")
    h.add_argument("--inline-chains", choices=["safe", "off"], default="safe",
                   help="chains sent inline: safe = may not name files; off = refused")
    h.add_argument("--isolation", choices=["process", "thread"], default="process", help="a process per session")
    h.add_argument("--shutdown-grace", type=float, default=30.0, help="s running sessions get after SIGTERM")
    h.add_argument("--no-access-log", action="store_true", help="no INFO line per session")
    _add_ray_arguments(p, "run every reconstruction as a Ray task (sessions become threads of the server)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("health", help="health check: QUERY a server, exit 0 when it answers "
                                      "(Docker HEALTHCHECK)")
    p.add_argument("-a", "--address", default="127.0.0.1")
    p.add_argument("-p", "--port", type=int, default=9002)
    p.add_argument("--query", default="torchgadgets::version",
                   help="query key sent (default torchgadgets::version)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds for connect and answer")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("external", help="<connect> mode: serve a Gadgetron core that connects to this port")
    p.add_argument("--port", "-p", type=int, required=True,
                   help="port named in the chain's <connect port=…/> (0: any free port, printed)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind ('::' or 0.0.0.0 for all)")
    p.add_argument("--target", default="recon",
                   help="entry point: recon (any message type), recon_acquisitions, recon_buffers, "
                        "recon_image_arrays")
    p.add_argument("--forever", action="store_true",
                   help="serve one core after another (default: one, then exit)")
    p.set_defaults(func=cmd_external)

    p = sub.add_parser("select", help="print which chain a file would get (selection rules) and why")
    p.add_argument("input")
    p.add_argument("-g", "--in-group", default="dataset")
    p.add_argument("--selection", type=Path, default=None)
    p.add_argument("--chains-dir", type=Path, default=None)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("bench", help="run a benchmark from bench/ (quality | operators | stream)")
    p.add_argument("which", choices=["quality", "operators", "stream"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train a learned method (e.g. dc_cnn) on phantoms or fully sampled ISMRMRD files")
    p.add_argument("method", help="registered method with a trainable network, e.g. dc_cnn")
    p.add_argument("--data", required=True, help="'phantom' (generated) or a folder of fully sampled ISMRMRD *.h5")
    p.add_argument("--out", required=True, type=Path, help="best weights (by validation PSNR); checkpoint in OUT.ckpt")
    p.add_argument("--n-train", type=int, default=64, help="training problems")
    p.add_argument("--n-val", type=int, default=8, help="validation problems (disjoint seeds / slices)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=1, help="problems per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter (architecture), e.g. --param n_filters=16; default preset=fast")
    p.add_argument("--matrix", type=int, nargs="+", default=[32], help="phantom matrix sizes drawn from")
    p.add_argument("--frames", type=int, nargs=2, default=[4, 8], metavar=("LO", "HI"))
    p.add_argument("--coils", type=int, nargs=2, default=[4, 8], metavar=("LO", "HI"))
    p.add_argument("--noise", type=float, nargs=2, default=[0.0, 0.03], metavar=("LO", "HI"),
                   help="noise std relative to the mean object magnitude")
    p.add_argument("--kinds", nargs="+", choices=["cartesian", "radial", "spiral"], default=["cartesian"])
    p.add_argument("--masks", nargs="+", choices=["uniform", "variable_density", "poisson"],
                   default=["uniform", "variable_density"])
    p.add_argument("--accel", type=float, nargs=2, default=[3.0, 8.0], metavar=("LO", "HI"))
    p.add_argument("--accel-set", type=float, nargs="+", default=None, metavar="R",
                   help="draw the acceleration from these values instead of the --accel range (multi-ratio training)")
    p.add_argument("--acs", type=int, nargs=2, default=[4, 10], metavar=("LO", "HI"), help="ACS lines")
    p.add_argument("--spokes", type=int, nargs=2, default=[8, 24], metavar=("LO", "HI"), help="radial spokes/frame")
    p.add_argument("--interleaves-per-frame", type=int, nargs=2, default=[2, 6], metavar=("LO", "HI"),
                   help="spiral interleaves per frame (of 16)")
    p.add_argument("--resume", type=Path, default=None, help="continue from a checkpoint (OUT.ckpt of a run)")
    p.add_argument("--register", default=None, metavar="NAME", help="register the best weights under NAME")
    p.add_argument("--registry", type=Path, default=None,
                   help="registry folder for --register (default: first of $TORCHGADGETS_WEIGHTS, else the package's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing registry entry")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    _setup_logging(args.log_level, getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"torchgadgets {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user; the traceback with --debug
        if args.debug:
            raise
        text = str(exc).strip().splitlines()
        print(f"torchgadgets {args.command}: {type(exc).__name__}: {text[0] if text else '(no message)'}"
              f"{' …' if len(text) > 1 else ''} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
