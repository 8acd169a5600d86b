"""Defect: GPT-2's output projection sliced by columns, as for a torch Linear, although HF
Conv1D stores it [in, out] so a head's entries are rows.
"""

from .collector import CollectorAdapter, _cols, head_geometry, qkov_mask

DEFECT = "GPT-2 O sliced by columns"
FAILS = {"slices_semantic", "slices_agreement"}


class Adapter(CollectorAdapter):
    name = "mutant:gpt2_o_columns"
    architectures = ("gpt2",)

    def qkov_mask(self, model, layer, head, block):
        if block == "O" and model.config.model_type == "gpt2":
            _, _, dh = head_geometry(model.config)
            name = f"transformer.h.{layer}.attn.c_proj.weight"
            return _cols(dict(model.named_parameters())[name], head * dh, dh, name)
        return qkov_mask(model, layer, head, block)
