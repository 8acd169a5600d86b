"""Defect: a layer's attention weights found by substring: every parameter whose name
contains ``h.{layer}`` and ``c_attn`` (GPT-2), so layer 1 also takes layers 10 to 19.
Invisible with at most 2 layers; the scale profile's 12 layers catch it.
"""

import torch

from .collector import CollectorAdapter, head_geometry, qkov_mask

DEFECT = "layer names matched by substring (h.1 matches h.11)"
FAILS = {"slices_partition", "slices_agreement"}
PROFILE = "scale"
DIAGNOSIS = "L11"


class Adapter(CollectorAdapter):
    name = "mutant:layer_substring"
    architectures = ("gpt2",)

    def qkov_mask(self, model, layer, head, block):
        if block == "O":
            return qkov_mask(model, layer, head, block)
        H, KV, dh = head_geometry(model.config)
        start = {"Q": head * dh, "K": H * dh + head * dh, "V": 2 * H * dh + head * dh}[block]
        out = {}
        for name, p in model.named_parameters():
            if f"h.{layer}" in name and "c_attn.weight" in name:
                m = torch.zeros(p.shape, dtype=torch.bool)
                m[:, start:start + dh] = True
                out[name] = m
        return out
