"""Adapters behind the conformance protocol, and the short names ``fishercheck conform`` accepts.

``fisher_fast_adapters`` drives fisher_fast as a user would; ``fisher_ref``'s own adapter lives
with the oracle (``fisher_ref.conformance.builtin_adapters``).
"""

from __future__ import annotations

from fisher_ref.conformance.adapter import load_adapter

from .fisher_fast_adapters import FisherFast32Adapter, FisherFastAdapter, FisherFastCudaAdapter, fast_loss

ALIASES = {
    "fisher_fast": "fishercheck.adapters:FisherFastAdapter",
    "fisher_fast32": "fishercheck.adapters:FisherFast32Adapter",
    "fisher_fast_cuda": "fishercheck.adapters:FisherFastCudaAdapter",
    "fisher_ref": "fisher_ref.conformance.builtin_adapters:ReferenceAdapter",
}

__all__ = ["ALIASES", "FisherFast32Adapter", "FisherFastAdapter", "FisherFastCudaAdapter",
           "fast_loss", "resolve"]


def resolve(spec: str) -> object:
    """An adapter from a short name (``fisher_fast``, ``fisher_fast32``, ``fisher_fast_cuda``,
    ``fisher_ref``) or a ``package.module:object`` spec.
    """
    return load_adapter(ALIASES.get(spec, spec))
