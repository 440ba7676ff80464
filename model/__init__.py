"""The LLaMA 3 model family in Flax: `Llama3` built from a frozen `ModelConfig`."""

from model.config import ModelConfig
from model.llama import Llama3, output_kernel

__all__ = ["Llama3", "ModelConfig", "output_kernel"]
