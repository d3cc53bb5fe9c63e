"""The peers passlab is measured against, one spelling each: PyTorch eager,
torch.compile with its defaults and torch.compile with freezing, and the
settings each is made with (the records and tables name them so)."""

EAGER = "eager"
EAGER_SETTINGS = "the module itself, module.eval(), under torch.no_grad()"
COMPILE, FREEZING = "torch.compile", "torch.compile(freezing)"
PEER_SETTINGS = {COMPILE: ("torch.compile(model) defaults (inductor, mode=None, no freezing)", None),
                 FREEZING: ('torch.compile(model, options={"freezing": True}) (inductor; weights folded '
                            'as constants, the usual CPU inference setting)', {"freezing": True})}


def compiling(options: dict | None):
    """The context for a torch.compile'd callable's first (compiling) call: inductor's
    config patched with `options` as well. Dynamo reads `freezing` while tracing, before
    `options=` is applied, so `torch.compile(m, options={"freezing": True})` alone does
    not freeze (torch 2.13)."""
    import torch
    return torch._inductor.config.patch(options or {})
