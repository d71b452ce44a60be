"""Linear operators as torch modules: ``forward``, ``adjoint`` (``.H``) and ``normal`` (``.N``).

Every encoding operator in ``recon_core`` subclasses :class:`LinearOperator`. Subclasses implement
``forward`` and ``adjoint``; ``normal`` defaults to ``adjoint(forward(x))`` and may be overridden by
something faster (e.g. a Toeplitz embedding). ``A @ B`` composes, ``A.H`` is the adjoint operator,
``A.N`` the normal operator ``AᴴA``. Operators are differentiable (plain torch ops or custom
autograd functions whose backward is the adjoint) and batch-friendly. Constants are registered as
buffers, so ``op.to(device)`` moves everything.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

Tensor = torch.Tensor


class LinearOperator(nn.Module):
    """Base class: a linear map from a domain of shape ``ishape`` to a range of shape ``oshape``.

    ``ishape``/``oshape`` describe one item; leading batch axes beyond them are allowed where a
    subclass says so. They are used by tests (random inputs of the right shape) and by solvers.
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

    @property
    def H(self) -> "LinearOperator":
        """The adjoint operator."""
        return AdjointOperator(self)

    @property
    def N(self) -> "LinearOperator":
        """The normal operator ``AᴴA``."""
        return NormalOperator(self)

    def __matmul__(self, other: "LinearOperator") -> "LinearOperator":
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return ComposedOperator(self, other)

    def extra_repr(self) -> str:
        return f"ishape={tuple(self.ishape)}, oshape={tuple(self.oshape)}"


class AdjointOperator(LinearOperator):
    """``Aᴴ`` as an operator of its own (its adjoint is ``A`` again)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__()
        self.op = op
        self.ishape, self.oshape = op.oshape, op.ishape

    def forward(self, x: Tensor) -> Tensor:
        return self.op.adjoint(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.op.forward(y)

    @property
    def H(self) -> LinearOperator:
        return self.op


class NormalOperator(LinearOperator):
    """``AᴴA``, self-adjoint; uses the wrapped operator's ``normal`` (e.g. Toeplitz)."""

    def __init__(self, op: LinearOperator) -> None:
        super().__init__()
        self.op = op
        self.ishape = self.oshape = op.ishape

    def forward(self, x: Tensor) -> Tensor:
        return self.op.normal(x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self.op.normal(y)


class ComposedOperator(LinearOperator):
    """``A @ B``: apply ``B`` then ``A``."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator) -> None:
        super().__init__()
        self.outer, self.inner = outer, inner
        self.ishape, self.oshape = inner.ishape, outer.oshape

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(self.inner(x))

    def adjoint(self, y: Tensor) -> Tensor:
        return self.inner.adjoint(self.outer.adjoint(y))


class Identity(LinearOperator):
    """The identity on tensors of shape ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.ishape = self.oshape = tuple(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y


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
