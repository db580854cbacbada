"""lmforge: from raw text to a trained, served generative language model, in plain PyTorch.

The public API. Heavier pieces (tokenizers, training, generation) load on first use, so `import lmforge` stays light.
"""

from importlib import import_module

from .config import ModelConfig
from .model import GPT

__version__ = "0.1.0"

# name -> module that defines it; imported when first asked for (PEP 562)
_LAZY = {
    "CharTokenizer": "tokenizer",
    "BPETokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "TrainConfig": "config",
    "train": "train",
    "load": "checkpoint",
    "generate": "generate",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["GPT", "ModelConfig", *_LAZY]
