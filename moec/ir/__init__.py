"""moec's graph IR: types, graph, op registry (core and moe dialects), text printer and parser,
verifier and reference interpreter. Imports neither torch nor tvm."""

from moec.ir.builder import IRBuilder, make_node
from moec.ir.graph import Graph, Node, Value
from moec.ir.interpreter import interpret
from moec.ir.parser import parse
from moec.ir.printer import print_graph
from moec.ir.registry import REQUIRED, OpDef, all_ops, get_op, register_op
from moec.ir.types import DType, Sym, SymExpr, TensorType
from moec.ir.verifier import verify

__all__ = ["IRBuilder", "Graph", "Node", "Value", "interpret", "parse", "print_graph",
           "REQUIRED", "OpDef", "all_ops", "get_op", "register_op", "DType", "Sym", "SymExpr",
           "TensorType", "verify", "make_node"]
