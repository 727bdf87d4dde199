"""Modules the passes insert (interface gate, state compression) and the seed's fractal layer."""

from .compression import StateCompression, compression_mask
from .fractal import FractalLayer
from .interface import InterfaceGate

__all__ = ["FractalLayer", "InterfaceGate", "StateCompression", "compression_mask"]
