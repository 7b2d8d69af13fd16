"""gkd: Generalized Knowledge Distillation of language models on PyTorch."""

from gkd.errors import GKDError

__all__ = ["GKDError"]
__version__ = "0.1.0"
