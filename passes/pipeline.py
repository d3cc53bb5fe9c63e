"""Pipelines as strings: `cleanup,fuse(max_nodes=16),layout`.

`parse()` turns the string into `[(pass, options)]`, expanding aliases and
checking every option against the pass's declared options, so that a typo is
an error before anything runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .api import Pass
from .registry import ALIASES, get_pass

DEFAULT_PIPELINE = "cleanup,unbroadcast_gemm,fold_batchnorm,group_experts,gather_rows,sum_pairs,fuse_attention,decode_attention,merge_projections,decode_gemm,fuse_epilogue,layout,pack_weights,fuse,overlap_reorder,overlap_chunk,write_in_place"


class PipelineError(ValueError):
    """A pipeline string that cannot be parsed or names bad options."""


@dataclass
class Step:
    pass_: Pass
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self):
        return self.pass_.name

    def __str__(self):
        if not self.options:
            return self.name
        return f"{self.name}({','.join(f'{k}={v}' for k, v in self.options.items())})"


ITEM = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(?:\(([^()]*)\))?\s*$")


def split_items(text: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' in pipeline {text!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise PipelineError(f"unbalanced '(' in pipeline {text!r}")
    items.append(cur)
    return items


def convert(value: str, typ: type, where: str):
    v = value.strip()
    try:
        if typ is bool:
            if v.lower() in ("1", "true", "on", "yes"):
                return True
            if v.lower() in ("0", "false", "off", "no"):
                return False
            raise ValueError
        return typ(v)
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: {v!r} is not a valid {typ.__name__}") from None


def parse_options(p: Pass, text: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if not text or not text.strip():
        return opts
    allowed = ", ".join(f"{k}: {o.type.__name__} = {o.default!r}" for k, o in p.options.items()) or "none"
    for part in text.split(","):
        if "=" not in part:
            raise PipelineError(f"option {part.strip()!r} of pass {p.name!r} needs key=value; "
                                f"allowed options: {allowed}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in p.options:
            raise PipelineError(f"pass {p.name!r} has no option {k!r}; allowed options: {allowed}")
        opts[k] = convert(v, p.options[k].type, f"option {k} of pass {p.name!r}")
    return opts


def parse(text: str | list | None) -> list[Step]:
    if text is None:
        text = DEFAULT_PIPELINE
    if isinstance(text, (list, tuple)):
        text = ",".join(text)
    if not text.strip():
        return []
    steps = []
    for item in split_items(text):
        m = ITEM.match(item)
        if not m:
            raise PipelineError(f"cannot parse pipeline item {item.strip()!r}: "
                                "expected name or name(key=value,...)")
        name, opts = m.group(1), m.group(2)
        if name in ALIASES:
            if opts:
                raise PipelineError(f"alias {name!r} takes no options; name its passes instead: "
                                    f"{','.join(ALIASES[name])}")
            steps.extend(Step(get_pass(n)) for n in ALIASES[name])
            continue
        p = get_pass(name)
        steps.append(Step(p, parse_options(p, opts)))
    return steps


def parse_items(text: str | list | None) -> list[tuple[str, list[Step]]]:
    """The pipeline as its user wrote it: one (item, steps) per top-level item,
    an alias keeping its passes together. Attribution treats each item as one
    player."""
    if text is None:
        text = DEFAULT_PIPELINE
    if isinstance(text, (list, tuple)):
        text = ",".join(text)
    return [(item.strip(), parse(item)) for item in split_items(text) if item.strip()]


def available_default() -> str:
    """The default pipeline, less the passes not registered in this build
    (`missing_default` says which and why)."""
    missing = missing_default()
    return ",".join(n for n in split_items(DEFAULT_PIPELINE) if n not in missing)


def missing_default() -> dict[str, str]:
    """Default passes not registered in this build -> why (the import errors of
    pass modules and plugins, see registry.LOAD_ERRORS)."""
    from .registry import LOAD_ERRORS, list_passes
    known = list_passes()
    why = "; ".join(f"{m}: {e}" for m, e in LOAD_ERRORS.items()) or "no pass module registers it"
    return {n: why for n in split_items(DEFAULT_PIPELINE) if n not in known}
