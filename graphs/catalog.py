"""`load(name)`: the catalogue of models passlab knows, and how to name others.

A model is a built-in sample (`transformer`), a Hugging Face architecture built
from a small config with random weights (`hf:gpt2`), or any user file
(`path/to/model.py:function` returning `(module, example_inputs)` or
`(module, example_inputs, example_kwargs)`).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import os

import torch
import torch.utils._pytree as pytree

from .errors import UnknownModelError
from .sample import Sample, preset_dtype

SAMPLES = {  # name -> module under passlab.graphs
    "mlp": "mlp",
    "transformer": "transformer",
    "llama": "llama",
    "llama_decode": "llama_decode",
    "moe": "moe",
    "convnet": "convnet",
}
DISTRIBUTED = {"tp_mlp": "distributed", "ep_moe": "distributed", "ep_mixtral": "distributed",
               "fsdp_mlp": "distributed"}
PRESETS = ("tiny", "bench")


def list_models() -> dict[str, str]:
    """Name -> one-line description of every loadable built-in model."""
    from . import hf
    out = {}
    for name, mod in {**SAMPLES, **DISTRIBUTED}.items():
        try:
            m = importlib.import_module(f"passlab.graphs.{mod}")
        except ImportError:
            continue
        doc = (m.__doc__ or "").strip().splitlines()[0]
        out[name] = doc.split(": ", 1)[1] if doc.startswith("`") and ": " in doc else doc
    for arch, desc in hf.ARCHS.items():
        out[f"hf:{arch}"] = desc
    from . import zoo
    for name, entry in zoo.MODELS.items():
        out[f"zoo:{name}"] = f"{entry.family}: {entry.description}"
    return out


def load(name: str, preset: str = "tiny", *, dtype=None, device: str = "cpu") -> Sample:
    if preset not in PRESETS:
        raise UnknownModelError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    dt = preset_dtype(preset, device, dtype)
    if name.startswith("hf:"):
        from . import hf
        return hf.build(name[3:], preset, dt, device)
    if name.startswith("zoo:"):
        from . import zoo
        return zoo.build(name[4:], preset, dt, device)
    if ":" in name and (name.split(":")[0].endswith(".py") or os.sep in name):
        return load_file(name, preset, dt, device)
    table = {**SAMPLES, **DISTRIBUTED}
    if name not in table:
        known = sorted(table) + ["hf:" + a for a in _hf_archs()]
        from . import zoo
        close = difflib.get_close_matches(name, known + ["zoo:" + n for n in zoo.names()], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; known models: {', '.join(known)}; "
                                "zoo:NAME for the model zoo (passlab list models); "
                                "or give path/to/file.py:function")
    mod = importlib.import_module(f"passlab.graphs.{table[name]}")
    builder = getattr(mod, "build_" + name, None) or mod.build
    return builder(preset, dt, device)


def _hf_archs():
    from . import hf
    return list(hf.ARCHS)


def load_file(spec: str, preset: str, dtype: torch.dtype, device: str) -> Sample:
    """`path/to/file.py:function` -> Sample; the function returns
    `(module, example_inputs)` or `(module, example_inputs, example_kwargs)`.
    An HF model's `config.vocab_size` bounds the fresh token ids."""
    path, _, fn = spec.rpartition(":")
    if not os.path.exists(path):
        raise UnknownModelError(f"model file {path!r} does not exist")
    modname = "passlab_user_" + os.path.splitext(os.path.basename(path))[0]
    s = importlib.util.spec_from_file_location(modname, path)
    m = importlib.util.module_from_spec(s)
    s.loader.exec_module(m)
    if not hasattr(m, fn):
        fns = [k for k, v in vars(m).items() if callable(v) and not k.startswith("_")]
        raise UnknownModelError(f"{path} has no function {fn!r}; it defines: {', '.join(fns)}")
    result = getattr(m, fn)()
    if not (isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module)
            and (len(result) == 2 or isinstance(result[2], dict))):
        got = type(result).__name__ + (f" of {len(result)}" if isinstance(result, tuple) else "")
        raise UnknownModelError(f"{spec} must return (module, example_inputs) or "
                                f"(module, example_inputs, example_kwargs: dict), got {got}")
    module, inputs, kwargs = result if len(result) == 3 else (*result, {})
    inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    inputs, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (inputs, kwargs))
    floats = [t.dtype for t in pytree.tree_leaves((inputs, kwargs))
              if isinstance(t, torch.Tensor) and t.dtype.is_floating_point]
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    return Sample(spec, module.eval().to(device), inputs, example_kwargs=kwargs,
                  dtype=floats[0] if floats else torch.float32, device=device, preset=preset,
                  vocab_size=vocab if isinstance(vocab, int) else None,
                  description=f"user model {fn}() from {path}")
