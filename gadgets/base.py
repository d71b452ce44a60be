"""The gadget interface: typed parameters, chain context, pass-through of foreign messages.

A gadget is a small class: a parameter dataclass (unknown keys are an error naming the key and the
allowed keys), the message types it ``accepts`` (others pass through unchanged), ``process(msg)``
yielding zero or more messages, and ``flush()`` yielding what is left at end of stream. It raises
:class:`GadgetError` with a clear message; the runner reports it to the client as TEXT and closes.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import torch

from recon_core.methods.base import ProgressEvent


#: Longest error message (characters) a GadgetError / ChainError keeps: errors travel to the client
#: as TEXT and into log lines, so a message built from client data (``{value!r}``) stays bounded.
MAX_ERROR_CHARS = 4000


def cap_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    note = f" ... [{len(text) - limit} more characters cut]"
    return text[:max(0, limit - len(note))] + note


class GadgetError(Exception):
    """A gadget could not process its input; the message names the gadget and the problem."""

    def __init__(self, gadget: str, message: str) -> None:
        message = cap_text(message)
        super().__init__(f"[{gadget}] {message}")
        self.gadget = gadget
        self.detail = message


class ChainError(ValueError):
    """A chain file or chain parameter is invalid; the message names file, line, gadget and key.

    The message is capped at :data:`MAX_ERROR_CHARS` (it may quote values from the network)."""

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (cap_text(args[0]),)
        super().__init__(*args)


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, annotation: Any, where: str, key: str) -> Any:
    """Convert ``value`` (often a string from XML) to the annotated type, or raise ChainError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "null", ""}):
            if type(None) in args:
                return None
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, where, key)
            except ChainError as exc:
                errors.append(str(exc))
        raise ChainError(f"{where}: parameter {key!r}: cannot interpret {value!r} as {annotation}")
    if origin is typing.Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value.strip()):
                return a
        raise ChainError(f"{where}: parameter {key!r} must be one of {list(args)}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ChainError(f"{where}: parameter {key!r} must be a boolean (true/false), got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ChainError(f"{where}: parameter {key!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ChainError(f"{where}: parameter {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ChainError(f"{where}: parameter {key!r} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ChainError(f"{where}: parameter {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ChainError(f"{where}: parameter {key!r} must be a string, got {value!r}")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            items = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(items, (list, tuple)):
            raise ChainError(f"{where}: parameter {key!r} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ChainError(f"{where}: parameter {key!r} needs {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, where, key) for v, a in zip(items, args))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, where, key) if inner is not Any else v for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict or annotation is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ChainError(f"{where}: parameter {key!r} must be a mapping, got {value!r}")
    if annotation is Any:
        return value
    return value


@dataclass
class GadgetParams:
    """Base class of gadget parameter dataclasses (all fields need defaults)."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str = "chain") -> "GadgetParams":
        """Build from a mapping of (possibly string) values; unknown keys and bad types raise ChainError."""
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in allowed]
        if unknown:
            raise ChainError(
                f"{where}: unknown parameter(s) {unknown}; allowed: {allowed if allowed else 'none'}"
            )
        kwargs = {k: _coerce(v, hints[k], where, k) for k, v in values.items()}
        try:
            obj = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ChainError(f"{where}: {exc}") from None
        obj.validate(where)
        return obj

    def validate(self, where: str) -> None:
        """Hook for cross-field checks; raise ChainError naming ``where``."""

    @classmethod
    def check_untrusted(cls, values: Mapping[str, Any] | None, where: str) -> None:
        """Hook for chains that arrived over the network: raise ChainError for a parameter that
        would make the server read or write a file the client names (no path from the network)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ProgressSink = Callable[[str, ProgressEvent], None]


@dataclass
class ChainContext:
    """What every gadget in one chain run shares: header, device, logger, progress, storage."""

    header: Any = None                     # ismrmrd.xsd.ismrmrdHeader (parsed) or None
    header_xml: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("torchgadgets"))
    progress: Optional[ProgressSink] = None
    chain_name: str = ""
    storage_dir: Optional[Path] = None     # noise dependencies etc.
    options: dict[str, Any] = field(default_factory=dict)
    stop_requested: Callable[[], bool] = lambda: False

    def report(self, gadget: str, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(gadget, event)


class Gadget:
    """Base class. Subclasses set ``name``, ``Params``, ``accepts`` and implement :meth:`process`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[GadgetParams]] = GadgetParams
    accepts: ClassVar[tuple[type, ...]] = ()

    def __init__(self, params: GadgetParams | None = None, ctx: ChainContext | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.ctx = ctx if ctx is not None else ChainContext()
        self.log = self.ctx.logger.getChild(self.name or type(self).__name__)

    def handle(self, msg: Any) -> Iterator[Any]:
        """Dispatch: accepted messages go to :meth:`process`, everything else passes through."""
        if self.accepts and isinstance(msg, self.accepts):
            yield from self.process(msg)
        else:
            yield msg

    def process(self, msg: Any) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def flush(self) -> Iterator[Any]:
        """End of stream: emit whatever is buffered."""
        return iter(())

    def error(self, message: str) -> GadgetError:
        """A GadgetError naming this gadget (``raise self.error("...")``)."""
        return GadgetError(self.name or type(self).__name__, message)
