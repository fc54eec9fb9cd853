"""`AdapterModule`: an adapter as an `nn.Module`, for training frameworks that want one (HF Trainer, accelerate,
Lightning, DDP).

What a framework sees, and why:
- `parameters()` are exactly the trainable leaves of the adapter (`lf.split`'s trainable half), as
  `nn.Parameter`s: the optimizer, gradient clipping, `zero_grad`, AMP grad scaling and DDP's gradient
  all-reduce act on them. Frozen leaves (the variant's, and `lf.freeze`'s) are buffers. Both sit in a tree of
  small modules under `adapter`, one per module path, so `state_dict()` keys read
  `adapter.<module path>.<leaf>` and hold the adapter only.
- The base model is held outside the module tree: it is in no `parameters()`, `state_dict()` or DDP
  broadcast, and nothing ever computes its gradients. `.to()`, `.cuda()`, `.float()`, `.train()`, `.eval()`
  reach it all the same. Every rank of a data-parallel run builds the same base model itself.
- `forward` and `generate` run the base model inside `lf.inject`, passing every argument through
  (HF's `labels`, `num_items_in_batch`, ...). On each instance `forward`'s signature is the base model's,
  so HF Trainer keeps the batch keys the model takes (`remove_unused_columns`) and passes its loss kwargs.
- Other attributes (`config`, `generation_config`, `gradient_checkpointing_enable`, ...) are the base
  model's, as PEFT's `PeftModel` does it; `save_pretrained` is refused, since it would save the base.
  `_no_split_modules` is the module's own (None): it names layer classes of the module tree for a framework to
  wrap (accelerate's FSDP auto-wrap), and the base's layers are not in that tree.
- Under a framework's FSDP2 (accelerate's FSDP plugin, `fsdp_version: 2`) the module is one FSDP unit, its
  parameters the adapter: FSDP gathers them whole for each forward (the adapter computes with plain tensors as
  everywhere) and averages their gradients over ranks. The base must be sharded beforehand (`fully_shard` on its
  embedding, each layer, the output norm and head, then the model): a framework cannot see it in the tree, and
  a base that is sharded only in the pieces the framework reaches (its embedding and head) is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch
from torch import nn

from ._apply import apply_call
from ._inject import inject
from ._params import Params, split
from ._serialize import check_model
from ._sharded import is_fsdp_unit
from ._structure import check


class _Leaves(nn.Module):
    """A node of `AdapterModule.adapter`: one per module-path component; leaves sit at their target's node."""


class _ForwardWithModelSignature:
    """`AdapterModule.forward`: read on an instance, the bound forward carries the base model's signature."""

    def __init__(self, function) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner=None):
        if instance is None:
            return self.function
        bound = functools.partial(self.function, instance)
        bound.__signature__ = instance._model_signature()
        return bound


class AdapterModule(nn.Module):
    """An `nn.Module` view of an adapter for training frameworks: its parameters are the adapter's trainable
    leaves, its `forward`/`generate` run `model` with the adapter, its `state_dict` holds the adapter only.

    The trainable leaves of `params` become the module's `nn.Parameter`s (sharing their storage); from then
    on `module.params` is the adapter, holding those very parameters: save it, merge it, export it from there.
    `model` is not modified and is in no `parameters()` or `state_dict()`; `.to()` and `.train()` reach it.
    Under accelerate's FSDP2 plugin (`fsdp_version: 2`) the module is one FSDP unit over the adapter: shard the
    base with `fully_shard` beforehand (docs/distributed.md), since the plugin cannot reach it.

    >>> module = lf.AdapterModule(model, lf.init(model, lf.LoRAConfig(r=8)))
    >>> trainer = transformers.Trainer(model=module, args=args, train_dataset=data)
    >>> trainer.train()
    >>> lf.save(module.params, "adapter.safetensors")
    """

    _no_split_modules = None  # the module tree holds no layer classes to wrap (see the module docstring)

    def __init__(self, model: nn.Module, params: Params) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"AdapterModule: `model` must be an nn.Module, got {type(model).__name__}")
        if not isinstance(params, Params):
            raise TypeError(f"AdapterModule: `params` must be lora_func Params, got {type(params).__name__}")
        if check(params, "AdapterModule") is not None:  # the structure check: K stacked adapters, or None
            raise ValueError("AdapterModule: `params` stacks several adapters; give one adapter (see lf.unstack)")
        check_model(model, params.targets, "AdapterModule")
        self.__dict__["_base"] = model  # outside the module tree: not in parameters() or state_dict()
        self._config = params.config
        self._targets = params.targets
        self._frozen = params.frozen
        self.adapter = _Leaves()
        trainable, _ = split(params)
        self._slots: list[tuple[str, str, _Leaves]] = []  # (path, leaf, node): the leaf order of `params`
        for path, leaf, tensor in params.leaves():
            node = self.adapter
            for part in path.split(".") if path else ():
                if part not in node._modules:
                    node.add_module(part, _Leaves())
                node = node._modules[part]
            if leaf in trainable[path]:
                node.register_parameter(leaf, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
            else:
                node.register_buffer(leaf, tensor)
            self._slots.append((path, leaf, node))

    # -- the adapter -----------------------------------------------------------------------------------
    @property
    def params(self) -> Params:
        """The adapter, its leaves the module's own parameters and buffers (current device and dtype)."""
        entries: dict[str, dict[str, torch.Tensor]] = {}
        for path, leaf, node in self._slots:
            tensor = self._leaf(node, leaf)
            entries.setdefault(path, {})[leaf] = tensor
        return Params(entries, self._config, self._targets, self._frozen)

    @property
    def base_model(self) -> nn.Module:
        """The model the adapter runs in (not a submodule: see the class docstring)."""
        return self.__dict__["_base"]

    # -- running -----------------------------------------------------------------------------------------
    def _model_signature(self) -> inspect.Signature:
        return inspect.signature(self.base_model.forward)

    @_ForwardWithModelSignature
    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """`model(*args, **kwargs)` with the adapter (HF: `labels` gives `.loss`; loss kwargs pass through)."""
        if labels is not None:  # named here so that HF Trainer finds the label column (its `find_labels`)
            kwargs["labels"] = labels
        if is_fsdp_unit(self) and not self.__dict__.get("_base_checked"):
            self._check_sharded_base()
        if torch.compiler.is_compiling():  # compiled: `lf.apply`'s compiled path (base parameters passed detached)
            return apply_call(self.base_model, self.params, args, kwargs)
        with inject(self.base_model, self.params):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`model.generate(*args, **kwargs)` with the adapter (every decoding step, KV cache included)."""
        with inject(self.base_model, self.params):
            return self.base_model.generate(*args, **kwargs)

    def _check_sharded_base(self) -> None:
        """Under FSDP2 (`fully_shard` applied to this module, as accelerate's FSDP plugin does): a base sharded in
        some pieces but not as a whole would run those pieces as separate FSDP roots, which torch refuses ("FSDP
        requires a single root module"); say what to do instead. Checked once, at the first forward."""
        base = self.base_model
        if not is_fsdp_unit(base):
            pieces = [name for name, m in base.named_modules() if name and is_fsdp_unit(m)]
            if pieces:
                raise ValueError(
                    f"AdapterModule under FSDP2: modules {pieces[:3]} of the base model are sharded but the base "
                    "model itself is not (a framework's FSDP plugin, e.g. accelerate's, shards the pieces of the base "
                    "it can reach, its embedding and head, and not its layers: the base is outside the module tree). "
                    "Shard the base before building the AdapterModule: fully_shard on the input embedding, each "
                    "decoder layer, [final norm, output head] and then the model (docs/distributed.md)"
                )
        self.__dict__["_base_checked"] = True

    # -- what reaches the base model ---------------------------------------------------------------------
    def train(self, mode: bool = True) -> AdapterModule:
        super().train(mode)
        self.base_model.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if recurse:
            self.base_model._apply(fn)
        dtypes = {node._parameters.get(leaf, node._buffers.get(leaf)).dtype for _, leaf, node in self._slots}
        if len(dtypes) == 1 and self._config.dtype not in dtypes:  # `.to(torch.bfloat16)`: as lf.cast does
            self._config = dataclasses.replace(self._config, dtype=dtypes.pop())
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None or name in ("save_pretrained", "push_to_hub"):
                if name in ("save_pretrained", "push_to_hub"):
                    raise AttributeError(
                        f"AdapterModule.{name}: the base model's {name} would write the base model; write the "
                        "adapter with lf.save(module.params, path) or lf.to_peft(module.params, directory)"
                    ) from None
                raise
            return getattr(base, name)

    # -- the adapter's state -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load an adapter `state_dict` (from `state_dict()`, or a Trainer checkpoint) whole: every key present,
        none unknown, each a tensor of the leaf's shape and dtype. `strict=False` (Trainer passes it) does not allow
        a partial load. Everything is checked before anything is written: a refused `state_dict` leaves the
        adapter as it was (so does an exception raised while writing, a KeyboardInterrupt included)."""
        where = "AdapterModule.load_state_dict"
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{where}: missing keys {missing[:5]} and unexpected keys {unexpected[:5]} "
                f"({len(missing)} and {len(unexpected)}); an adapter loads whole"
            )
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{where}: key {key!r} holds a {type(value).__name__}, not a tensor")
            if value.dtype != own[key].dtype:
                raise ValueError(
                    f"{where}: key {key!r} has dtype {value.dtype}, the adapter's leaf "
                    f"{own[key].dtype}; convert the adapter first (lf.cast, or module.to(dtype))"
                )
            if value.shape != own[key].shape:
                raise ValueError(
                    f"{where}: key {key!r} has shape {tuple(value.shape)}, the adapter's leaf "
                    f"{tuple(own[key].shape)}; nothing was loaded"
                )
        before = [(node, leaf, self._leaf(node, leaf)) for _, leaf, node in self._slots]
        values = [tensor.detach().clone() for _, _, tensor in before]  # small: the adapter only
        try:
            return super().load_state_dict(state_dict, strict=True, assign=assign)
        except BaseException:  # put back the very tensors (an optimizer holds them) and their values
            with torch.no_grad():
                for (node, leaf, tensor), value in zip(before, values):
                    (node._parameters if leaf in node._parameters else node._buffers)[leaf] = tensor
                    tensor.copy_(value)
            raise

    @staticmethod
    def _leaf(node: _Leaves, leaf: str) -> torch.Tensor:
        return node._parameters[leaf] if leaf in node._parameters else node._buffers[leaf]

    def __repr__(self) -> str:
        return f"AdapterModule({type(self.base_model).__name__}, {self.params!r})"
