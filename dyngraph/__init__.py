"""dyngraph: a declarative compiler and profiler for dynamic neural networks."""

from . import blocks as _blocks  # noqa: F401  (registers the built-in blocks)
from .blocks import register_block
from .compiler.compile import compile
from .compiler.load import LoadedSpec, load_spec
from .constructs import register_construct
from .core.errors import Problem, SpecError
from .export import ExportError, export, load_exported
from .profiler import Profile, profile
from .runtime.heap import hold_heap
from .runtime.model import DynamicModel, DynamicOutput
from .runtime.stream import StreamOutput, stream
from .runtime.trace import Trace
from .training import TrainResult, evaluate, train

__all__ = [
    "DynamicModel",
    "DynamicOutput",
    "ExportError",
    "LoadedSpec",
    "Problem",
    "Profile",
    "SpecError",
    "StreamOutput",
    "Trace",
    "TrainResult",
    "compile",
    "evaluate",
    "export",
    "hold_heap",
    "load_exported",
    "load_spec",
    "profile",
    "register_block",
    "register_construct",
    "stream",
    "train",
]
__version__ = "0.1.0"
