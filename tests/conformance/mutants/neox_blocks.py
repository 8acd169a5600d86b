"""Defect: GPT-NeoX's fused query_key_value read as [Q | K | V] blocks (the GPT-2 / Phi-3
packing), although its rows are grouped per head, [H, 3, dh]. The quick profile, which
draws every supported architecture at least once, catches it.
"""

from .collector import CollectorAdapter, _rows, head_geometry, qkov_mask

DEFECT = "GPT-NeoX rows read as [Q | K | V] blocks"
FAILS = {"slices_agreement", "slices_semantic"}
DIAGNOSIS = "covers the oracle's slices"


class Adapter(CollectorAdapter):
    name = "mutant:neox_blocks"

    def qkov_mask(self, model, layer, head, block):
        if model.config.model_type == "gpt_neox" and block != "O":
            H, _, dh = head_geometry(model.config)
            name = f"gpt_neox.layers.{layer}.attention.query_key_value.weight"
            start = "QKV".index(block) * H * dh + head * dh
            return _rows(dict(model.named_parameters())[name], start, dh, name)
        return qkov_mask(model, layer, head, block)
