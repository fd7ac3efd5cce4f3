"""Start weights (``model.init``), the segmentation network's head, and pre-training on public phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import task
from common.config import ConfigError, ModelConfig, parse_run_config
from common.model import build_model, load_start_weights

SMALL = ModelConfig(channels="8,16,32")


def _saved(path: Path, cfg: ModelConfig = SMALL, *, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_model(cfg).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_run_folder_starts_the_model_from_its_final_model(tmp_path: Path) -> None:
    state = _saved(tmp_path / "run" / "final_model.pt")
    torch.manual_seed(2)
    model = build_model(SMALL)
    assert not _same(model, state)
    used = load_start_weights(model, str(tmp_path / "run"))
    assert used == tmp_path / "run" / "final_model.pt"
    assert _same(model, state)


def test_a_state_dict_file_starts_the_model_from_its_weights(tmp_path: Path) -> None:
    state = _saved(tmp_path / "weights.pt")
    model = build_model(SMALL)
    load_start_weights(model, str(tmp_path / "weights.pt"))
    assert _same(model, state)


def test_weights_of_another_architecture_are_refused_naming_the_keys_and_the_fix(tmp_path: Path) -> None:
    _saved(tmp_path / "w.pt", ModelConfig(channels="8,16,32,64"))  # one level more, the same first widths
    with pytest.raises(ConfigError) as err:
        load_start_weights(build_model(SMALL), str(tmp_path / "w.pt"))
    msg = str(err.value)
    assert "model.init" in msg and "unexpected" in msg and "of another shape" in msg
    assert "model.channels" in msg  # the fix


def test_weights_missing_layers_are_refused_naming_the_missing_keys(tmp_path: Path) -> None:
    state = _saved(tmp_path / "w.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"2 missing \(head.bias, head.weight\)"):
        load_start_weights(build_model(SMALL), str(tmp_path / "w.pt"))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "not a PyTorch state dict"),
        (lambda p: torch.save([1, 2, 3], p), "not a state dict"),
    ],
)
def test_a_start_model_that_is_not_a_state_dict_names_what_to_give(tmp_path: Path, make, expected: str) -> None:
    path = tmp_path / "start.pt"
    make(path)
    with pytest.raises(ConfigError, match=expected):
        load_start_weights(build_model(SMALL), str(path))


def test_an_mlflow_uri_is_resolved_by_the_given_fetcher_only(tmp_path: Path) -> None:
    state = _saved(tmp_path / "art" / "final_model.pt")
    with pytest.raises(ConfigError, match="MLflow URI"):
        load_start_weights(build_model(SMALL), "runs:/abc/final_model.pt")
    model = build_model(SMALL)
    load_start_weights(model, "runs:/abc/final_model.pt", fetch=lambda uri: tmp_path / "art" / uri.rsplit("/", 1)[1])
    assert _same(model, state)


def test_model_init_is_a_run_config_key_and_empty_by_default() -> None:
    assert parse_run_config({}).model.init == ""
    assert parse_run_config({"model.init": "/runs/a"}).model.init == "/runs/a"


def _lesion_images(n: int, size: int, contrast: float, seed: int) -> task.Batchable:
    """Noisy images holding one bright disc each (``contrast`` above a textured organ), and its mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        cy, cx = torch.randint(6, size - 6, (2,), generator=g).tolist()
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= 9
        organ = 0.5 + 0.1 * torch.rand(size, size, generator=g)
        img = organ + contrast * disc + 0.05 * torch.randn(size, size, generator=g)
        images.append(img[None].float())
        labels.append(disc[None].long())
    return task.Batchable(torch.stack(images), torch.stack(labels))


def test_the_segmentation_network_finds_a_bright_lesion_within_thirty_steps() -> None:
    """A lesion 0.3 above its organ (6 noise sigmas) covers ~3% of each image; 30 Adam steps find it."""
    torch.set_num_threads(1)
    train = _lesion_images(80, 32, 0.3, seed=0)
    val = _lesion_images(16, 32, 0.3, seed=1)
    torch.manual_seed(0)
    model = build_model(SMALL)
    result = task.train(model, train, epochs=3, batch_size=8, lr=3e-3, seed=0)
    assert result.steps == 30
    assert task.evaluate(model, val)["dice"] > 0.8  # the UNet without its head: 0.58


def test_pretraining_writes_a_start_model_that_loads_and_says_what_it_saw(tmp_path: Path) -> None:
    from simulations.pretrain import pretrain
    from simulations.profiles import MR_PROFILES, PRETRAIN_PROFILES

    cfg = parse_run_config({"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32"})
    doc = pretrain(tmp_path / "start", cfg, patients=3, slices=3, epochs=1)
    written = json.loads((tmp_path / "start" / "pretrain.json").read_text())
    assert written == doc
    seen = {s["profile"] for s in doc["data"]["scanners"]}
    assert seen == {p.name for p in PRETRAIN_PROFILES} and not seen & {p.name for p in MR_PROFILES}
    assert all(s["train_samples"] > 0 for s in doc["data"]["scanners"])
    assert doc["model_config"]["model.channels"] == "8,16,32"
    model = build_model(cfg.model)
    assert load_start_weights(model, str(tmp_path / "start")).name == "start_model.pt"
    with pytest.raises(ConfigError, match="does not fit"):
        load_start_weights(build_model(ModelConfig()), str(tmp_path / "start"))
