"""The tiny classifiers: shapes, seeding, eval mode, the batches they take, bad configs."""

import pytest
import torch

from fisher_ref.testing.classifiers import (
    CLASSIFIER_ARCHS,
    ClassifierConfig,
    TinyViT,
    build_classifier,
    classifier_batch,
)


@pytest.mark.parametrize("arch", CLASSIFIER_ARCHS)
def test_logits_per_row_and_seeded_weights(arch):
    cfg = ClassifierConfig(arch=arch, num_classes=5)
    model = build_classifier(cfg, dtype=torch.float64)
    batch = classifier_batch(cfg, batch_size=3, seed=1)
    assert not model.training
    assert model(batch["input"]).shape == (3, 5)
    again = build_classifier(cfg, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    other = build_classifier(ClassifierConfig(arch=arch, num_classes=5, seed=1), dtype=torch.float64)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))


def test_vit_patches_are_2x2_blocks_in_row_major_order():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    patches = TinyViT.patches(image)
    assert patches.shape == (1, 4, 4)
    assert patches[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert patches[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_batch_empty_rows_and_ids():
    batch = classifier_batch(ClassifierConfig(), batch_size=3, empty_rows=(1,), sample_ids=["a", "b", "c"])
    assert batch["labels"][1] == -100 and batch["sample_ids"] == ["a", "b", "c"]
    assert batch["input"].shape == (3, 6)


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "resnet"}, "arch: expected one of"),
    ({"arch": "vit", "width": 5, "num_heads": 2}, "multiple of num_heads"),
    ({"num_classes": 1}, "at least 2"),
    ({"width": 0}, "width: expected an integer >= 1"),
], ids=["arch", "vit-width", "classes", "width"])
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierConfig(**kwargs)


def test_bad_batch_ids():
    with pytest.raises(ValueError, match="expected 2 ids"):
        classifier_batch(ClassifierConfig(), batch_size=2, sample_ids=[1])
