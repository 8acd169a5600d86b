"""Attention layouts and the named-axis per-head views of Q/K/V/O."""
