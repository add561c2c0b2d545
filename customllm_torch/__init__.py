"""CustomLLM, the PyTorch reference. Importing this registers the model with transformers' Auto classes."""

from customllm_torch.balancing import ExpertBiasCallback, RoutingCollector
from customllm_torch.io import load, save
from customllm_torch.model import CustomLLM, CustomLLMConfig, register

register()

__all__ = [
    "CustomLLM",
    "CustomLLMConfig",
    "ExpertBiasCallback",
    "RoutingCollector",
    "load",
    "save",
]
