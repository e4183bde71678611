"""pagedrt — an embedded LLM inference runtime built around PagedAttention."""
from . import _core
from .errors import Error, InvalidArgument, ModelError, Unsupported
from .models import default_model, resolve_model
from .runtime import Completion, Runtime
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "Completion", "Error", "InvalidArgument", "ModelError", "Runtime", "SamplingParams",
    "Tokenizer", "Unsupported", "default_model", "resolve_model",
]
__version__ = "0.1.0"
