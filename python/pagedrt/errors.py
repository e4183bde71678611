"""Exceptions raised by pagedrt.

Every error names what is wrong and where (file, field, request).
"""
from . import _core

#: Base class of every error the C++ core raises (a RuntimeError).
Error = _core.Error


class ModelError(Error, ValueError):
    """A model file is broken or unsupported; the message names the file."""


class InvalidArgument(Error, ValueError):
    """A parameter, prompt or request is invalid; the message names the field."""


class Unsupported(Error):
    """A valid request this build cannot serve (for example device="cuda" without CUDA)."""


_core._register_errors(ModelError, InvalidArgument, Unsupported)
