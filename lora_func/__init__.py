"""lora_func: LoRA-family adapters as pytrees, injected with `torch.func.functional_call` and hooks.

>>> import lora_func as lf
>>> params = lf.init(model, lf.LoRAConfig(r=8, alpha=16))
>>> loss = lf.apply(model, params, batch).loss
"""

from ._apply import apply as apply
from ._arithmetic import dare as dare
from ._arithmetic import delta_weights as delta_weights
from ._arithmetic import magnitude_prune as magnitude_prune
from ._arithmetic import resize as resize
from ._arithmetic import ties as ties
from ._arithmetic import weighted_sum as weighted_sum
from ._attribution import grad_dots as grad_dots
from ._attribution import per_example_grads as per_example_grads
from ._cast import cast as cast
from ._config import AdapterConfig as AdapterConfig
from ._config import ConfigError as ConfigError
from ._distributed import all_reduce_grads as all_reduce_grads
from ._freeze import freeze as freeze
from ._init import init as init
from ._init import targets as targets
from ._inject import inject as inject
from ._kind import Target as Target
from ._merge import merge as merge
from ._module import AdapterModule as AdapterModule
from ._params import Params as Params
from ._params import combine as combine
from ._params import split as split
from ._params import trainable_leaves as trainable_leaves
from ._private import private_grads as private_grads
from ._schedule import regularizer as regularizer
from ._schedule import schedule as schedule
from ._schedule import schedule_state as schedule_state
from ._serialize import AdapterFileError as AdapterFileError
from ._serialize import load as load
from ._serialize import save as save
from ._stack import stack as stack
from ._stack import unstack as unstack
from ._version import __version__ as __version__
from .peft import from_peft as from_peft
from .peft import to_peft as to_peft
from .variants.antipasto import AntiPaSTOConfig as AntiPaSTOConfig
from .variants.delora import DeLoRAConfig as DeLoRAConfig
from .variants.dora import DoRAConfig as DoRAConfig
from .variants.eva import EVAConfig as EVAConfig
from .variants.hra import HRAConfig as HRAConfig
from .variants.ia3 import IA3Config as IA3Config
from .variants.ia3ff import IA3FFConfig as IA3FFConfig
from .variants.loha import LoHaConfig as LoHaConfig
from .variants.lokr import LoKrConfig as LoKrConfig
from .variants.lora import LoRAConfig as LoRAConfig
from .variants.oft import OFTConfig as OFTConfig
from .variants.pissa import PiSSAConfig as PiSSAConfig
from .variants.road import ROADConfig as ROADConfig
from .variants.ssvd import SSVDConfig as SSVDConfig
from .variants.vera import VeRAConfig as VeRAConfig
