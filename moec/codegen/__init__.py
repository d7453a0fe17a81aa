"""Code generation: moec's TVM kernel library and the LLVM host target it is built for."""
