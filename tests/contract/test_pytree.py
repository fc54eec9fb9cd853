"""The params pytree under both registries: torch.utils._pytree (torch.func) and optree."""

from __future__ import annotations

import optree
import torch
import torch.utils._pytree as pytree
from conftest import tiny_qwen3

import lora_func as lf
from lora_func._params import SHARED


def adapter():
    model = tiny_qwen3(num_hidden_layers=1)
    return lf.init(model, lf.VeRAConfig(r=4), seed=0)  # per-target leaves and a shared entry


def test_optree_tree_map_keeps_structure_config_and_targets():
    params = adapter()
    doubled = optree.tree_map(lambda t: 2 * t, params)
    assert isinstance(doubled, lf.Params)
    assert doubled.config == params.config and doubled.targets == params.targets
    assert list(doubled) == list(params) and SHARED in doubled
    for path, leaf, t in params.leaves():
        assert torch.equal(doubled[path][leaf], 2 * t)
    leaves, spec = optree.tree_flatten(params)
    assert len(leaves) == sum(1 for _ in params.leaves())
    rebuilt = optree.tree_unflatten(spec, leaves)
    assert all(rebuilt[p][k] is t for p, k, t in params.leaves())


def test_optree_paths_name_module_and_leaf():
    params = adapter()
    paths = optree.tree_paths(params)
    target = params.targets[0].path
    assert (target, "lambda_b") in paths and (target, "lambda_d") in paths and (SHARED, "A") in paths
    assert all(p[0] in params for p in paths)


def test_torch_pytree_round_trip_and_keys():
    params = adapter()
    leaves, spec = pytree.tree_flatten(params)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert rebuilt.config == params.config and all(rebuilt[p][k] is t for p, k, t in params.leaves())
    keyed, _ = pytree.tree_flatten_with_path(params)
    assert len(keyed) == len(leaves)
    assert torch.equal(pytree.tree_map(torch.neg, params)[SHARED]["A"], -params[SHARED]["A"])
