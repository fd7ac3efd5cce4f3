"""What a site sends over the network: weights, counts, metrics and its public name, nothing else."""

from __future__ import annotations

from pathlib import Path

from flwr.app import MessageType

from common.config import parse_run_config
from common.model import build_model
from common.records import to_arrays
from tests.flower_helpers import site_context, site_message

CFG = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}


def _model_bytes() -> int:
    """The size of the model's weights and buffers as the site holds them (what a reply must carry)."""
    model = build_model(parse_run_config(CFG).model)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _reply_bytes(arrays) -> int:
    """Payload bytes of the reply's arrays (each is serialised as .npy: a 128-byte header, then the values)."""
    return sum(a.numpy().nbytes for a in arrays.values())


def test_a_train_reply_carries_only_weights_counts_metrics_and_the_site_name(
    small_sites: Path, task_identity: None
) -> None:
    from client.app import train

    model = build_model(parse_run_config(CFG).model)
    msg = site_message(to_arrays(model), MessageType.TRAIN, **{"server-round": 1, "local-epochs": 1})
    reply = train(msg, site_context(small_sites / "site-02", CFG))
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    assert set(content["arrays"].keys()) == set(model.state_dict())  # the model's own tensors, no extra array
    assert _reply_bytes(content["arrays"]) == _model_bytes()  # nothing rides along inside the weights
    assert dict(content["site"]) == {"name": "site-02"}
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())  # numbers only, never text


def test_an_evaluate_reply_carries_only_metrics_and_the_site_name(small_sites: Path, task_identity: None) -> None:
    from client.app import evaluate

    model = build_model(parse_run_config(CFG).model)
    reply = evaluate(site_message(to_arrays(model), MessageType.EVALUATE), site_context(small_sites / "site-01", CFG))
    assert set(reply.content.keys()) == {"metrics", "site"}
    assert dict(reply.content["site"]) == {"name": "site-01"}
    assert all(isinstance(v, (int, float)) for v in reply.content["metrics"].values())
