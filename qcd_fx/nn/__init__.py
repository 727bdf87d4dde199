"""Modules the passes insert: the interface gate (QCI) and state compression (CSC)."""

from .compression import StateCompression, compression_mask
from .interface import InterfaceGate

__all__ = ["InterfaceGate", "StateCompression", "compression_mask"]
