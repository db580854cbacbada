"""lmforge: from raw text to a trained, served generative language model, in plain PyTorch.

The public API. Optional features with heavy dependencies (plots, tiktoken's core, progress bars) load on first use.
"""

from .version import __version__  # noqa: F401
from .config import ModelConfig, TrainConfig  # noqa: E402
from .model import GPT  # noqa: E402
from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer  # noqa: E402
from .runs import load  # noqa: E402
from .engine import Engine, Request  # noqa: E402
from .errors import UserError  # noqa: E402
from .generation import generate  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["GPT", "ModelConfig", "TrainConfig", "CharTokenizer", "BPETokenizer", "load_tokenizer", "load",
           "generate", "train", "Engine", "Request", "UserError", "__version__"]
