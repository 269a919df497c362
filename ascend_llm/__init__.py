"""ascend_llm: MindSpore-native LLM training for Ascend 910B, runnable and tested on CPU."""

__version__ = "0.1.0"
