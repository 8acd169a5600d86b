"""Defect: in a fused QKV projection with grouped-query attention (Phi-3), V is assumed to
start after H key heads instead of H_kv.
"""

from .collector import CollectorAdapter, _rows, head_geometry, qkov_mask

DEFECT = "fused-GQA V offset"
FAILS = {"slices_partition", "slices_agreement", "slices_semantic"}


class Adapter(CollectorAdapter):
    name = "mutant:fused_gqa_v_offset"
    architectures = ("phi3",)

    def qkov_mask(self, model, layer, head, block):
        if block == "V" and model.config.model_type == "phi3":
            H, KV, dh = head_geometry(model.config)
            name = f"model.layers.{layer}.self_attn.qkv_proj.weight"
            start = 2 * H * dh + (head // (H // KV)) * dh  # wrong: K has KV heads, not H
            return _rows(dict(model.named_parameters())[name], start, dh, name)
        return qkov_mask(model, layer, head, block)
