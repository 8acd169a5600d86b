"""Random HF-style batches with padding and empty rows, for tests and properties."""

from __future__ import annotations

import torch


def random_batch(
    *,
    kind: str = "causal",
    vocab_size: int = 11,
    batch_size: int = 4,
    seq_len: int = 6,
    num_labels: int = 3,
    empty_rows: tuple[int, ...] = (),
    pad: bool = True,
    seed: int = 0,
    sample_ids: list | None = None,
) -> dict:
    """A batch for a ``kind`` in {"causal", "mlm", "cls"} loss.

    Rows are right-padded to random lengths (``pad=True``); padding has
    ``attention_mask == 0`` and label ``-100``. A row listed in ``empty_rows`` has no active
    label token (for ``cls``, label ``-100``). For ``mlm`` about half of the real tokens carry
    a label (at least one per non-empty row).
    """
    if kind not in ("causal", "mlm", "cls"):
        raise ValueError(f"Unknown batch kind: expected 'causal', 'mlm' or 'cls', got {kind!r}.")
    g = torch.Generator().manual_seed(seed)
    B, T = batch_size, seq_len
    input_ids = torch.randint(1, vocab_size, (B, T), generator=g)
    if pad:
        lengths = torch.randint(2 if kind == "causal" else 1, T + 1, (B,), generator=g)
    else:
        lengths = torch.full((B,), T)
    pos = torch.arange(T).expand(B, T)
    attention_mask = (pos < lengths[:, None]).long()
    input_ids = torch.where(attention_mask.bool(), input_ids, torch.zeros_like(input_ids))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if kind == "causal":
        labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    elif kind == "mlm":
        keep = (torch.rand((B, T), generator=g) < 0.5) & attention_mask.bool()
        keep[torch.arange(B), 0] = True  # every row keeps at least one label
        labels = torch.where(keep, input_ids, torch.full_like(input_ids, -100))
    else:
        labels = torch.randint(0, num_labels, (B,), generator=g)
    for r in empty_rows:
        labels[r] = -100
    batch["labels"] = labels
    if sample_ids is not None:
        if len(sample_ids) != B:
            raise ValueError(f"sample_ids: expected {B} ids, got {len(sample_ids)}.")
        batch["sample_ids"] = list(sample_ids)
    return batch


def concat_batches(batches: list[dict]) -> dict:
    """Stack batches row-wise, right-padding tensors with a sequence axis to a common length."""
    if not batches:
        raise ValueError("concat_batches: expected at least one batch, got none.")
    out: dict = {}
    for key in batches[0]:
        vals = [b[key] for b in batches]
        if key == "sample_ids":
            out[key] = [i for v in vals for i in v]
            continue
        if vals[0].dim() >= 2:
            T = max(v.shape[1] for v in vals)
            fill = -100 if key == "labels" else 0
            vals = [torch.nn.functional.pad(v, (0, T - v.shape[1]), value=fill) for v in vals]
        out[key] = torch.cat(vals)
    return out
