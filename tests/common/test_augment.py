"""Intensity augmentation: what another scanner might make of the same image, drawn repeatably."""

from __future__ import annotations

import pytest
import torch

from common.task import Batchable, augment_intensity, train


def _images(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, 1, 16, 16), generator=g)


def test_augmentation_is_repeatable_from_its_seed_and_leaves_the_input_alone() -> None:
    x = _images()
    before = x.clone()
    a = augment_intensity(x, torch.Generator().manual_seed(5))
    b = augment_intensity(x, torch.Generator().manual_seed(5))
    c = augment_intensity(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before) and a.shape == x.shape


def test_each_image_gets_its_own_contrast_and_brightness_but_keeps_its_anatomy() -> None:
    x = _images(64)
    out = augment_intensity(x, torch.Generator().manual_seed(1))
    means = out.mean(dim=(1, 2, 3))
    assert means.std() > 0.03  # brightness/contrast differ between images of the same distribution
    # the pixel order within an image is kept: the augmented image is still strongly correlated with its source
    corr = [torch.corrcoef(torch.stack([x[i].ravel(), out[i].ravel()]))[0, 1] for i in range(len(x))]
    assert min(corr) > 0.8


def test_training_with_augmentation_is_repeatable_and_differs_from_training_without() -> None:
    x = _images(16)
    y = (x > 0.7).long()
    data = Batchable(x, y)

    def trained(augment: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
        train(model, data, epochs=1, batch_size=4, lr=0.01, seed=3, augment=augment)
        return model.state_dict()

    a, b, plain = trained("intensity"), trained("intensity"), trained("none")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], plain[k]) for k in a)


def test_an_unknown_augmentation_is_refused_naming_the_choices() -> None:
    data = Batchable(_images(4), torch.zeros((4, 1, 16, 16), dtype=torch.long))
    with pytest.raises(ValueError, match="intensity, none"):
        train(torch.nn.Conv2d(1, 2, 1), data, epochs=1, batch_size=2, lr=0.01, augment="elastic")
