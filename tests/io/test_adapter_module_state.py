"""`AdapterModule.load_state_dict` checks the whole `state_dict` before it writes anything: a refused load, or one
interrupted while writing, leaves the adapter exactly as it was (the same tensors, the same values)."""

from __future__ import annotations

import pytest
import torch
from components import perturbed, tiny_qwen3

import lora_func as lf


def build():
    model = tiny_qwen3(num_hidden_layers=1)
    params = lf.init(model, lf.DoRAConfig(r=4), seed=0)  # DoRA: trainable leaves and a magnitude per target
    module = lf.AdapterModule(model, params)
    trained = lf.AdapterModule(model, perturbed(params))
    return module, trained.state_dict()


def held(module):
    """The module's leaves: each tensor object and a copy of its value."""
    return {key: (tensor, tensor.detach().clone()) for key, tensor in module.state_dict(keep_vars=True).items()}


def assert_as_before(module, before):
    now = module.state_dict(keep_vars=True)
    assert now.keys() == before.keys()
    for key, (tensor, value) in before.items():
        assert now[key] is tensor, f"{key} was replaced"
        assert torch.equal(now[key].detach(), value), f"{key} was overwritten"


@pytest.mark.parametrize("strict", [True, False])
def test_a_misshaped_tensor_is_refused_before_any_leaf_is_written(strict):
    module, state = build()
    before = held(module)
    last = list(state)[-1]  # loaded last: every other leaf would be written first
    bad = {**state, last: torch.zeros(state[last].shape[0] + 1, *state[last].shape[1:])}
    with pytest.raises(ValueError, match=rf"key '{last}' has shape \({state[last].shape[0] + 1},.*nothing was loaded"):
        module.load_state_dict(bad, strict=strict)
    assert_as_before(module, before)


def test_a_value_that_is_not_a_tensor_is_refused_by_key():
    module, state = build()
    before = held(module)
    last = list(state)[-1]
    with pytest.raises(ValueError, match=rf"key '{last}' holds a list, not a tensor"):
        module.load_state_dict({**state, last: state[last].tolist()})
    assert_as_before(module, before)


class _Interrupting(torch.Tensor):
    """A tensor whose copy into a leaf raises KeyboardInterrupt, as Ctrl-C in the middle of a load."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_:
            raise KeyboardInterrupt
        return super().__torch_function__(func, types, args, kwargs or {})


def test_an_interrupted_load_puts_every_leaf_back():
    module, state = build()
    before = held(module)
    last = list(state)[-1]  # written last: every other leaf has its new value by then
    state[last] = state[last].as_subclass(_Interrupting)
    with pytest.raises(KeyboardInterrupt):
        module.load_state_dict(state)
    assert_as_before(module, before)


def test_a_whole_state_loads_bitwise_into_the_same_tensors():
    module, state = build()
    before = held(module)
    module.load_state_dict(state, strict=False)  # what Trainer calls when it resumes
    now = module.state_dict(keep_vars=True)
    for key, (tensor, _) in before.items():
        assert now[key] is tensor
        assert torch.equal(tensor.detach(), state[key])
    assert any(not torch.equal(value, state[key]) for key, (_, value) in before.items())
