"""The site's Flower ClientApp: thin handlers that translate records to plain function calls.

Replies carry the model weights (``arrays``), numbers only (``metrics``; ``num-examples`` is the
count of training or validation samples, not batches) and the site's public name (``site``), so
the server can keep results per site. No patient value is ever put in a reply.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.runtime import apply_threads, loaded_site, model_for, resolve_site_dir, site_seed
from common import task
from common.config import parse_run_config
from common.model import pick_device
from common.records import load_arrays, to_arrays

app = ClientApp()


def _site(context: Context):  # noqa: ANN202 - internal
    cfg = parse_run_config(context.run_config)
    site = loaded_site(resolve_site_dir(context.node_config, cfg), cfg)
    return cfg, site


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's training split."""
    start = time.perf_counter()
    cfg, site = _site(context)
    threads = apply_threads(cfg, context.node_config)
    model = model_for(cfg.model)
    load_arrays(model, msg.content["arrays"])
    rc = msg.content["config"]
    server_round = int(rc.get("server-round", 0))
    result = task.train(
        model,
        site.train,
        epochs=int(rc.get("local-epochs", cfg.train.local_epochs)),
        batch_size=int(rc.get("batch-size", cfg.train.batch_size)),
        lr=float(rc.get("lr", cfg.train.lr)),
        optimizer=str(rc.get("optimizer", cfg.train.optimizer)),
        proximal_mu=float(rc.get("proximal-mu", 0.0)),
        seed=site_seed(cfg.seed, site.name, server_round),
        device=pick_device(),
    )
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "steps": result.steps,
            "compute-s": result.seconds,
            "handler-s": time.perf_counter() - start,
            "threads": threads,
        }
    )
    content = RecordDict({"arrays": to_arrays(model), "metrics": metrics, "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this site's validation split."""
    start = time.perf_counter()
    cfg, site = _site(context)
    apply_threads(cfg, context.node_config)
    model = model_for(cfg.model)
    load_arrays(model, msg.content["arrays"])
    t0 = time.perf_counter()
    scores = task.evaluate(model, site.val, batch_size=max(cfg.train.batch_size, 32), device=pick_device())
    scores["compute-s"] = time.perf_counter() - t0
    scores["handler-s"] = time.perf_counter() - start
    content = RecordDict({"metrics": MetricRecord(scores), "site": ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)
