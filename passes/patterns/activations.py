"""`recompose_activations`: activations written out by hand back to one aten op.

    x * sigmoid(x)                                               -> silu(x)
    0.5 * x * (1 + erf(x / sqrt(2)))                             -> gelu(x)
    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))  -> gelu(x, approximate="tanh")

each also in its bf16/fp16 form with the casts around it (`register_rewrite`'s
cast variant). One ATen call instead of three to eight pointwise ops, and
an activation the GEMM epilogues know (`fuse_epilogue` runs these first, so
a hand-written swish after a linear still becomes a oneDNN post-op). HF GPT-2
writes its GELU the tanh way (`NewGELUActivation`); many codebases write swish.

Each rewrite is two plain PyTorch functions given to `Rewrite`; the three
are one rule table (`Rules`) registered as one pass, its statistics counted
per rule (`by_rule`). This module is the example of a rule table.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import register_pass
from .rewrite import Rewrite, Rules


def swish(x):
    return x * torch.sigmoid(x)


def silu(x):
    return F.silu(x)


def gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu(x):
    return F.gelu(x)


def gelu_tanh_written(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


RECOMPOSE = register_pass(Rules("recompose_activations", [
    Rewrite("swish_to_silu", swish, silu),
    Rewrite("gelu_erf_to_gelu", gelu_erf, gelu),
    Rewrite("gelu_tanh_to_gelu", gelu_tanh_written, gelu_tanh),
], description="SiLU / GELU written out (x * sigmoid(x), the erf and tanh GELU formulas) -> one aten op."))
