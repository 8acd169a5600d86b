"""Defect: head_dim assumed to be hidden_size / num_heads, ignoring the config's head_dim."""

from .collector import CollectorAdapter, qkov_mask

DEFECT = "head_dim assumed d/H"
FAILS = {"slices_partition", "slices_agreement", "slices_semantic"}


class _NoHeadDim:
    def __init__(self, config):
        self._c = config

    def __getattr__(self, name):
        if name == "head_dim":
            return None
        return getattr(self._c, name)


class _View:
    def __init__(self, model):
        self._m, self.config = model, _NoHeadDim(model.config)

    def named_parameters(self):
        return self._m.named_parameters()


class Adapter(CollectorAdapter):
    name = "mutant:head_dim_from_hidden"
    architectures = ("llama", "mistral", "qwen2")

    def qkov_mask(self, model, layer, head, block):
        return qkov_mask(_View(model), layer, head, block)  # head_dim = hidden // heads
