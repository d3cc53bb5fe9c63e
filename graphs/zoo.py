"""`zoo:NAME`: real architectures built from configs with random weights, called
as users call them (the model's own forward and outputs, keyword inputs).

Hugging Face models come from graphs/hf.py's configs (nothing is downloaded);
plain torch.nn models are written here as users write them. `MODELS` is the
catalogue: name -> Entry(family, what it is, how to build it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import hf
from .errors import UnknownModelError
from .sample import Sample

TEXT = {"tiny": dict(layers=2, dim=32, heads=4, kv=2, ffn=64, vocab=128, batch=2, seq=8, experts=4),
        "bench": dict(layers=2, dim=256, heads=4, kv=2, ffn=688, vocab=2048, batch=4, seq=128, experts=8)}
VISION = {"tiny": dict(layers=2, dim=32, heads=4, ffn=64, batch=2, image=32, patch=8, widths=(16, 32),
                       depths=(1, 1)),
          "bench": dict(layers=4, dim=192, heads=4, ffn=768, batch=8, image=128, patch=16,
                        widths=(32, 64, 128), depths=(2, 2, 2))}
AUDIO = {"tiny": dict(layers=2, dim=32, heads=4, ffn=64, vocab=128, batch=2, mels=16, frames=32, samples=400,
                      seq=8),
         "bench": dict(layers=4, dim=256, heads=4, ffn=1024, vocab=1024, batch=4, mels=80, frames=400,
                       samples=16000, seq=64)}


@dataclass(frozen=True)
class Entry:
    family: str                      # encoder | decoder | moe | enc-dec | vision | real-size | audio | torch
    description: str
    build: Callable[[str], dict]     # preset -> Sample fields: module, example_inputs / example_kwargs, unit, ...


def fields(module, args=(), kwargs=None, *, unit, units, vocab_size=None) -> dict:
    """What a builder returns: the Sample's fields (the model is called `module(*args, **kwargs)`)."""
    return dict(module=module, example_inputs=tuple(args), example_kwargs=dict(kwargs or {}), unit=unit,
                units_per_forward=units, vocab_size=vocab_size)


# ---------------------------------------------------------------- Hugging Face

def hf_model(arch: str, cls: str, s: dict):
    transformers = hf.require_transformers()
    return getattr(transformers, cls)(hf.config(arch, s))


def text(arch: str, cls: str, *, mask: bool = True, decoder: bool = False, types: bool = False,
         experts: str | None = None):
    """A text model called with input_ids= (and attention_mask=, decoder_input_ids= where it takes them);
    `experts` sets a MoE model's experts implementation (graphs/hf.py's configs ask for batched_mm)."""
    def build(preset):
        s = TEXT[preset]
        m = hf_model(arch, cls, s)
        if experts:
            m.set_experts_implementation(experts)
        shape = (s["batch"], s["seq"])
        kw = {"input_ids": torch.randint(0, s["vocab"], shape)}
        if mask:
            kw["attention_mask"] = torch.ones(shape, dtype=torch.long)
        if types:
            kw["token_type_ids"] = torch.zeros(shape, dtype=torch.long)
        if decoder:
            kw["decoder_input_ids"] = torch.randint(0, s["vocab"], shape)
        return fields(m, kwargs=kw, unit="tokens", units=s["batch"] * s["seq"], vocab_size=s["vocab"])
    return build


def image(arch: str, cls: str):
    def build(preset):
        s = VISION[preset]
        x = torch.randn(s["batch"], 3, s["image"], s["image"])
        return fields(hf_model(arch, cls, s), kwargs={"pixel_values": x}, unit="images", units=s["batch"])
    return build


def published(arch: str, cls: str, kind: str = "image", **inputs):
    """The architecture at its published size (the config class's defaults: ViT-B/16, ResNet-50,
    ConvNeXt-T, Swin-T, MobileNetV2 1.0, BERT-base, GPT-2 small) for the bench preset, batch 1
    at 224x224 (or 128 tokens); the tiny preset is the small model, so tests stay fast."""
    small = image(arch, cls) if kind == "image" else text(arch, cls, **inputs)

    def build(preset):
        if preset != "bench":
            return small(preset)
        import transformers as tf
        config = getattr(tf, hf.CONFIGS[arch][0])(attn_implementation="eager")
        m = getattr(hf.require_transformers(), cls)(config)
        if kind == "image":
            size = getattr(config, "image_size", 224)
            x = torch.randn(1, 3, size, size)
            return fields(m, kwargs={"pixel_values": x}, unit="images", units=1)
        ids = torch.randint(0, config.vocab_size, (1, 128))
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if inputs.get("types"):
            kw["token_type_ids"] = torch.zeros_like(ids)
        return fields(m, kwargs=kw, unit="tokens", units=128, vocab_size=config.vocab_size)
    return build


def whisper_encoder(preset):
    s = AUDIO[preset]
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    hf.require_transformers()
    x = torch.randn(s["batch"], s["mels"], s["frames"])
    return fields(WhisperEncoder(hf.config("whisper", s)), kwargs={"input_features": x}, unit="clips",
                  units=s["batch"])


def wav2vec2(preset):
    s = AUDIO[preset]
    x = torch.randn(s["batch"], s["samples"])
    return fields(hf_model("wav2vec2", "Wav2Vec2Model", s), kwargs={"input_values": x}, unit="clips",
                  units=s["batch"])


# ---------------------------------------------------------------- plain torch.nn, as users write them

class MHABlock(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MHAStack(nn.Module):
    def __init__(self, dim, heads, ffn, layers):
        super().__init__()
        self.blocks = nn.Sequential(*[MHABlock(dim, heads, ffn) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.blocks(x))


def mha_stack(preset):
    s = TEXT[preset]
    x = torch.randn(s["batch"], s["seq"], s["dim"])
    return fields(MHAStack(s["dim"], s["heads"], s["ffn"], s["layers"]), (x,), unit="tokens",
                  units=s["batch"] * s["seq"])


def transformer_encoder(preset):
    s = TEXT[preset]
    layer = nn.TransformerEncoderLayer(s["dim"], s["heads"], s["ffn"], dropout=0.0, batch_first=True,
                                       norm_first=True)
    m = nn.TransformerEncoder(layer, s["layers"], enable_nested_tensor=False)
    x = torch.randn(s["batch"], s["seq"], s["dim"])
    return fields(m, (x,), unit="tokens", units=s["batch"] * s["seq"])


def conv_bn_act(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class DepthwiseSeparableCNN(nn.Module):
    """MobileNet-v1 style: depthwise 3x3 then pointwise 1x1, each with BN + ReLU6."""

    def __init__(self, widths, classes=10):
        super().__init__()
        layers, cin = [conv_bn_act(3, widths[0], 3, 2)], widths[0]
        for i, w in enumerate(widths):
            layers += [conv_bn_act(cin, cin, 3, 1 if i == 0 else 2, groups=cin), conv_bn_act(cin, w, 1)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def dw_cnn(preset):
    s = VISION[preset]
    m = DepthwiseSeparableCNN(s["widths"])
    x = torch.randn(s["batch"], 3, s["image"], s["image"])
    return fields(m, (x,), unit="images", units=s["batch"])


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, twice, with a residual (a diffusion UNet's block)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.c1(nn.functional.silu(self.n1(x)))
        h = self.c2(nn.functional.silu(self.n2(h)))
        return h + self.skip(x)


class UNetBlock(nn.Module):
    """One UNet level: down (ResBlock, strided conv), middle, up (nearest upsample, concat skip, ResBlock)."""

    def __init__(self, ch, mid):
        super().__init__()
        self.stem = nn.Conv2d(3, ch, 3, padding=1)
        self.down, self.pool = ResBlock(ch, ch), nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = ResBlock(ch, mid)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = ResBlock(mid + ch, ch)
        self.out = nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x):
        skip = self.down(self.stem(x))
        h = self.mid(self.pool(skip))
        return self.out(self.dec(torch.cat([self.up(h), skip], dim=1)))


def unet_block(preset):
    s = VISION[preset]
    x = torch.randn(s["batch"], 3, s["image"], s["image"])
    return fields(UNetBlock(s["widths"][0], s["widths"][-1]), (x,), unit="images", units=s["batch"])


# ---------------------------------------------------------------- the catalogue

MODELS: dict[str, Entry] = {
    # encoders
    "bert": Entry("encoder", "BERT (BertModel)", text("bert", "BertModel", types=True)),
    "roberta": Entry("encoder", "RoBERTa (RobertaModel)", text("roberta", "RobertaModel")),
    "distilbert": Entry("encoder", "DistilBERT (DistilBertModel)", text("distilbert", "DistilBertModel")),
    "albert": Entry("encoder", "ALBERT (AlbertModel), shared layers", text("albert", "AlbertModel")),
    "electra": Entry("encoder", "ELECTRA discriminator (ElectraModel)", text("electra", "ElectraModel")),
    "deberta-v2": Entry("encoder", "DeBERTa-v2 (DebertaV2Model), relative attention",
                        text("deberta-v2", "DebertaV2Model")),
    # decoders
    "gpt2": Entry("decoder", "GPT-2 (GPT2LMHeadModel)", text("gpt2", "GPT2LMHeadModel")),
    "gpt-neox": Entry("decoder", "GPT-NeoX (GPTNeoXForCausalLM), rotary", text("gpt-neox", "GPTNeoXForCausalLM")),
    "opt": Entry("decoder", "OPT (OPTForCausalLM)", text("opt", "OPTForCausalLM")),
    "bloom": Entry("decoder", "BLOOM (BloomForCausalLM), ALiBi", text("bloom", "BloomForCausalLM")),
    "llama": Entry("decoder", "Llama (LlamaForCausalLM), GQA", text("llama", "LlamaForCausalLM")),
    "mistral": Entry("decoder", "Mistral (MistralForCausalLM), GQA", text("mistral", "MistralForCausalLM")),
    "qwen2": Entry("decoder", "Qwen2 (Qwen2ForCausalLM), GQA, qkv bias", text("qwen2", "Qwen2ForCausalLM")),
    "phi3": Entry("decoder", "Phi-3 (Phi3ForCausalLM), fused qkv", text("phi3", "Phi3ForCausalLM")),
    "gemma": Entry("decoder", "Gemma (GemmaForCausalLM)", text("gemma", "GemmaForCausalLM")),
    "falcon": Entry("decoder", "Falcon (FalconForCausalLM), multi-query", text("falcon", "FalconForCausalLM")),
    # mixture of experts
    "mixtral": Entry("moe", "Mixtral (MixtralForCausalLM), top-2 of experts, batched_mm",
                     text("mixtral", "MixtralForCausalLM")),
    "qwen2-moe": Entry("moe", "Qwen2-MoE (Qwen2MoeForCausalLM), shared expert, batched_mm",
                       text("qwen2-moe", "Qwen2MoeForCausalLM")),
    "qwen3-moe": Entry("moe", "Qwen3-MoE (Qwen3MoeForCausalLM), top-2, q/k norms, batched_mm",
                       text("qwen3-moe", "Qwen3MoeForCausalLM")),
    "olmoe": Entry("moe", "OLMoE (OlmoeForCausalLM), top-2, batched_mm", text("olmoe", "OlmoeForCausalLM")),
    "gpt-oss": Entry("moe", "GPT-OSS (GptOssForCausalLM), transposed expert weights with biases, batched_mm",
                     text("gpt-oss", "GptOssForCausalLM")),
    "mixtral-grouped": Entry("moe", "Mixtral with Hugging Face's default experts (grouped_mm: sort + grouped GEMM)",
                             text("mixtral", "MixtralForCausalLM", experts="grouped_mm")),
    # encoder-decoder
    "t5": Entry("enc-dec", "T5 (T5Model), relative position buckets", text("t5", "T5Model", decoder=True)),
    "bart": Entry("enc-dec", "BART (BartModel)", text("bart", "BartModel", decoder=True)),
    # vision
    "vit": Entry("vision", "ViT (ViTModel)", image("vit", "ViTModel")),
    "deit": Entry("vision", "DeiT (DeiTModel), distillation token", image("deit", "DeiTModel")),
    "swin": Entry("vision", "Swin (SwinModel), shifted windows", image("swin", "SwinModel")),
    "convnext": Entry("vision", "ConvNeXt (ConvNextModel)", image("convnext", "ConvNextModel")),
    "resnet": Entry("vision", "ResNet (HF ResNetModel), bottlenecks", image("resnet", "ResNetModel")),
    "mobilenet-v2": Entry("vision", "MobileNetV2 (MobileNetV2Model)", image("mobilenet-v2", "MobileNetV2Model")),
    # published sizes (bench preset: the paper's model, batch 1; tiny preset: the small one)
    "vit-b16": Entry("real-size", "ViT-B/16 at 224 (ViTModel, published size)", published("vit", "ViTModel")),
    "resnet-50": Entry("real-size", "ResNet-50 at 224 (HF ResNetModel, published size)",
                       published("resnet", "ResNetModel")),
    "convnext-t": Entry("real-size", "ConvNeXt-T at 224 (ConvNextModel, published size)",
                        published("convnext", "ConvNextModel")),
    "swin-t": Entry("real-size", "Swin-T at 224 (SwinModel, published size)", published("swin", "SwinModel")),
    "mobilenet-v2-1.0": Entry("real-size", "MobileNetV2 1.0 at 224 (depthwise, published size)",
                              published("mobilenet-v2", "MobileNetV2Model")),
    "bert-base": Entry("real-size", "BERT-base, 128 tokens (BertModel, published size)",
                       published("bert", "BertModel", "text", types=True)),
    "gpt2-small": Entry("real-size", "GPT-2 small (124M), 128 tokens (GPT2LMHeadModel, published size)",
                        published("gpt2", "GPT2LMHeadModel", "text")),
    # audio
    "whisper-encoder": Entry("audio", "Whisper encoder (WhisperEncoder), log-mel input", whisper_encoder),
    "wav2vec2": Entry("audio", "Wav2Vec2 (Wav2Vec2Model), raw waveform input", wav2vec2),
    # plain torch.nn
    "mha-stack": Entry("torch", "pre-norm blocks of nn.MultiheadAttention + MLP", mha_stack),
    "transformer-encoder": Entry("torch", "nn.TransformerEncoder of nn.TransformerEncoderLayer", transformer_encoder),
    "dw-cnn": Entry("torch", "depthwise-separable CNN (MobileNet-v1 style, BN + ReLU6)", dw_cnn),
    "unet-block": Entry("torch", "a UNet level: GroupNorm/SiLU ResBlocks, down, up, skip concat", unet_block),
}


def names() -> list[str]:
    return list(MODELS)


def check_names(requested: list[str]) -> list[str]:
    """The requested names, in order; an unknown one raises UnknownModelError listing the known ones."""
    unknown = [n for n in requested if n not in MODELS]
    if unknown:
        import difflib
        hints = [f"{n!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(n, MODELS, n=1))
                             else "") for n in unknown]
        raise UnknownModelError(f"unknown zoo model{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                                f"known: {', '.join(MODELS)}")
    return requested


def build(name: str, preset: str, dtype: torch.dtype, device: str) -> Sample:
    check_names([name])
    entry = MODELS[name]
    torch.manual_seed(0)
    f = entry.build(preset)
    move = lambda t: t.to(device, dtype) if t.dtype.is_floating_point else t.to(device)
    f["module"] = f["module"].eval().to(device, dtype)
    f["example_inputs"] = tuple(move(a) for a in f["example_inputs"])
    f["example_kwargs"] = {k: move(v) for k, v in f["example_kwargs"].items()}
    shapes = ", ".join([str(tuple(a.shape)) for a in f["example_inputs"]] +
                       [f"{k}={tuple(v.shape)}" for k, v in f["example_kwargs"].items()])
    return Sample(f"zoo:{name}", dtype=dtype, device=device, preset=preset,
                  description=f"{entry.description}; {shapes}", **f)
