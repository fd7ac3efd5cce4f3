"""Per-sample gradients for DP-SGD: fedsite's Opacus grad samplers and the vmap path against one-sample autograd."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from client.dpsgd import train_private
from client.per_sample import prepare, vmap_grad_samples
from common.config import parse_run_config
from common.model import build_model
from common.task import Batchable, loss_function

TINY = {"data.image-size": 32, "model.channels": "4,8,8,16"}


def _one_at_a_time(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Each sample's gradient of its own loss, one backward pass per sample: ``(B, *p.shape)`` per parameter."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(g) for g in zip(*grads, strict=True)]


@pytest.mark.parametrize(
    "layer",
    [
        nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1), nn.PReLU()),
        nn.Sequential(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2), nn.PReLU(4)),
        nn.Sequential(nn.ConvTranspose2d(6, 6, (4, 2), stride=(3, 1), padding=(2, 0), dilation=(1, 2)), nn.PReLU(6)),
    ],
)
def test_opacus_hooks_give_each_samples_own_gradient_for_prelu_and_transposed_convolution(layer: nn.Module) -> None:
    from opacus import GradSampleModule

    prepare(layer)
    x = torch.randn(5, 6, 7, 9, generator=torch.Generator().manual_seed(0))

    def loss(out, _):
        return (out**2).sum()

    expected = _one_at_a_time(layer, loss, x, x)
    wrapped = GradSampleModule(layer, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (wrapped(x) ** 2).sum().backward()
    for p, e in zip(layer.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad_sample, e, rtol=1e-4, atol=1e-5)
    wrapped._close()


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_vmap_gives_each_samples_own_gradient_for_both_default_networks(task: str) -> None:
    cfg = parse_run_config({**TINY, "task.name": task})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task)
    x = torch.rand(4, 1, 32, 32)
    y = (x > 0.7).long() if task == "segmentation" else torch.tensor([0, 1, 1, 0])
    loss_fn = loss_function(task)
    expected = _one_at_a_time(model, loss_fn, x, y)
    loss = vmap_grad_samples(model, loss_fn, x, y)
    scale = max(float(e.abs().max()) for e in expected)  # biases before a norm layer have ~0 gradient
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad_sample, e, rtol=1e-3, atol=1e-5 * scale)
    with torch.no_grad():
        per_sample_losses = [float(loss_fn(model(x[i : i + 1]), y[i : i + 1])) for i in range(4)]
    assert float(loss) == pytest.approx(sum(per_sample_losses) / 4, rel=1e-5)
    assert loss_fn(model(x), y).isfinite()  # the loss object is left as it was (labels, not one-hot)


@pytest.mark.parametrize("mode", ["vmap", "hooks"])
def test_dp_sgd_trains_the_default_classification_resnet(mode: str) -> None:
    cfg = parse_run_config({**TINY, "task.name": "classification"})
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Batchable(torch.rand(16, 1, 32, 32), torch.tensor([0, 1] * 8))
    out = train_private(
        model,
        data,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        task="classification",
        grad_sample_mode=mode,
    )
    assert out.steps >= 1 and len(out.history) == 1 and out.history[0][2] == out.steps
    assert set(model.state_dict()) == set(before)
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in before)
