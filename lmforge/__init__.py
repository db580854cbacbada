"""lmforge: from raw text to a trained, served generative language model, in plain PyTorch.

The public API. Optional features with heavy dependencies (plots, tiktoken's core, progress bars) load on first use.
"""

__version__ = "0.1.0"

from .config import ModelConfig, TrainConfig  # noqa: E402
from .model import GPT  # noqa: E402
from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer  # noqa: E402
from .checkpoint import load  # noqa: E402
from .generate import generate  # noqa: E402  (binds the function over the submodule of the same name)
from .train import train  # noqa: E402

__all__ = ["GPT", "ModelConfig", "TrainConfig", "CharTokenizer", "BPETokenizer", "load_tokenizer", "load",
           "generate", "train"]
