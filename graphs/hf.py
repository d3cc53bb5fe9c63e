"""`hf:ARCH`: Hugging Face transformers architectures built from a small config
with random weights. Nothing is ever downloaded: configs are written here.

`config(arch, sizes)` writes the config of every architecture passlab knows
(`CONFIGS`; the model zoo, graphs/zoo.py, builds them all); `hf:ARCH` loads
the causal LMs among them (`ARCHS`) wrapped to return plain logits.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from .errors import UnknownModelError
from .sample import Sample

ARCHS = {
    "gpt2": "Hugging Face GPT-2 (random weights, eager attention)",
    "llama": "Hugging Face Llama (random weights, GQA, eager attention)",
    "mixtral": "Hugging Face Mixtral MoE (random weights, batched_mm experts)",
}
SIZES = {"tiny": dict(layers=2, dim=64, heads=4, kv=2, ffn=128, vocab=128, batch=2, seq=16, experts=4),
         "bench": dict(layers=4, dim=512, heads=8, kv=2, ffn=1376, vocab=2048, batch=4, seq=256, experts=8)}


class CausalLMLogits(torch.nn.Module):
    """Returns plain logits so the captured graph has one tensor output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


# ---------------------------------------------------------------- configs
# sizes: layers, dim, heads, kv (key/value heads), ffn, vocab, seq, experts; vision: image, patch,
# widths (stage channels), depths; audio: mels, frames

def positions(s):
    return max(64, s["seq"])


def bert_like(s):
    return dict(num_hidden_layers=s["layers"], hidden_size=s["dim"], num_attention_heads=s["heads"],
                intermediate_size=s["ffn"], max_position_embeddings=positions(s), vocab_size=s["vocab"])


def llama_like(s):
    return dict(num_hidden_layers=s["layers"], hidden_size=s["dim"], num_attention_heads=s["heads"],
                num_key_value_heads=s["kv"], intermediate_size=s["ffn"], max_position_embeddings=positions(s),
                vocab_size=s["vocab"], use_cache=False)


def moe_like(s):
    # `experts_implementation` is a constructor keyword: transformers reads `_experts_implementation`,
    # set only from kwargs; batched_mm exports as plain aten bmm instead of an opaque grouped GEMM op
    return dict(llama_like(s), num_experts_per_tok=2, experts_implementation="batched_mm")


def vit_like(s):
    return dict(num_hidden_layers=s["layers"], hidden_size=s["dim"], num_attention_heads=s["heads"],
                intermediate_size=s["ffn"], image_size=s["image"], patch_size=s["patch"])


CONFIGS = {  # arch -> (config class, config keywords from sizes)
    "bert": ("BertConfig", bert_like),
    "roberta": ("RobertaConfig", lambda s: dict(bert_like(s), max_position_embeddings=positions(s) + 2)),
    "distilbert": ("DistilBertConfig", lambda s: dict(n_layers=s["layers"], dim=s["dim"], n_heads=s["heads"],
                                                      hidden_dim=s["ffn"], vocab_size=s["vocab"],
                                                      max_position_embeddings=positions(s))),
    "albert": ("AlbertConfig", lambda s: dict(bert_like(s), embedding_size=s["dim"] // 2)),
    "electra": ("ElectraConfig", lambda s: dict(bert_like(s), embedding_size=s["dim"] // 2)),
    "deberta-v2": ("DebertaV2Config", lambda s: dict(bert_like(s), relative_attention=True,
                                                     position_buckets=16, pos_att_type=["p2c", "c2p"])),
    "gpt2": ("GPT2Config", lambda s: dict(n_layer=s["layers"], n_embd=s["dim"], n_head=s["heads"],
                                          n_positions=positions(s), vocab_size=s["vocab"], use_cache=False,
                                          bos_token_id=0, eos_token_id=0)),
    "gpt-neox": ("GPTNeoXConfig", lambda s: dict(bert_like(s), use_cache=False)),
    "opt": ("OPTConfig", lambda s: dict(num_hidden_layers=s["layers"], hidden_size=s["dim"],
                                        num_attention_heads=s["heads"], ffn_dim=s["ffn"],
                                        word_embed_proj_dim=s["dim"], max_position_embeddings=positions(s),
                                        vocab_size=s["vocab"], use_cache=False)),
    "bloom": ("BloomConfig", lambda s: dict(n_layer=s["layers"], hidden_size=s["dim"], n_head=s["heads"],
                                            vocab_size=s["vocab"], use_cache=False)),
    "llama": ("LlamaConfig", llama_like),
    "mistral": ("MistralConfig", lambda s: dict(llama_like(s), sliding_window=None)),
    "qwen2": ("Qwen2Config", llama_like),
    "phi3": ("Phi3Config", lambda s: dict(llama_like(s), pad_token_id=0, eos_token_id=0)),
    "gemma": ("GemmaConfig", lambda s: dict(llama_like(s), head_dim=s["dim"] // s["heads"])),
    "falcon": ("FalconConfig", lambda s: dict(num_hidden_layers=s["layers"], hidden_size=s["dim"],
                                              num_attention_heads=s["heads"], vocab_size=s["vocab"],
                                              max_position_embeddings=positions(s), use_cache=False)),
    "mixtral": ("MixtralConfig", lambda s: dict(moe_like(s), num_local_experts=s["experts"])),
    "qwen2-moe": ("Qwen2MoeConfig", lambda s: dict(moe_like(s), num_experts=s["experts"],
                                                   moe_intermediate_size=s["ffn"] // 2,
                                                   shared_expert_intermediate_size=s["ffn"])),
    "qwen3-moe": ("Qwen3MoeConfig", lambda s: dict(moe_like(s), num_experts=s["experts"],
                                                   moe_intermediate_size=s["ffn"] // 2, head_dim=s["dim"] // s["heads"])),
    "olmoe": ("OlmoeConfig", lambda s: dict(moe_like(s), num_experts=s["experts"])),
    "gpt-oss": ("GptOssConfig", lambda s: dict(moe_like(s), num_local_experts=s["experts"],
                                               head_dim=s["dim"] // s["heads"], sliding_window=positions(s))),
    "t5": ("T5Config", lambda s: dict(num_layers=s["layers"], num_decoder_layers=s["layers"], d_model=s["dim"],
                                      num_heads=s["heads"], d_kv=s["dim"] // s["heads"], d_ff=s["ffn"],
                                      vocab_size=s["vocab"], use_cache=False, decoder_start_token_id=0)),
    "bart": ("BartConfig", lambda s: dict(encoder_layers=s["layers"], decoder_layers=s["layers"], d_model=s["dim"],
                                          encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"],
                                          encoder_ffn_dim=s["ffn"], decoder_ffn_dim=s["ffn"],
                                          vocab_size=s["vocab"], max_position_embeddings=positions(s),
                                          use_cache=False)),
    "vit": ("ViTConfig", vit_like),
    "deit": ("DeiTConfig", vit_like),
    "swin": ("SwinConfig", lambda s: dict(image_size=s["image"], patch_size=s["patch"] // 2, embed_dim=s["widths"][0],
                                          depths=[2] * len(s["widths"]),
                                          num_heads=[max(1, w // 16) for w in s["widths"]], window_size=4)),
    "convnext": ("ConvNextConfig", lambda s: dict(hidden_sizes=list(s["widths"]), depths=list(s["depths"]),
                                                  num_stages=len(s["widths"]), patch_size=s["patch"] // 2,
                                                  image_size=s["image"])),
    "resnet": ("ResNetConfig", lambda s: dict(embedding_size=s["widths"][0], hidden_sizes=list(s["widths"]),
                                              depths=list(s["depths"]), layer_type="bottleneck")),
    # conv weights are drawn N(0, initializer_range) whatever their fan-in: at the default 0.02 the
    # activations of 17 blocks vanish (outputs ~1e-25, which any graph would match)
    "mobilenet-v2": ("MobileNetV2Config", lambda s: dict(image_size=s["image"], depth_multiplier=0.35,
                                                         initializer_range=0.22)),
    "whisper": ("WhisperConfig", lambda s: dict(encoder_layers=s["layers"], decoder_layers=s["layers"],
                                                d_model=s["dim"], encoder_attention_heads=s["heads"],
                                                decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
                                                decoder_ffn_dim=s["ffn"], num_mel_bins=s["mels"],
                                                max_source_positions=s["frames"] // 2, vocab_size=s["vocab"],
                                                pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                                decoder_start_token_id=0)),
    "wav2vec2": ("Wav2Vec2Config", lambda s: dict(bert_like(s), conv_dim=(s["dim"] // 2,) * 3,
                                                  conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                                                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                                  apply_spec_augment=False)),
}


def config(arch: str, s: dict):
    """The transformers config of `arch` at sizes `s`, eager attention (so it is visible in the graph)."""
    import transformers as tf
    cls, keywords = CONFIGS[arch]
    return getattr(tf, cls)(**keywords(s), attn_implementation="eager")


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise UnknownModelError("Hugging Face models need the 'hf' extra: pip install -e '.[hf]'") from None
    return transformers


def build(arch: str, preset: str, dtype: torch.dtype, device: str) -> Sample:
    if arch not in ARCHS:
        raise UnknownModelError(f"unknown Hugging Face architecture {arch!r}; known: {', '.join(ARCHS)}")
    transformers = require_transformers()
    s = SIZES[preset]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(arch, s))
    m = CausalLMLogits(model).eval().to(device, dtype)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=device)
    return Sample(f"hf:{arch}", m, (ids,), unit="tokens", units_per_forward=s["batch"] * s["seq"],
                  dtype=dtype, device=device, preset=preset, description=ARCHS[arch])


def register_caches(module: torch.nn.Module) -> None:
    """Register every transformers cache type (DynamicCache, StaticCache, ...)
    with torch.utils._pytree, as transformers' own exporter does, so caches
    pass through capture as inputs and outputs and keep their type. A no-op
    for models that are not transformers models (or without transformers)."""
    import sys
    tf = sys.modules.get("transformers")
    if tf is None:
        return
    pretrained = getattr(tf, "PreTrainedModel", None)
    model = next((m for m in module.modules() if pretrained is not None and isinstance(m, pretrained)), None)
    if model is None:
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:      # a transformers without the exporter: caches stay unknown, the hint says so
        return
    register_cache_pytrees_for_model(model)


def cache_class():
    """transformers' Cache base class, or None where transformers is not loaded."""
    import sys
    return getattr(getattr(sys.modules.get("transformers"), "cache_utils", None), "Cache", None)


def find_caches(tree) -> list:
    """The transformers cache objects in a pytree (inputs or outputs), in order."""
    cls = cache_class()
    if cls is None:
        return []
    return [x for x in pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def return_given_caches(given: list, out):
    """A transformers model updates the cache it is given in place and returns
    that same object; a graph returns a new one built from its outputs. Here
    the given cache takes the returned one's place (same type): where the
    graph wrote its tensors in place (same structure and shapes: a
    StaticCache), it already holds the new values; where it grew (a
    DynamicCache), it takes the new state. The caller's object is then
    current, as after eager."""
    by_type = {type(c): c for c in given}
    cls = cache_class()

    def swap(x):
        c = by_type.get(type(x))
        if c is None or c is x:
            return x
        a, spec_a = pytree.tree_flatten(c)
        b, spec_b = pytree.tree_flatten(x)
        if spec_a != spec_b or any(not isinstance(u, torch.Tensor) or u.shape != v.shape for u, v in zip(a, b)):
            vars(c).clear()
            vars(c).update(vars(x))
        return c
    return pytree.tree_map(swap, out, is_leaf=lambda x: isinstance(x, cls))
