"""llava_lite: turn a pretrained causal language model into a LLaVA-style vision-language assistant."""

__version__ = "0.1.0"
