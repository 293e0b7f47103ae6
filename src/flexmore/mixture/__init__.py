"""FlexMoRE: FlexOlmo with rank-heterogeneous experts, as a `transformers` model.

Importing this package registers `model_type: "flexmore"` with `AutoConfig` and
`AutoModelForCausalLM`, so saved FlexMoRE checkpoints load with the Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from flexmore.mixture.config import FlexMoReConfig
from flexmore.mixture.convert import ExpertParts, compose_low_rank, from_flexolmo, to_flexolmo
from flexmore.mixture.experts import FlexMoReExperts
from flexmore.mixture.modeling import (
    FlexMoReForCausalLM,
    FlexMoReModel,
    FlexMoReSparseMoeBlock,
    gather_offloaded_experts,
)

AutoConfig.register("flexmore", FlexMoReConfig, exist_ok=True)
AutoModelForCausalLM.register(FlexMoReConfig, FlexMoReForCausalLM, exist_ok=True)

__all__ = [
    "ExpertParts",
    "FlexMoReConfig",
    "FlexMoReExperts",
    "FlexMoReForCausalLM",
    "FlexMoReModel",
    "FlexMoReSparseMoeBlock",
    "compose_low_rank",
    "from_flexolmo",
    "gather_offloaded_experts",
    "to_flexolmo",
]
