"""moec: a compiler for Mixture-of-Experts inference on Apache TVM."""

__version__ = "0.1.0"
