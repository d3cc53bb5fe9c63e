"""Passes: the pass API, the registry, pipelines and the pass manager.

Every module in this folder is imported on first use of the registry, so a
built-in pass registers itself by being here.
"""
from .api import Option, Pass, PassContext, PassResult
from .manager import (CheckNumerics, PassManager, PipelineFailed, PipelineResult, StepRecord,
                      TOLERANCE, relative_error)
from .pipeline import DEFAULT_PIPELINE, PipelineError, parse
from .registry import ALIASES, UnknownPassError, get_pass, list_passes, register_pass, unregister_pass
from .patterns.rewrite import Rewrite, RewriteError, Rules, register_rewrite

__all__ = ["Pass", "PassResult", "PassContext", "Option", "register_pass", "unregister_pass", "get_pass",
           "list_passes", "ALIASES", "parse", "PipelineError", "UnknownPassError", "PassManager",
           "PipelineResult", "PipelineFailed", "StepRecord", "CheckNumerics", "TOLERANCE",
           "relative_error", "DEFAULT_PIPELINE", "register_rewrite", "Rewrite", "RewriteError", "Rules"]
