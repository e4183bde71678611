"""pagedrt.serve — an OpenAI-compatible HTTP server on a Runtime.

    pagedrt-serve --model DIR|FILE.gguf          (pip install 'pagedrt[serve]')

or, inside your own ASGI server: ``app = build_app(rt, model_name="my-model")``.
"""
from .cli import main


def build_app(rt, **kwargs):
    """The FastAPI application serving `rt` (see :func:`pagedrt.serve.app.build_app`)."""
    from .app import build_app as _build
    return _build(rt, **kwargs)


__all__ = ["build_app", "main"]
