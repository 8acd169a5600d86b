"""A correct third-party style Fisher collector, and its conformance adapter.

This is the kind of code the harness is for: a class that loops over batches, takes
per-sample gradients with plain autograd, accumulates squared gradients, slices attention
heads by index arithmetic, and runs a permutation test. It knows nothing of fisher_ref or
fisher_fast. Each mutant in this package subclasses it and overrides one method with one
classic defect, so a mutant differs from a passing implementation by exactly that defect.
"""

from __future__ import annotations

import numpy as np
import torch


def active_label_counts(batch: dict) -> torch.Tensor:
    """Active label tokens per row: the shifted labels[:, 1:] != -100 of a causal LM, or
    labels != -100 of a classifier (one label per row).
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        return (labels != -100).long()
    return (labels[:, 1:] != -100).sum(1)


class FisherCollector:
    """Per-sample gradients -> E[g²], (E[g])², per-sample contributions."""

    def __init__(self, model, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.sum_sq = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.params.items()}
        self.sum_g = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.params.items()}
        self.count = 0
        self.ids: list = []
        self.contribs: dict[str, list] = {n: [] for n in self.params}

    def sample_gradients(self, batch: dict):
        """Yield (sample_id, {name: grad}) for every non-empty row of the batch."""
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        losses = self.loss_fn(self.model, inputs)
        keep = active_label_counts(batch) > 0
        for i, sid in enumerate(batch["sample_ids"]):
            if keep[i]:
                grads = torch.autograd.grad(losses[i], list(self.params.values()), retain_graph=True,
                                            allow_unused=True)
                yield sid, {n: (torch.zeros_like(p) if g is None else g).double()
                            for (n, p), g in zip(self.params.items(), grads, strict=False)}

    def update(self, batch: dict) -> None:
        for sid, grads in self.sample_gradients(batch):
            self.accumulate(grads)
            self.store_contribution(sid, grads)
            self.count += 1

    def accumulate(self, grads: dict) -> None:
        for n, g in grads.items():
            self.sum_sq[n] += g * g
            self.sum_g[n] += g

    def store_contribution(self, sid, grads: dict) -> None:
        self.ids.append(sid)
        for n, g in grads.items():
            self.contribs[n].append(g * g)

    def fisher(self) -> dict:
        return {n: s / self.count for n, s in self.sum_sq.items()}

    def squared_mean(self) -> dict:
        return {n: (s / self.count) ** 2 for n, s in self.sum_g.items()}

    def contributions(self):
        return list(self.ids), {n: torch.stack(v) for n, v in self.contribs.items()}

    # --------------------------------------------------------------- true Fisher
    def class_gradients(self, batch: dict):
        """Yield (probabilities [C], [per-class squared gradient dicts]) for every active
        label (a unit: a token of a causal LM, a row of a classifier).
        """
        inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
        logits, targets = self.loss_fn.logits_and_targets(self.model, inputs)
        logp = torch.log_softmax(logits, -1)
        for i, t in (targets != -100).nonzero().tolist():
            per_class = []
            for c in range(logits.shape[-1]):
                grads = torch.autograd.grad(-logp[i, t, c], list(self.params.values()),
                                            retain_graph=True, allow_unused=True)
                per_class.append({n: (torch.zeros_like(p) if g is None else g).double() ** 2
                                  for (n, p), g in zip(self.params.items(), grads, strict=False)})
            yield logp[i, t].detach().exp().double(), per_class

    def true_fisher(self, batches, weights_of):
        """Mean over units of sum_c weights_of(p)[c] * g_c^2."""
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.params.items()}
        units = 0
        for batch in batches:
            for p, per_class in self.class_gradients(batch):
                w = weights_of(p)
                for c, sq in enumerate(per_class):
                    for n in total:
                        total[n] += w[c] * sq[n]
                units += 1
        return {n: t / units for n, t in total.items()}


# ----------------------------------------------------------------------------- attention

def head_geometry(config):
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv, head_dim


def qkov_mask(model, layer: int, head: int, block: str) -> dict:
    """Index arithmetic for GPT-2 (fused Conv1D), LLaMA-family, Phi-3 (fused rows) and
    GPT-NeoX (fused rows grouped per head, [H, 3, dh]).
    """
    cfg = model.config
    H, KV, dh = head_geometry(cfg)
    params = dict(model.named_parameters())
    kvh = head // (H // KV)
    if cfg.model_type == "gpt_neox":
        pre = f"gpt_neox.layers.{layer}.attention."
        if block == "O":
            return _cols(params[pre + "dense.weight"], head * dh, dh, pre + "dense.weight")
        start = (head * 3 + "QKV".index(block)) * dh
        return _rows(params[pre + "query_key_value.weight"], start, dh, pre + "query_key_value.weight")
    if cfg.model_type == "gpt2":
        pre = f"transformer.h.{layer}.attn."
        if block == "O":
            return _rows(params[pre + "c_proj.weight"], head * dh, dh, pre + "c_proj.weight")
        start = {"Q": head * dh, "K": H * dh + kvh * dh, "V": 2 * H * dh + kvh * dh}[block]
        return _cols(params[pre + "c_attn.weight"], start, dh, pre + "c_attn.weight")
    pre = f"model.layers.{layer}.self_attn."
    if block == "O":
        return _cols(params[pre + "o_proj.weight"], head * dh, dh, pre + "o_proj.weight")
    if cfg.model_type == "phi3":
        start = {"Q": head * dh, "K": H * dh + kvh * dh, "V": H * dh + KV * dh + kvh * dh}[block]
        return _rows(params[pre + "qkv_proj.weight"], start, dh, pre + "qkv_proj.weight")
    name = pre + {"Q": "q_proj", "K": "k_proj", "V": "v_proj"}[block] + ".weight"
    start = head * dh if block == "Q" else kvh * dh
    return _rows(params[name], start, dh, name)


def _rows(p, start, n, name):
    m = torch.zeros(p.shape, dtype=torch.bool)
    m[start:start + n] = True
    return {name: m}


def _cols(p, start, n, name):
    m = torch.zeros(p.shape, dtype=torch.bool)
    m[:, start:start + n] = True
    return {name: m}


def num_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


# ----------------------------------------------------------------------------- statistics

def mean_between_cosine(ga: np.ndarray, gb: np.ndarray) -> float:
    na = ga / np.maximum(np.linalg.norm(ga, axis=1, keepdims=True), 1e-300)
    nb = gb / np.maximum(np.linalg.norm(gb, axis=1, keepdims=True), 1e-300)
    return float((na @ nb.T).mean())


def permutation_pvalue(ga: np.ndarray, gb: np.ndarray, n_permutations: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([ga, gb])
    observed = mean_between_cosine(ga, gb)
    null = []
    for _ in range(n_permutations):
        perm = rng.permutation(len(pooled))
        null.append(mean_between_cosine(pooled[perm[:len(ga)]], pooled[perm[len(ga):]]))
    return (1 + sum(v <= observed for v in null)) / (n_permutations + 1)


def bh(pvalues, method: str = "bh") -> np.ndarray:
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    order = np.argsort(p)
    scale = m * (np.sum(1.0 / np.arange(1, m + 1)) if method == "by" else 1.0)
    q = p[order] * scale / np.arange(1, m + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


# ----------------------------------------------------------------------------- the adapter

LM_ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox")


class CollectorAdapter:
    """The conformance adapter of FisherCollector (about thirty lines, as in docs)."""

    name = "collector"
    collector_class = FisherCollector
    families = ("causal_lm", "classifier")
    architectures = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox", "mlp", "cnn",
                     "ln_gelu")
    row_reductions = ("mean", "sum")

    def _collect(self, model, batches, loss_fn):
        collector = self.collector_class(model, loss_fn)
        for batch in batches:
            collector.update(batch)
        return collector

    def empirical_fisher(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        return self._collect(model, batches, loss_fn).fisher()

    def squared_mean_gradient(self, model, batches, *, loss_fn, unit="sample", weighting="sample"):
        return self._collect(model, batches, loss_fn).squared_mean()

    def per_sample_contributions(self, model, batches, *, loss_fn):
        return self._collect(model, batches, loss_fn).contributions()

    def qkov_mask(self, model, layer, head, block):
        return qkov_mask(model, layer, head, block)

    def phi(self, g, signed):
        return g if signed else g.abs()

    def interference(self, model, batches_a, batches_b, *, loss_fn, signed=False, eps=1e-12):
        ca = self._collect(model, batches_a, loss_fn)
        ids_a, contrib_a = ca.contributions()
        fisher_a = ca.fisher()
        grads_b = [g for b in batches_b for _, g in self.collector_class(model, loss_fn).sample_gradients(b)]
        H, _, _ = head_geometry(model.config)
        L = num_layers(model.config)
        out = {blk: torch.zeros(len(ids_a), len(grads_b), L, H, dtype=torch.float64) for blk in "QKVO"}
        for blk in "QKVO":
            for layer in range(L):
                for h in range(H):
                    for name, m in self.qkov_mask(model, layer, h, blk).items():
                        ratio = contrib_a[name][:, m] / (fisher_a[name][m] + eps)  # [N_A, |I|]
                        phi_b = torch.stack([self.phi(g[name][m], signed) for g in grads_b])
                        out[blk][:, :, layer, h] += ratio @ phi_b.T
        return out

    def conflict_pvalues(self, model, batches_a, batches_b, *, loss_fn, n_permutations, seed):
        def grads(batches):
            c = self.collector_class(model, loss_fn)
            return [g for b in batches for _, g in c.sample_gradients(b)]

        ga, gb = grads(batches_a), grads(batches_b)
        return {name: self.pvalue(np.stack([g[name].flatten().numpy() for g in ga]),
                                  np.stack([g[name].flatten().numpy() for g in gb]),
                                  n_permutations, seed)
                for name in ga[0]}

    def pvalue(self, ga, gb, n_permutations, seed):
        return permutation_pvalue(ga, gb, n_permutations, seed)

    def fdr_qvalues(self, pvalues, *, method="bh"):
        return bh(pvalues, method)

    def exact_fisher(self, model, batches, *, loss_fn, unit="token"):
        return self.collector_class(model, loss_fn).true_fisher(batches, lambda p: p)

    def mc_fisher(self, model, batches, *, loss_fn, unit="token", n_samples=1, seed=0):
        gen = torch.Generator().manual_seed(seed)
        collector = self.collector_class(model, loss_fn)
        return collector.true_fisher(batches, lambda p: self.draw(p, n_samples, gen))

    def draw(self, p, n_samples, gen):
        """The share of each class among n draws from p (the Monte-Carlo weights)."""
        draws = torch.multinomial(p, n_samples, replacement=True, generator=gen)
        return torch.bincount(draws, minlength=p.numel()).double() / n_samples
