"""`hf:ARCH`: Hugging Face transformers architectures built from a small config
with random weights. Nothing is ever downloaded: configs are written here."""
from __future__ import annotations

import torch

from .sample import Sample

ARCHS = {
    "gpt2": "Hugging Face GPT-2 (random weights, eager attention)",
    "llama": "Hugging Face Llama (random weights, GQA, eager attention)",
    "mixtral": "Hugging Face Mixtral MoE (random weights, batched_mm experts)",
}
SIZES = {"tiny": dict(layers=2, dim=64, heads=4, kv=2, ffn=128, vocab=128, batch=2, seq=16),
         "bench": dict(layers=4, dim=512, heads=8, kv=2, ffn=1376, vocab=2048, batch=4, seq=256)}


class CausalLMLogits(torch.nn.Module):
    """Returns plain logits so the captured graph has one tensor output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def config(arch: str, s: dict):
    import transformers as tf
    common = dict(vocab_size=s["vocab"], attn_implementation="eager")
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=s["layers"], n_embd=s["dim"], n_head=s["heads"],
                             n_positions=max(64, s["seq"]), resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, **common)
    llama_like = dict(num_hidden_layers=s["layers"], hidden_size=s["dim"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv"], intermediate_size=s["ffn"],
                      max_position_embeddings=max(64, s["seq"]), **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "mixtral":
        # a constructor keyword: transformers reads `_experts_implementation`, set only from kwargs;
        # batched_mm exports as plain aten bmm instead of an opaque grouped GEMM op
        return tf.MixtralConfig(num_local_experts=4 if s is SIZES["tiny"] else 8, num_experts_per_tok=2,
                                experts_implementation="batched_mm", **llama_like)
    raise KeyError(arch)


def build(arch: str, preset: str, dtype: torch.dtype, device: str) -> Sample:
    from .catalog import UnknownModelError
    if arch not in ARCHS:
        raise UnknownModelError(f"unknown Hugging Face architecture {arch!r}; known: {', '.join(ARCHS)}")
    try:
        import transformers
    except ImportError:
        raise UnknownModelError("hf: models need the 'hf' extra: pip install -e '.[hf]'") from None
    s = SIZES[preset]
    torch.manual_seed(0)
    cfg = config(arch, s)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    m = CausalLMLogits(model).eval().to(device, dtype)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    return Sample(f"hf:{arch}", m, (ids,), unit="tokens", units_per_forward=s["batch"] * s["seq"],
                  dtype=dtype, device=device, preset=preset, description=ARCHS[arch])
