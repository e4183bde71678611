"""pagedrt — an embedded LLM inference runtime built around PagedAttention."""
from . import _core
from .errors import Error, InvalidArgument, ModelError, Unsupported
from .models import default_model, resolve_model
from .outputs import Completion, CompletionOutput, Event, TokenLogprob
from .runtime import Runtime, RuntimeConfig
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "Completion", "CompletionOutput", "Error", "Event", "TokenLogprob", "InvalidArgument", "ModelError", "Runtime", "RuntimeConfig", "SamplingParams",
    "Tokenizer", "Unsupported", "default_model", "resolve_model",
]
__version__ = "0.1.0"
