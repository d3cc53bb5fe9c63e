"""Models and capture: `load(name, preset)` -> Sample; `capture(module, inputs)` -> GraphModule."""
from .capture import CaptureError, capture, check_metadata, clone, fetch_attr
from .catalog import PRESETS, UnknownModelError, list_models, load
from .sample import Sample, has_native_bf16, parse_dtype, random_like
from .state import fresh_copies, stateful

__all__ = ["load", "capture", "Sample", "CaptureError", "UnknownModelError", "list_models",
           "check_metadata", "clone", "fetch_attr", "random_like", "has_native_bf16", "parse_dtype", "PRESETS",
           "fresh_copies", "stateful"]
