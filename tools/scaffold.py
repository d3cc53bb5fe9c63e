"""`passlab new-pass NAME`: a new pass module and its test, from a template.

In-tree, the pass lands in passes/NAME.py of the checkout you stand in (the
current folder or one above it; `--dir` names another), where the registry
imports it, and its test in tests/test_pass_NAME.py; the contract tests cover
it from then on.
With `plugin=True` it becomes a package of its own, passlab-NAME, that
registers through the `passlab.passes` entry-point group once pip-installed.
The template is a small, correct pass (x ** 2 -> x * x) that shows the parts
every pass has: match, legality, rewrite, metadata, statistics, an option.
With `rewrite=True` (`--rewrite`) the same rewrite is written the short way:
a pattern and a replacement as PyTorch functions given to `register_rewrite`.
"""
from __future__ import annotations

import keyword
import os
import re

NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

PASS_TEMPLATE = '''\
"""{name}: TODO one line on what it rewrites and why that is faster.

Scaffolded by `passlab new-pass {name}`. The example rewrite, x ** 2 -> x * x
(a multiply is cheaper than pow), shows the parts of a pass: match, check
legality, rewrite, keep meta["val"], count. Replace it with yours; run
`python -m pytest -q {test_path}` and
`passlab run llama --pipeline cleanup,{name} --no-measure` to see it work.
"""
from __future__ import annotations

import torch

from passlab.passes import PassResult, register_pass
from passlab.passes.vocabulary import Counters

aten = torch.ops.aten


@register_pass("{name}")
def {name}(gm: torch.fx.GraphModule, ctx, *, max_rewrites: int = -1) -> PassResult:
    """TODO: one line for `passlab list passes`.

    max_rewrites: stop after this many rewrites (-1: no limit); halve it to
    bisect a miscompile: `{name}(max_rewrites=3)`.
    """
    c = Counters()               # matched / rewritten / skipped{{snake_case_reason}}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.pow.Tensor_Scalar:    # match
            continue
        x, exponent = node.args[:2]
        if exponent != 2:                                                               # legality
            c.count("exponent_not_2")
            continue
        if 0 <= max_rewrites <= c.rewritten:
            c.count("max_rewrites_reached")
            continue
        with gm.graph.inserting_before(node):                                           # rewrite
            square = gm.graph.call_function(aten.mul.Tensor, (x, x))
        node.replace_all_uses_with(square)
        gm.graph.erase_node(node)
        c.count(None)                                                                   # count
    # no recompile or meta["val"] upkeep here: the framework does both after every pass that changed the graph
    return PassResult(gm, c.rewritten > 0, c.as_dict())
'''

REWRITE_TEMPLATE = '''\
"""{name}: TODO one line on what it rewrites and why that is faster.

Scaffolded by `passlab new-pass {name} --rewrite`. A rewrite is a pattern and
its replacement, both plain PyTorch functions of tensors: `register_rewrite`
traces them to core aten the way models are captured and registers the pass
(statistics matched / rewritten / skipped{{reason}}, option `max_rewrites`).
The example, x ** 2 -> x * x (a multiply is cheaper than pow), matches at any
shape and dtype, and also in the bf16 form with casts around it. Replace it
with yours; run `python -m pytest -q {test_path}` and
`passlab run llama --pipeline cleanup,{name} --no-measure` to see it work.

Options of register_rewrite: `free=("eps",)` for literals (parameters with a
default) that may take any value, the replacement receiving the matched one;
`example_inputs=[(8, 16), (16,)]` shapes to trace the pattern at;
`check=fn(match)` legality; `casts=False`; `commutative=False`.
"""
from __future__ import annotations

import torch

from passlab.passes import register_rewrite


def pattern(x):
    return x ** 2


def replacement(x):
    return x * x


def check(match) -> str | None:
    """Legality beyond the structure: a snake_case reason to leave this match alone, or None.
    `match.val("x")` is the matched input's fake tensor (shape, dtype, device)."""
    if not match.val("x").dtype.is_floating_point:
        return "not_floating_point"
    return None


{name} = register_rewrite("{name}", pattern, replacement, check=check)
'''

TEST_TEMPLATE = '''\
"""Tests for the `{name}` pass (scaffolded by `passlab new-pass {name}`).

`check` runs the pass on a captured tiny model and asserts the whole pass
contract: the graph lints, every node keeps meta["val"], weights are not
edited in place, and outputs match eager on fresh random inputs.
"""
import pytest
import torch
{import_line}
from passlab.passes import get_pass
from passlab.passes.contract import check


def test_registered():
    assert get_pass("{name}").name == "{name}"


@pytest.mark.parametrize("model", ["mlp", "transformer", "llama"])
def test_contract(model):
    check("{name}", model)


def test_rewrites_where_its_pattern_occurs():
    """TODO: pick the model (or build a small graph) where your pattern occurs."""
    report = check("{name}", "llama")        # RMSNorm squares its input: pow(x, 2)
    stats = report.result.stats
    assert stats["rewritten"] >= 1
    assert torch.ops.aten.pow.Tensor_Scalar not in [n.target for n in report.result.gm.graph.nodes]


def test_option_limits_rewrites():
    report = check("{name}", "llama", options={{"max_rewrites": 1}})
    assert report.result.stats["rewritten"] == 1
'''

PYPROJECT_TEMPLATE = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "passlab-{dist}"
version = "0.1.0"
description = "The {name} pass for passlab"
requires-python = ">=3.11"
dependencies = ["passlab"]

[project.entry-points."passlab.passes"]
{name} = "passlab_{name}:{name}"

[tool.setuptools]
py-modules = ["passlab_{name}"]
'''


def is_checkout(folder: str) -> bool:
    """A passlab checkout: the package's pyproject.toml and its passes/ API."""
    return os.path.isfile(os.path.join(folder, "pyproject.toml")) and \
        os.path.isfile(os.path.join(folder, "passes", "api.py"))


def checkout_root(start: str | None = None) -> str:
    """The passlab checkout the user stands in: `start` (default: the current
    folder) or the nearest folder above it that is one. Not the installed
    passlab, which may be another checkout or a wheel."""
    here = os.path.abspath(start or os.getcwd())
    folder = here
    while not is_checkout(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            raise ValueError(f"{here} is not inside a passlab checkout (no pyproject.toml with passes/api.py "
                             "here or above): cd into your checkout, give --dir CHECKOUT, or scaffold a plugin "
                             "package with --plugin")
        folder = parent
    return folder


def validate(name: str) -> None:
    if not NAME.match(name or "") or keyword.iskeyword(name):
        raise ValueError(f"bad pass name {name!r}: use a lower_snake_case Python identifier, "
                         "e.g. fuse_rmsnorm (it is also the module and function name)")
    from passlab.passes import list_passes
    if name in list_passes():
        raise ValueError(f"a pass or alias named {name!r} already exists; choose another name "
                         "(see `passlab list passes`)")


def refuse_existing(paths: list[str]) -> None:
    there = [p for p in paths if os.path.exists(p)]
    if there:
        raise ValueError(f"{', '.join(there)} already exists; not overwriting it")


def write(files: dict[str, str]) -> list[str]:
    for path, text in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "x") as f:
            f.write(text)
    return list(files)


def new_pass(name: str, root_dir: str | None = None, *, plugin: bool = False, rewrite: bool = False) -> list[str]:
    """Create the pass module and its test; return the created paths. `root_dir`:
    the checkout (default: the one the current folder is in; with `plugin`, the
    folder the package goes in, default the current one). `rewrite`: the pass as
    a `register_rewrite` pattern and replacement.

    Raises ValueError (with the reason) for a bad or taken name, a file that
    exists already, or a root that is not a passlab checkout.
    """
    validate(name)
    template = REWRITE_TEMPLATE if rewrite else PASS_TEMPLATE
    root = os.path.abspath(root_dir) if root_dir else os.getcwd() if plugin else checkout_root()
    if plugin:
        pkg = os.path.join(root, f"passlab-{name.replace('_', '-')}")
        files = {
            os.path.join(pkg, "pyproject.toml"): PYPROJECT_TEMPLATE.format(name=name, dist=name.replace("_", "-")),
            os.path.join(pkg, f"passlab_{name}.py"):
                template.format(name=name, test_path=f"tests/test_{name}.py"),
            os.path.join(pkg, "tests", f"test_{name}.py"):
                TEST_TEMPLATE.format(name=name, import_line=f"\nimport passlab_{name}  # noqa: F401  registers it"),
        }
    else:
        if not os.path.isdir(os.path.join(root, "passes")):
            raise ValueError(f"{root} is not a passlab checkout (no passes/ folder); give --dir, "
                             "or scaffold a plugin package with --plugin")
        import passlab.passes
        if hasattr(passlab.passes, name) or os.path.isdir(os.path.join(root, "passes", name)):
            raise ValueError(f"passes/{name}.py would shadow passlab.passes.{name}; choose another name")
        test_rel = os.path.join("tests", f"test_pass_{name}.py")
        files = {
            os.path.join(root, "passes", f"{name}.py"): template.format(name=name, test_path=test_rel),
            os.path.join(root, test_rel): TEST_TEMPLATE.format(name=name, import_line=""),
        }
    refuse_existing(list(files))
    return write(files)
