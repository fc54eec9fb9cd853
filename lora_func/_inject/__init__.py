"""`inject`: an adapter in a model for a block of code, in one thread. `apply` is this block around one call.

One file per job, all of the mutable state in `state.py`:

    block.py       `Injection` (one adapter in one model for a block, in one thread) and `inject`
    registry.py    the dispatchers in the modules' hook dicts: registered, counted across injections, removed
    dispatch.py    which injection a forward belongs to (this thread's; a recompute's), the targets' hooks
    detach.py      keeping base gradients out: detached views of base parameters that require grad
    replace.py     targets injected by parameters (fused experts, `modules_to_save`): replacement tensors
    checkpoint.py  HF gradient checkpointing: layer-call records that live with the autograd graph
    quantized.py   bitsandbytes layers routed through `QuantizedLinear` under torch.func and mixed batches
    positions.py   the model call's attention mask, for variants that edit some positions only (ReFT)
    compiled.py    torch.compile: hooks swapped in for the traced call; compiled code run eagerly in a block
    unwind.py      what an exception (KeyboardInterrupt too) leaves on the thread, undone
    state.py       the process-wide tables and the per-thread stacks

Private torch names: through `lora_func/_torch_private.py` only.
"""

from .block import Injection as Injection
from .block import inject as inject
from .block import survey as survey
from .detach import is_plain_parameter as is_plain_parameter
