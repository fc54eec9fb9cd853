"""LoRA's `LowRank` autograd.Function (hand-written backward) against autograd of the plain composition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_func.kinds.linear import add_low_rank, low_rank

S = 1.7


def reference(y, x, A, B):
    """y + s · (x Aᵀ) Bᵀ with autograd's own backward (y may be None)."""
    delta = F.linear(F.linear(x, A) * S, B)
    return delta if y is None else y + delta


def fused(y, x, A, B):
    return low_rank(x, A, B, S) if y is None else add_low_rank(y, x, A, B, S)


def tensors(with_y: bool, lead=(3, 5)):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    y = randn(*lead, 4) if with_y else None
    return y, randn(*lead, 7), randn(2, 7), randn(4, 2)


@pytest.mark.parametrize("with_y", [False, True])
def test_first_and_second_derivatives(with_y):
    y, x, A, B = tensors(with_y)
    args = tuple(t for t in (y, x, A, B) if t is not None)

    def f(*a):
        return fused(*((None, *a) if not with_y else a))

    torch.testing.assert_close(f(*args), reference(y, x, A, B))
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


# Forward mode's first use loads torch's jvp decompositions through torch.jit.script, which warns (torch 2.13).
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("with_y", [False, True])
def test_torch_func_transforms(with_y):
    y, x, A, B = tensors(with_y)
    for argnum in (1, 2, 3):  # x, A, B

        def f(*a, impl):
            return impl(*a).square().sum()

        args = (y, x, A, B)
        for transform in (torch.func.grad, torch.func.jacrev, torch.func.jacfwd, torch.func.hessian):
            got = transform(lambda *a: f(*a, impl=fused), argnums=argnum)(*args)
            want = transform(lambda *a: f(*a, impl=reference), argnums=argnum)(*args)
            torch.testing.assert_close(got, want, msg=f"{transform.__name__} over argument {argnum}")


def test_vmap_over_stacked_adapters_and_examples():
    y, x, A, B = tensors(True)
    gen = torch.Generator().manual_seed(1)
    As = torch.randn(4, *A.shape, generator=gen, dtype=torch.float64)
    Bs = torch.randn(4, *B.shape, generator=gen, dtype=torch.float64)

    def loss(impl):
        return lambda A, B: impl(y, x, A, B).square().sum()

    got = torch.func.vmap(torch.func.grad(loss(fused), argnums=(0, 1)))(As, Bs)
    want = torch.func.vmap(torch.func.grad(loss(reference), argnums=(0, 1)))(As, Bs)
    torch.testing.assert_close(got, want)

    xs, ys = torch.randn(6, 5, 7, dtype=torch.float64), torch.randn(6, 5, 4, dtype=torch.float64)
    per_example = [
        torch.func.vmap(torch.func.grad(lambda A, x, y, impl=impl: impl(y, x, A, B).sum()), in_dims=(None, 0, 0))(
            A, xs, ys
        )
        for impl in (fused, reference)
    ]
    torch.testing.assert_close(*per_example)


def test_odd_inputs():
    _, _, A, B = tensors(False)
    x1 = torch.randn(7, dtype=torch.float64)  # one vector, no grad
    torch.testing.assert_close(low_rank(x1, A, B, S), reference(None, x1, A, B))
    xt = torch.randn(7, 6, dtype=torch.float64).t()  # non-contiguous
    yt = torch.randn(4, 6, dtype=torch.float64).t()
    torch.testing.assert_close(add_low_rank(yt, xt, A, B, S), reference(yt, xt, A, B))
    grads = [torch.autograd.grad(impl(yt, xt, A, B).sum(), (A, B)) for impl in (fused, reference)]
    torch.testing.assert_close(*grads)
    y16 = torch.randn(6, 4, dtype=torch.bfloat16)  # output dtype differs from x's
    assert add_low_rank(y16, xt, A, B, S).dtype == torch.bfloat16
    with torch.no_grad():  # the plain path (no autograd.Function) computes the same
        torch.testing.assert_close(add_low_rank(yt, xt, A, B, S), reference(yt, xt, A, B))
