"""Passes over the IR: the Pass API, the rewriter, PassManager with instruments, and the built-in
passes (one per file). Imports neither torch nor tvm."""

from moec.passes.base import (
    Pass,
    PassContext,
    get_pass,
    pass_origin,
    plugin_problems,
    register_pass,
    registered_passes,
    reload_plugins,
)
from moec.passes.manager import (
    DumpIR,
    Instrument,
    NumericCheck,
    PassManager,
    PassTiming,
    PrintStats,
    insert_pass,
    parse_pipeline,
    relative_error,
)
from moec.passes.pipelines import PIPELINES
from moec.passes.rewriter import (
    P,
    RewritePattern,
    Rewriter,
    apply_patterns,
    eliminate_dead_code,
    match,
)

__all__ = ["Pass", "PassContext", "get_pass", "pass_origin", "plugin_problems", "register_pass",
           "registered_passes", "reload_plugins", "DumpIR", "Instrument", "NumericCheck",
           "PassManager", "PassTiming", "PrintStats", "insert_pass", "parse_pipeline",
           "relative_error", "PIPELINES", "P", "Rewriter", "RewritePattern", "apply_patterns",
           "eliminate_dead_code", "match"]
