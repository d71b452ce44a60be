"""Linear operators as torch modules: ``forward``, ``adjoint`` (``.H``) and ``normal`` (``.N``).

Every encoding operator in ``recon_core`` subclasses :class:`LinearOperator`. Subclasses implement
``forward`` and ``adjoint``; ``normal`` defaults to ``adjoint(forward(x))`` and may be overridden by
something faster (e.g. a Toeplitz embedding). Operators form an algebra:

* ``A @ B`` composes (apply ``B`` then ``A``; shapes are checked when both are known),
* ``A + B`` / ``A - B`` add (same shapes), ``a * A`` / ``A * a`` / ``A / a`` scale by a Python or
  complex scalar (the adjoint uses ``conj(a)``), ``-A`` negates,
* ``A.H`` is the adjoint operator, ``A.N`` the normal operator ``AᴴA``.

Normal operators of these combinations reuse their parts' fast normals where the algebra allows
(``(A @ B).N = Bᴴ (A.N) B``, ``(a·A).N = |a|² A.N``), so a composed SENSE operator keeps the
cheap ``mask²`` or Toeplitz normal of its sampling part. Operators whose axis 0 is a frame axis
implement :meth:`LinearOperator.select_frames` (per-frame fitting without rebuilding operators);
compositions, sums and scaled operators delegate it to their parts.

Operators are differentiable (plain torch ops or custom autograd functions whose backward is the
adjoint) and batch-friendly (extra leading axes). Constants are registered as buffers, so
``op.to(device)`` moves everything.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = [
    "LinearOperator",
    "AdjointOperator",
    "NormalOperator",
    "ComposedOperator",
    "SumOperator",
    "ScaledOperator",
    "Identity",
    "Multiply",
]

Scalar = int | float | complex


def _is_scalar(a: object) -> bool:
    return isinstance(a, numbers.Number) and not isinstance(a, bool)


def _shape_known(shape: tuple[int, ...]) -> bool:
    return len(shape) > 0


def _select_parts(owner: "LinearOperator", parts: Sequence["LinearOperator"],
                  idx: "Tensor | Sequence[int]") -> list["LinearOperator"]:
    """``select_frames(idx)`` of each part; a part without frames names itself and ``owner``."""
    out = []
    for part in parts:
        try:
            out.append(part.select_frames(idx))
        except NotImplementedError as exc:
            raise NotImplementedError(f"{type(owner).__name__}.select_frames: {exc}") from exc
    return out


class LinearOperator(nn.Module):
    """Base class: a linear map from a domain of shape ``ishape`` to a range of shape ``oshape``.

    ``ishape``/``oshape`` describe one item (``()`` means "not fixed"); leading batch axes beyond
    them are allowed where a subclass says so. They are used by tests (random inputs of the right
    shape), by solvers and by the shape checks of ``@`` and ``+``.
    """

    ishape: tuple[int, ...] = ()
    oshape: tuple[int, ...] = ()

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normal(self, x: Tensor) -> Tensor:
        """``AᴴA x``; subclasses may override with a faster equivalent."""
        return self.adjoint(self.forward(x))

    def select_frames(self, idx: Tensor | Sequence[int]) -> "LinearOperator":
        """The operator restricted to frames ``idx`` (axis 0 of ``ishape``), e.g. for per-frame fitting.

        Frame-indexed operators (SENSE, NUFFT, coil maps, sampling, …) override this; the result
        acts on ``[len(idx), …]`` and equals the full operator on those frames.

        Raises
        ------
        NotImplementedError
            This operator has no frame axis.
        """
        raise NotImplementedError(f"{type(self).__name__} has no frame axis: select_frames is not "
                                  f"available for it")

    @property
    def H(self) -> "LinearOperator":
        """The adjoint operator."""
        return AdjointOperator(self)

    @property
    def N(self) -> "LinearOperator":
        """The normal operator ``AᴴA``."""
        return NormalOperator(self)

    # -- algebra ------------------------------------------------------------------------------
    def __matmul__(self, other: object) -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return ComposedOperator(self, other)

    def __add__(self, other: object) -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: object) -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(-1.0, other))

    def __mul__(self, other: object) -> "LinearOperator":
        if not _is_scalar(other):
            return NotImplemented
        return ScaledOperator(other, self)  # type: ignore[arg-type]

    def __rmul__(self, other: object) -> "LinearOperator":
        return self.__mul__(other)

    def __truediv__(self, other: object) -> "LinearOperator":
        if not _is_scalar(other):
            return NotImplemented
        return ScaledOperator(1.0 / other, self)  # type: ignore[operator]

    def __neg__(self) -> "LinearOperator":
        return ScaledOperator(-1.0, self)

    # nn.Module defines __call__ and hashing; keep identity semantics (no __eq__ override).

    def extra_repr(self) -> str:
        return f"ishape={tuple(self.ishape)}, oshape={tuple(self.oshape)}"


class AdjointOperator(LinearOperator):
    """``Aᴴ`` as an operator of its own (its adjoint is ``A`` again); its normal is ``A Aᴴ``."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__()
        self.op = op
        self.ishape, self.oshape = tuple(op.oshape), tuple(op.ishape)

    def forward(self, x: Tensor) -> Tensor:
        return self.op.adjoint(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.op.forward(y)

    def select_frames(self, idx: Tensor | Sequence[int]) -> LinearOperator:
        return AdjointOperator(*_select_parts(self, [self.op], idx))

    @property
    def H(self) -> LinearOperator:
        return self.op


class NormalOperator(LinearOperator):
    """``AᴴA``, self-adjoint; uses the wrapped operator's ``normal`` (e.g. Toeplitz)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__()
        self.op = op
        self.ishape = self.oshape = tuple(op.ishape)

    def forward(self, x: Tensor) -> Tensor:
        return self.op.normal(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.op.normal(y)

    def select_frames(self, idx: Tensor | Sequence[int]) -> LinearOperator:
        return NormalOperator(*_select_parts(self, [self.op], idx))

    @property
    def H(self) -> LinearOperator:
        return self


class ComposedOperator(LinearOperator):
    """``A @ B``: apply ``B`` (inner) then ``A`` (outer); normal ``Bᴴ (A.N) B``.

    Raises
    ------
    ValueError
        ``inner.oshape`` and ``outer.ishape`` are both known and differ.
    """

    def __init__(self, outer: LinearOperator, inner: LinearOperator) -> None:
        super().__init__()
        o_in, i_out = tuple(outer.ishape), tuple(inner.oshape)
        if _shape_known(o_in) and _shape_known(i_out) and o_in != i_out:
            raise ValueError(f"cannot compose {type(outer).__name__} (ishape {o_in}) @ "
                             f"{type(inner).__name__} (oshape {i_out}): shapes differ")
        self.outer, self.inner = outer, inner
        self.ishape, self.oshape = tuple(inner.ishape), tuple(outer.oshape)

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(self.inner(x))

    def adjoint(self, y: Tensor) -> Tensor:
        return self.inner.adjoint(self.outer.adjoint(y))

    def normal(self, x: Tensor) -> Tensor:
        """``Bᴴ (AᴴA) B x`` with the outer operator's own (possibly fast) normal."""
        return self.inner.adjoint(self.outer.normal(self.inner(x)))

    def select_frames(self, idx: Tensor | Sequence[int]) -> LinearOperator:
        return ComposedOperator(*_select_parts(self, [self.outer, self.inner], idx))


class SumOperator(LinearOperator):
    """``A + B + …``: the sum of operators with equal shapes (adjoint: the sum of adjoints).

    Nested sums are flattened. The normal operator is ``adjoint(forward(x))`` (cross terms do not
    simplify in general).

    Raises
    ------
    ValueError
        Two terms have known, different ``ishape`` or ``oshape``.
    """

    def __init__(self, *ops: LinearOperator) -> None:
        super().__init__()
        flat: list[LinearOperator] = []
        for op in ops:
            if not isinstance(op, LinearOperator):
                raise TypeError(f"SumOperator terms must be LinearOperators, got {type(op).__name__}")
            flat.extend(op.ops if isinstance(op, SumOperator) else [op])
        if not flat:
            raise ValueError("SumOperator needs at least one term")
        ishape: tuple[int, ...] = ()
        oshape: tuple[int, ...] = ()
        for op in flat:
            pairs = (("ishape", ishape, tuple(op.ishape)), ("oshape", oshape, tuple(op.oshape)))
            for name, mine, theirs in pairs:
                if _shape_known(mine) and _shape_known(theirs) and mine != theirs:
                    raise ValueError(f"cannot add operators with {name} {mine} and {theirs} "
                                     f"({type(op).__name__})")
            ishape = ishape or tuple(op.ishape)
            oshape = oshape or tuple(op.oshape)
        self.ops = nn.ModuleList(flat)
        self.ishape, self.oshape = ishape, oshape

    def forward(self, x: Tensor) -> Tensor:
        out = self.ops[0](x)
        for op in self.ops[1:]:
            out = out + op(x)
        return out

    def adjoint(self, y: Tensor) -> Tensor:
        out = self.ops[0].adjoint(y)
        for op in self.ops[1:]:
            out = out + op.adjoint(y)
        return out

    def select_frames(self, idx: Tensor | Sequence[int]) -> LinearOperator:
        return SumOperator(*_select_parts(self, list(self.ops), idx))


class ScaledOperator(LinearOperator):
    """``a · A`` for a Python/complex scalar ``a``: adjoint ``conj(a) Aᴴ``, normal ``|a|² AᴴA``.

    Complex64 data stay complex64 (Python scalars do not promote torch dtypes).
    """

    def __init__(self, scale: Scalar, op: LinearOperator) -> None:
        super().__init__()
        if not _is_scalar(scale):
            raise TypeError(f"scale must be a Python int, float or complex, got {type(scale).__name__}")
        if not isinstance(op, LinearOperator):
            raise TypeError(f"op must be a LinearOperator, got {type(op).__name__}")
        if isinstance(op, ScaledOperator):  # fold a·(b·A) into (ab)·A
            scale, op = scale * op.scale, op.op
        c = complex(scale)
        self.scale: Scalar = c.real if c.imag == 0 else c
        self.op = op
        self.ishape, self.oshape = tuple(op.ishape), tuple(op.oshape)

    def _conj_scale(self) -> Scalar:
        return self.scale.conjugate() if isinstance(self.scale, complex) else self.scale

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) * self.scale

    def adjoint(self, y: Tensor) -> Tensor:
        return self.op.adjoint(y) * self._conj_scale()

    def normal(self, x: Tensor) -> Tensor:
        return self.op.normal(x) * (abs(self.scale) ** 2)

    def select_frames(self, idx: Tensor | Sequence[int]) -> LinearOperator:
        return ScaledOperator(self.scale, *_select_parts(self, [self.op], idx))

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}, " + super().extra_repr()


class Identity(LinearOperator):
    """The identity on tensors of shape ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.ishape = self.oshape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y

    def normal(self, x: Tensor) -> Tensor:
        return x


class Multiply(LinearOperator):
    """Element-wise multiplication by a fixed (broadcastable) tensor; adjoint multiplies by its conjugate."""

    def __init__(self, weights: Tensor, shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.register_buffer("weights", weights)
        self.ishape = self.oshape = tuple(shape) if shape is not None else tuple(weights.shape)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights

    def adjoint(self, y: Tensor) -> Tensor:
        return y * self.weights.conj()

    def normal(self, x: Tensor) -> Tensor:
        w = self.weights
        return x * (w.real * w.real + w.imag * w.imag if w.is_complex() else w * w)
