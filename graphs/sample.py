"""The `Sample`: a model, its example inputs and what one forward is worth."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils._pytree as pytree


@dataclass
class Sample:
    """A runnable model with example inputs.

    `unit` / `units_per_forward` turn a forward's time into throughput
    (tokens/s, images/s). The model is called as
    `module(*example_inputs, **example_kwargs)`; any pytree of tensors and
    constants is allowed. The captured graph takes the flat leaves of
    `(example_inputs, example_kwargs)` instead (`flat_inputs`), and
    `reference(*flat)` calls the model that way.

    `make_inputs(seed)` gives fresh random graph inputs (flat) of the same
    shapes and dtypes, which the numerics check needs so that a pass cannot
    overfit the example inputs; `make_call(seed)` gives them as the model's
    own `(args, kwargs)`. `vocab_size`, where declared, bounds fresh token ids.
    `writes`: the flat input positions the model writes in place (a cache, a
    counter; graphs/state.py): every check or timed run gets its own copies.
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple
    unit: str = "samples"
    units_per_forward: int = 1
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    preset: str = "tiny"
    description: str = ""
    input_factory: Callable[[int], tuple] | None = field(default=None, repr=False)
    example_kwargs: dict = field(default_factory=dict)
    vocab_size: int | None = None
    writes: tuple = ()

    def __post_init__(self):
        self.example_inputs = tuple(self.example_inputs)
        self.example_kwargs = dict(self.example_kwargs or {})

    @property
    def in_spec(self) -> pytree.TreeSpec:
        """The pytree structure of the model's `(args, kwargs)`."""
        return pytree.tree_flatten((self.example_inputs, self.example_kwargs))[1]

    @property
    def flat_inputs(self) -> tuple:
        """The example inputs as the captured graph takes them."""
        return tuple(pytree.tree_leaves((self.example_inputs, self.example_kwargs)))

    def make_call(self, seed: int) -> tuple[tuple, dict]:
        """Fresh `(args, kwargs)` for the model itself."""
        if self.input_factory is not None:
            return tuple(self.input_factory(seed)), {}
        return random_like((self.example_inputs, self.example_kwargs), seed, vocab_size=self.vocab_size)

    def make_inputs(self, seed: int) -> tuple:
        """Fresh flat inputs for the captured graph (the model's positional
        inputs themselves where it takes only tensors, positionally)."""
        if self.input_factory is not None:
            return self.input_factory(seed)
        return tuple(pytree.tree_leaves(self.make_call(seed)))

    def example_copies(self) -> tuple:
        """The example's flat inputs, tensors copied (what a check may run on: never the user's own)."""
        return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in self.flat_inputs)

    def reference(self, *flat):
        """The model called on flat graph inputs (as `make_inputs` gives them)."""
        if not self.example_kwargs and len(flat) == len(self.example_inputs) and \
                all(isinstance(x, torch.Tensor) for x in self.example_inputs):
            return self.module(*flat)
        args, kwargs = pytree.tree_unflatten(list(flat), self.in_spec)
        return self.module(*args, **kwargs)


def random_like(inputs, seed: int, *, vocab_size: int | None = None):
    """Fresh inputs shaped like `inputs` (any pytree; non-tensors are kept):

    - floats ~ N(0,1), except 0/1 masks (below);
    - masks carry structure: bools are copied, and a tensor whose values are
      all 0/1 stays in {0, 1} (all ones, e.g. an attention mask, stays all ones;
      all zeros stays all zeros);
    - other integers (token ids, indices) stay within the example's
      [min, max], so indices stay valid; with `vocab_size`, ids range over
      [min, vocab_size) instead.
    """
    g = torch.Generator().manual_seed(seed)

    def one(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.dtype == torch.bool or x.numel() == 0 or x.is_complex():
            return x.clone()
        is_mask = bool(((x == 0) | (x == 1)).all())
        if is_mask and (x.dtype.is_floating_point or x.numel() > 1):
            if bool((x == x.flatten()[0]).all()):     # all ones / all zeros: keep as is
                return x.clone()
            return torch.randint(0, 2, x.shape, generator=g).to(dtype=x.dtype, device=x.device)
        if x.dtype.is_floating_point:
            return torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype).to(x.device)
        lo, hi = int(x.min()), int(x.max())
        if vocab_size is not None and vocab_size > hi:
            hi = vocab_size - 1
        return torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device)

    return pytree.tree_map(one, inputs)


def has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix units (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def preset_dtype(preset: str, device: str, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """tiny runs fp32; bench runs bf16 on GPU and on CPUs with bf16 matrix units."""
    if dtype is not None:
        return parse_dtype(dtype)
    env = os.environ.get("PASSLAB_DTYPE")
    if env:
        return parse_dtype(env)
    if preset == "tiny":
        return torch.float32
    if device.startswith("cuda") or has_native_bf16():
        return torch.bfloat16
    return torch.float32


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[str(d).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {d!r}; use one of fp32, bf16, fp16") from None
