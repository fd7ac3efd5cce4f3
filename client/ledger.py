"""A site's privacy ledger, its budget and its DP training rounds. Plain code; no Flower.

The ledger is the site's accountant for its whole life: an append-only JSON file on the site's
disk, in the place the site's policy names (:class:`client.policy.SitePolicy`, ``ledger_dir``;
default ``<site>/.fedsite-privacy/ledger.json``), never in the repository and never chosen by
the coordinator. Its header fixes, when it is created, its ``id``, ``delta``, ``accountant`` and
``unit`` (``"patient"`` or ``"slice"``, from the site's policy: what one entry's sample rate is a
rate *of*, and what epsilon protects); every DP-SGD call on the site's data adds one entry
``{"run", "round", "noise_multiplier", "sample_rate", "steps", "n_train", "max_grad_norm"}`` (plus
``n_patients`` at patient level), and epsilon is always computed over all entries at the ledger's
own delta, so it only grows. A ledger spent at one unit never continues at the other: the site stops
with :class:`LedgerError` instead (a ledger written before the unit was recorded was spent per slice).

The ledger is locked (``fcntl`` on ``<ledger>.lock``) from reading it to writing the round's
entry, so two processes cannot both spend the same budget. When the ledger is created its id is
written into the site's policy file; from then on a missing or different ledger stops DP training
(:class:`LedgerError`) instead of counting epsilon from zero. During a run the entries are also kept
in Flower's ``Context.state``; if the file lost entries mid-run, the longer history wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from client.dpsgd import (
    HistoryEntry,
    default_delta,
    epsilon_spent,
    noise_for_remaining,
    patient_schedule,
    train_private,
    train_private_patients,
)
from client.layout import LEDGER_DIR
from client.policy import UNITS, Grant, SitePolicy, write_policy
from common.config import RunConfig
from common.errors import FedsiteError
from common.task import Batchable, TrainResult

__all__ = [
    "LedgerError",
    "LedgerState",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "PrivateRound",
    "accountant_history",
    "ledger_for",
    "open_ledger",
    "private_round",
]

log = logging.getLogger("fedsite.client")

_LOCK_WAIT_S = 120.0


class LedgerError(FedsiteError, RuntimeError):
    """The ledger cannot be read or written, or is missing; DP training is refused (the budget would be unknown)."""


class PrivacyBudgetExceeded(FedsiteError, RuntimeError):
    """Training would push a site's epsilon past its budget; the site refuses the round."""


def accountant_history(entries: Sequence[dict[str, Any]]) -> list[HistoryEntry]:
    """The accountant history of ledger entries: ``(noise_multiplier, sample_rate, steps)`` per entry.

    The one conversion from the ledger to the accountant's state (:func:`client.dpsgd.accountant_state`).
    """
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]


@dataclass(frozen=True)
class LedgerState:
    """A ledger's content: header fixed at creation, and the entries."""

    id: str
    delta: float
    accountant: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    unit: str = "slice"
    """``"patient"`` or ``"slice"``: the unit epsilon protects (a ledger from before units were recorded: slice)."""

    def epsilon(self, extra: Sequence[HistoryEntry] = ()) -> float:
        """Epsilon of every entry (plus ``extra`` planned calls) at the ledger's delta."""
        return epsilon_spent([*accountant_history(self.entries), *extra], delta=self.delta, accountant=self.accountant)


class PrivacyLedger:
    """Append-only record of every DP-SGD call on one site's data.

    Args:
        path: The ledger file (created by :func:`open_ledger` on the site's first DP round).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's lock file (exclusive) for the block; waits up to two minutes for another holder.

        Raises:
            LedgerError: If the lock cannot be taken (another process holds it too long).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a") as fh:
            deadline = time.monotonic() + _LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LedgerError(
                            f"privacy ledger {self.path} is locked by another process (lock file {lock.name}); "
                            "wait for that training to end, or remove the lock file if no fedsite process runs"
                        ) from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> LedgerState | None:
        """The ledger's content; None if the file does not exist.

        Raises:
            LedgerError: If the file exists but is not a valid ledger.
        """
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text())
            entries = list(data["entries"])
            accountant_history(entries)  # every entry must convert
            if data.get("version") == 1:  # before delta was fixed: fixed now, at the first entry's size
                first = entries[0]["n_train"] if entries else 1
                acc = entries[0].get("accountant", "rdp") if entries else "rdp"
                return LedgerState(id="", delta=default_delta(int(first)), accountant=acc, entries=entries)
            state = LedgerState(
                id=str(data["id"]),
                delta=float(data["delta"]),
                accountant=str(data["accountant"]),
                entries=entries,
                unit=str(data.get("unit", "slice")),
            )
            if not 0 < state.delta < 1 or state.accountant not in ("rdp", "prv") or state.unit not in UNITS:
                raise ValueError("bad header")
            return state
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise LedgerError(
                f"privacy ledger {self.path} is unreadable ({type(exc).__name__}); restore it from a backup. "
                "DP training is refused until then, since the site's spent budget would be unknown"
            ) from None

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first; empty if the ledger does not exist yet."""
        state = self.read()
        return [] if state is None else list(state.entries)

    def history(self) -> list[HistoryEntry]:
        """The accountant history: ``(noise_multiplier, sample_rate, steps)`` per entry."""
        return accountant_history(self.entries())

    def write(self, state: LedgerState) -> None:
        """Replace the ledger's content atomically."""
        body = {
            "version": 2,
            "id": state.id,
            "delta": state.delta,
            "accountant": state.accountant,
            "unit": state.unit,
            "entries": list(state.entries),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
            with os.fdopen(fd, "w") as fh:
                json.dump(body, fh, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise LedgerError(
                f"cannot write the privacy ledger {self.path} ({exc.strerror}); make the folder writable or set "
                "ledger_dir in the site's privacy policy"
            ) from None


def ledger_for(site_dir: Path, site_name: str, policy: SitePolicy) -> PrivacyLedger:
    """The site's ledger: the policy's ``ledger_dir/<site>.json`` or ``<site>/.fedsite-privacy/ledger.json``."""
    if policy.ledger_dir:
        return PrivacyLedger(Path(policy.ledger_dir).expanduser() / f"{site_name}.json")
    return PrivacyLedger(Path(site_dir) / LEDGER_DIR / "ledger.json")


def open_ledger(
    ledger: PrivacyLedger,
    policy: SitePolicy,
    granted: Grant,
    n_train: int,
    state_entries: Sequence[dict[str, Any]] = (),
) -> tuple[LedgerState, SitePolicy]:
    """Read the ledger (the caller holds its lock), or create it on the site's first DP round.

    Creating fixes delta (the grant's, else 1/(10 x ``n_train``) with ``n_train`` the training
    *slices*, also at patient level: stricter than 1/(10 x patients)), the accountant and the unit,
    and writes the ledger's id into the policy file. Entries this run kept in ``Context.state`` that
    the file lost are restored.

    Returns:
        The ledger's content and the policy (with ``ledger_id`` once written).

    Raises:
        LedgerError: If the policy names a ledger that is missing or a different one, or the ledger was
            spent at another unit than the grant's.
    """
    state = ledger.read()
    if state is None and policy.ledger_id:
        raise LedgerError(
            f"privacy ledger {ledger.path} is missing, but this site has trained with DP before (ledger id "
            f"{policy.ledger_id} in its privacy policy {policy.path}). DP training is refused: restore the ledger "
            "from a backup (counting from zero would understate the spent budget)"
        )
    if state is not None and policy.ledger_id and state.id != policy.ledger_id:
        raise LedgerError(
            f"privacy ledger {ledger.path} has id {state.id or '(none)'} but the site's privacy policy names "
            f"{policy.ledger_id}: it is not this site's ledger. Restore the right ledger from a backup"
        )
    if state is None:
        delta = granted.delta if granted.delta > 0 else default_delta(n_train)
        state = LedgerState(id=uuid.uuid4().hex, delta=delta, accountant=granted.accountant, unit=granted.unit)
        ledger.write(state)
        log.info("privacy: new ledger %s (delta %.2g, unit %s fixed)", ledger.path, delta, granted.unit)
    elif not state.id:
        state = replace(state, id=uuid.uuid4().hex)  # an old ledger gets its id now
        ledger.write(state)
    if state.unit != granted.unit:
        raise LedgerError(_unit_mismatch(ledger, state, granted.unit))
    if policy.path and policy.ledger_id != state.id:
        policy = write_policy(Path(policy.path), replace(policy, ledger_id=state.id))
    if len(state_entries) > len(state.entries):
        log.warning("privacy ledger %s has fewer entries than this run recorded; restoring it", ledger.path)
        state = replace(state, entries=list(state_entries))
        ledger.write(state)
    return state, policy


def _unit_mismatch(ledger: PrivacyLedger, state: LedgerState, unit: str) -> str:
    spent = state.epsilon()
    if state.unit == "slice":
        why = (
            f"its epsilon {spent:.3g} is per slice, and per patient it is larger (group privacy), so a patient-level "
            "ledger cannot continue it. Either set unit = 'slice' in the site's privacy policy to keep training at "
            "slice level, or start a patient-level ledger (a new ledger_dir, and remove ledger_id from the policy) "
            "only if the site's governance accepts that the slice-level spending is not counted in it"
        )
    else:
        why = (
            f"its epsilon {spent:.3g} is per patient. Set unit = 'patient' in the site's privacy policy again; a "
            "slice-level guarantee is weaker and would start a separate account"
        )
    return (
        f"privacy ledger {ledger.path} was created at {state.unit} level but the site's privacy policy now asks "
        f"{unit} level; DP training is refused: {why}"
    )


@dataclass(frozen=True)
class PrivateRound:
    """The outcome of one DP round at a site."""

    result: TrainResult
    entries: list[dict[str, Any]]
    epsilon: float
    delta: float
    noise_multiplier: float
    unit: str = "slice"
    """What epsilon protects: ``"patient"`` or ``"slice"`` (the ledger's unit)."""


def _plan(
    cfg: RunConfig,
    state: LedgerState,
    n_train: int,
    *,
    epochs: int,
    batch_size: int,
    server_round: int,
    n_patients: int = 0,
) -> tuple[float, int, float]:
    """(sample rate, steps this round, noise multiplier) for a round, in the ledger's unit.

    At slice level the rate is over slices (as Opacus' Poisson loader samples them); at patient level
    over ``n_patients`` patients (:func:`client.dpsgd.patient_schedule`).
    With ``privacy.target-epsilon`` the target is a *lifetime* one: the noise is sized so that the
    ledger so far plus this run's remaining rounds (this one included) spend it.
    """
    p = cfg.privacy
    if state.unit == "patient":
        schedule = patient_schedule(n_train, n_patients, batch_size)
        batches, sample_rate = schedule.steps_per_epoch, schedule.sample_rate
    else:
        batches = math.ceil(n_train / min(batch_size, n_train))
        sample_rate = 1.0 / batches  # as Opacus' Poisson data loader samples
    steps = epochs * batches
    if p.target_epsilon > 0:
        rounds_left = max(cfg.num_server_rounds - server_round + 1, 1)
        sigma = noise_for_remaining(
            p.target_epsilon,
            accountant_history(state.entries),
            delta=state.delta,
            sample_rate=sample_rate,
            steps=steps * rounds_left,
            accountant=state.accountant,
        )
    else:
        sigma = p.noise_multiplier
    return sample_rate, steps, sigma


def private_round(
    model: Any,
    data: Batchable,
    cfg: RunConfig,
    *,
    policy: SitePolicy,
    granted: Grant,
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
    patients: Any = None,
) -> PrivateRound:
    """Check the budget, train with DP-SGD, and record the round in the ledger (all under its lock).

    Args:
        model: The network, holding the global weights.
        data: The site's training split.
        cfg: The run config (the run's ``privacy.*`` request: noise or target, clipping).
        policy: The site's privacy policy.
        granted: What the site grants this run (:func:`client.policy.grant`): budget, delta, accountant.
        ledger: The site's ledger.
        state_entries: The history kept in ``Context.state`` during this run.
        run_id, server_round: Recorded with the entry.
        epochs, batch_size, lr, optimizer, proximal_mu, seed, device, task, weights: As for training.
        patients: ``(N,)`` patient of each training slice (:func:`client.dpsgd.patient_index`); needed when
            the grant's unit is ``"patient"``. Never leaves the site.

    Returns:
        The training result, the full ledger after the round, and epsilon/delta so far.

    Raises:
        PrivacyBudgetExceeded: If this round would take the site past its budget (or lifetime target).
        LedgerError: If the ledger cannot be read or written, is missing for a site that trained before,
            or was spent at another unit than the policy's.
        ValueError: At patient level without ``patients``.
    """
    n = len(data)
    if granted.unit == "patient" and (patients is None or len(patients) != n):
        raise ValueError("patient-level DP needs the patient of each training slice (patients); none was given")
    n_patients = len(set(patients.tolist())) if granted.unit == "patient" else 0
    with ledger.locked():
        state, _ = open_ledger(ledger, policy, granted, n, state_entries)
        sample_rate, steps, sigma = _plan(
            cfg, state, n, epochs=epochs, batch_size=batch_size, server_round=server_round, n_patients=n_patients
        )
        spent = state.epsilon()
        projected = state.epsilon([(sigma, sample_rate, steps)]) if math.isfinite(sigma) else math.inf
        if granted.budget > 0 and projected > granted.budget * (1 + 1e-6):
            raise PrivacyBudgetExceeded(
                f"privacy budget: this round would bring the site's epsilon from {spent:.3g} to {projected:.3g} "
                f"(delta {state.delta:.2g}), over its lifetime budget {granted.budget:g} (the smaller of the site "
                "policy's max_epsilon and the run's privacy.max-epsilon / target-epsilon); the site refuses to "
                "train. Raise the budget only if the site's governance allows it"
            )
        settings = dict(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            noise_multiplier=sigma,
            max_grad_norm=cfg.privacy.max_grad_norm,
            history=accountant_history(state.entries),
            accountant=state.accountant,
            grad_sample_mode=cfg.privacy.grad_sample_mode,
            proximal_mu=proximal_mu,
            seed=seed,
            device=device,
            task=task,
            weights=weights,
        )
        if state.unit == "patient":
            out = train_private_patients(
                model,
                data,
                patients,
                augment_multiplicity=cfg.privacy.augment_multiplicity,
                augment=cfg.train.augment,
                **settings,
            )
        else:
            out = train_private(model, data, **settings)
        # What was really released: the optimizer steps taken at the loader's sample rate.
        new = {
            "run": int(run_id),
            "round": int(server_round),
            "noise_multiplier": sigma,
            "sample_rate": out.sample_rate,
            "steps": out.steps,
            "n_train": n,
            "max_grad_norm": cfg.privacy.max_grad_norm,
            **({"n_patients": n_patients} if state.unit == "patient" else {}),
        }
        state = replace(state, entries=[*state.entries, new])
        ledger.write(state)
    eps = state.epsilon()
    log.info(
        "privacy: round %d spent; site epsilon now %.3g per %s at delta %.2g (noise %.3g)",
        server_round,
        eps,
        state.unit,
        state.delta,
        sigma,
    )
    return PrivateRound(
        result=out.result,
        entries=state.entries,
        epsilon=eps,
        delta=state.delta,
        noise_multiplier=sigma,
        unit=state.unit,
    )
