"""flexmore: federated Mixture-of-Experts LLMs with rank-heterogeneous experts (FlexMoRE, FLEx).

Importing flexmore registers `model_type: "flexmore"` (FlexMoReConfig, FlexMoReForCausalLM) with the
transformers Auto classes, so FlexMoRE checkpoints load with `AutoModelForCausalLM.from_pretrained`.
"""

from flexmore.mixture import FlexMoReConfig, FlexMoReForCausalLM

__all__ = ["FlexMoReConfig", "FlexMoReForCausalLM"]
