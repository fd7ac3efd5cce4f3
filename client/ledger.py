"""A site's privacy ledger, its budget and its DP training rounds. Plain code; no Flower.

The ledger is the site's accountant for its whole life: an append-only JSON file on the site's
disk, next to its data (``<site>/.fedsite-privacy/ledger.json``, or ``<privacy.ledger-dir>/<site>.json``),
never in the repository. Every DP-SGD call on the site's data adds one entry
``{"run", "round", "noise_multiplier", "sample_rate", "steps", "accountant", "n_train"}``;
epsilon is always computed over all entries, so it grows round by round and run by run.
During a run the same history is also kept in Flower's ``Context.state`` (see ``client/app.py``);
if the file was lost or rolled back mid-run, the longer history wins and the file is rewritten.

The ledger becomes accountant state in one place, :func:`accountant_history`; DP-SGD itself and
the accountant are in :mod:`client.dpsgd`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.dpsgd import HistoryEntry, default_delta, epsilon_spent, noise_for_target, train_private
from common.config import RunConfig
from common.errors import FedsiteError
from common.task import Batchable, TrainResult

__all__ = [
    "LedgerError",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivateRound",
    "accountant_history",
    "current_epsilon",
    "ledger_for",
    "private_round",
]

log = logging.getLogger("fedsite.client")


class LedgerError(FedsiteError, RuntimeError):
    """The ledger cannot be read or written; DP training is refused (the budget would be unknown)."""


class PrivacyBudgetExceeded(FedsiteError, RuntimeError):
    """Training would push a site's epsilon past its budget; the site refuses the round."""


def accountant_history(entries: Sequence[dict[str, Any]]) -> list[HistoryEntry]:
    """The accountant history of ledger entries: ``(noise_multiplier, sample_rate, steps)`` per entry.

    The one conversion from the ledger to the accountant's state (:func:`client.dpsgd.accountant_state`).
    """
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]


class PrivacyLedger:
    """Append-only record of every DP-SGD call on one site's data.

    Args:
        path: The ledger file (created on first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first; empty if the ledger does not exist yet.

        Raises:
            LedgerError: If the file exists but is not a valid ledger.
        """
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["entries"]
            accountant_history(entries)  # every entry must convert
            return list(entries)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({type(exc).__name__}); restore it from a backup. "
                "DP training is refused until then, since the site's spent budget would be unknown"
            ) from None

    def history(self) -> list[HistoryEntry]:
        """The accountant history: ``(noise_multiplier, sample_rate, steps)`` per entry."""
        return accountant_history(self.entries())

    def write(self, entries: Sequence[dict[str, Any]]) -> None:
        """Replace the ledger's content atomically."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": 1, "entries": list(entries)}, fh, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise LedgerError(
                f"cannot write the privacy ledger {self.path} ({exc.strerror}); "
                "make the folder writable or set privacy.ledger-dir"
            ) from None

    def append(self, entry: dict[str, Any]) -> None:
        """Add one entry."""
        self.write([*self.entries(), entry])


def ledger_for(site_dir: Path, site_name: str, cfg: RunConfig) -> PrivacyLedger:
    """The site's ledger: ``privacy.ledger-dir/<site>.json`` or ``<site>/.fedsite-privacy/ledger.json``."""
    if cfg.privacy.ledger_dir:
        return PrivacyLedger(Path(cfg.privacy.ledger_dir).expanduser() / f"{site_name}.json")
    return PrivacyLedger(Path(site_dir) / ".fedsite-privacy" / "ledger.json")


@dataclass(frozen=True)
class PrivateRound:
    """The outcome of one DP round at a site."""

    result: TrainResult
    entries: list[dict[str, Any]]
    epsilon: float
    delta: float
    noise_multiplier: float


def _plan(cfg: RunConfig, n_train: int, *, epochs: int, batch_size: int) -> tuple[float, float, int, float]:
    """(delta, sample rate, steps this round, noise multiplier) for a round."""
    p = cfg.privacy
    delta = p.delta if p.delta > 0 else default_delta(n_train)
    batches = math.ceil(n_train / min(batch_size, n_train))
    sample_rate = 1.0 / batches  # as Opacus' Poisson data loader samples
    steps = epochs * batches
    if p.target_epsilon > 0:
        # Noise such that this run's planned rounds together spend the target epsilon.
        sigma = noise_for_target(
            p.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps * cfg.num_server_rounds,
            accountant=p.accountant,
        )
    else:
        sigma = p.noise_multiplier
    return delta, sample_rate, steps, sigma


def current_epsilon(entries: Sequence[dict[str, Any]], cfg: RunConfig, n_train: int) -> tuple[float, float]:
    """(epsilon, delta) of the site's whole ledger."""
    delta = cfg.privacy.delta if cfg.privacy.delta > 0 else default_delta(n_train)
    return epsilon_spent(accountant_history(entries), delta=delta, accountant=cfg.privacy.accountant), delta


def private_round(
    model: Any,
    data: Batchable,
    cfg: RunConfig,
    *,
    ledger: PrivacyLedger,
    state_entries: Sequence[dict[str, Any]] = (),
    run_id: int,
    server_round: int,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str,
    proximal_mu: float,
    seed: int,
    device: Any,
    task: str = "segmentation",
    weights: Any = None,
) -> PrivateRound:
    """Check the budget, train with DP-SGD, and record the round in the ledger.

    Args:
        model: The network, holding the global weights.
        data: The site's training split.
        cfg: The run config (``privacy.*``).
        ledger: The site's ledger.
        state_entries: The history kept in ``Context.state`` during this run.
        run_id, server_round: Recorded with the entry.
        epochs, batch_size, lr, optimizer, proximal_mu, seed, device, task, weights: As for training.

    Returns:
        The training result, the full ledger after the round, and epsilon/delta so far.

    Raises:
        PrivacyBudgetExceeded: If this round would take the site past ``privacy.max-epsilon``.
        LedgerError: If the ledger cannot be read or written.
    """
    entries = ledger.entries()
    if len(state_entries) > len(entries):
        log.warning("privacy ledger %s has fewer entries than this run recorded; restoring it", ledger.path)
        entries = list(state_entries)
        ledger.write(entries)
    n = len(data)
    delta, sample_rate, steps, sigma = _plan(cfg, n, epochs=epochs, batch_size=batch_size)
    history = accountant_history(entries)
    budget = cfg.privacy.max_epsilon
    if budget > 0:
        projected = epsilon_spent(
            [*history, (sigma, sample_rate, steps)], delta=delta, accountant=cfg.privacy.accountant
        )
        if projected > budget:
            spent = epsilon_spent(history, delta=delta, accountant=cfg.privacy.accountant)
            raise PrivacyBudgetExceeded(
                f"privacy budget: this round would bring the site's epsilon from {spent:.3g} to {projected:.3g} "
                f"(delta {delta:.2g}), over privacy.max-epsilon = {budget:g}; the site refuses to train. "
                "Raise the budget only if the site's governance allows it"
            )
    out = train_private(
        model,
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        noise_multiplier=sigma,
        max_grad_norm=cfg.privacy.max_grad_norm,
        history=history,
        accountant=cfg.privacy.accountant,
        grad_sample_mode=cfg.privacy.grad_sample_mode,
        proximal_mu=proximal_mu,
        seed=seed,
        device=device,
        task=task,
        weights=weights,
    )
    # What was really released: the optimizer steps taken at the loader's sample rate.
    new = {
        "run": int(run_id),
        "round": int(server_round),
        "noise_multiplier": sigma,
        "sample_rate": out.sample_rate,
        "steps": out.steps,
        "accountant": cfg.privacy.accountant,
        "n_train": n,
        "max_grad_norm": cfg.privacy.max_grad_norm,
    }
    entries = [*entries, new]
    ledger.write(entries)
    eps, _ = current_epsilon(entries, cfg, n)
    log.info(
        "privacy: round %d spent; site epsilon now %.3g at delta %.2g (noise %.3g)", server_round, eps, delta, sigma
    )
    return PrivateRound(result=out.result, entries=entries, epsilon=eps, delta=delta, noise_multiplier=sigma)
