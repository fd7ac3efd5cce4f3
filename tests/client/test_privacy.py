"""Differential privacy at the site: honest accounting across rounds and runs, refusal, audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.dpsgd import epsilon_spent, noise_for_target, train_private
from client.ledger import LedgerError, LedgerState, PrivacyLedger
from client.membership import membership_auc
from common.config import ConfigError, parse_run_config
from common.model import build_model
from common.records import to_arrays
from common.task import Batchable
from tests.flower_helpers import site_context, site_message

FAST = {"data.image-size": 32, "data.spacing-mm": 7.5, "model.channels": "8,16,32", "train.batch-size": 8}
DP = {**FAST, "privacy.dp": True, "privacy.noise-multiplier": 1.0, "privacy.max-grad-norm": 1.0}


def test_rdp_epsilon_matches_the_golden_value_for_a_known_noise_and_steps() -> None:
    """sigma 1.0, q 0.01, 1000 steps, delta 1e-5: Opacus' RDP accountant gives 2.1014."""
    assert epsilon_spent([(1.0, 0.01, 1000)], delta=1e-5, accountant="rdp") == pytest.approx(2.1014, abs=1e-3)
    # the history composes: two halves spend what the whole does
    assert epsilon_spent([(1.0, 0.01, 500), (1.0, 0.01, 500)], delta=1e-5) == pytest.approx(2.1014, abs=1e-3)
    # PRV is tighter than RDP for the same history
    assert epsilon_spent([(1.0, 0.01, 1000)], delta=1e-5, accountant="prv") < 2.1014
    # clipping without noise gives no guarantee
    assert epsilon_spent([(0.0, 0.01, 10)], delta=1e-5) == float("inf")


def test_noise_for_a_target_epsilon_spends_that_epsilon() -> None:
    sigma = noise_for_target(3.0, delta=1e-3, sample_rate=0.1, steps=300)
    assert epsilon_spent([(sigma, 0.1, 300)], delta=1e-3) == pytest.approx(3.0, abs=0.05)


def _ctx(
    site_dir: Path, ledger_dir: Path, run_id: int, state: RecordDict | None = None, **overrides: object
) -> Context:
    """A site whose policy (outside the shared site folder) keeps its ledgers in ``ledger_dir``; the run asks DP."""
    policy = ledger_dir / f"{site_dir.name}-privacy.json"
    if not policy.exists():
        policy.write_text(json.dumps({"ledger_dir": str(ledger_dir)}))
    return site_context(
        site_dir,
        {**DP, **overrides},
        node_id=3,
        run_id=run_id,
        state=state,
        node_config={"privacy-policy": str(policy)},
    )


def _train_msg(server_round: int) -> Message:
    arrays = to_arrays(build_model(parse_run_config(FAST).model))
    return site_message(arrays, MessageType.TRAIN, node_id=3, **{"server-round": server_round, "local-epochs": 1})


def test_epsilon_grows_round_by_round_and_across_runs(small_sites: Path, tmp_path: Path, task_identity: None) -> None:
    from client.app import train

    site = small_sites / "site-01"
    state = RecordDict()
    run1 = _ctx(site, tmp_path, run_id=1, state=state)
    e1 = train(_train_msg(1), run1).content["metrics"]["epsilon"]
    e2 = train(_train_msg(2), run1).content["metrics"]["epsilon"]
    assert 0 < e1 < e2
    assert "privacy" in run1.state.config_records  # the run keeps its accountant in Context.state
    # a second run on the same site starts from the site's ledger, not from zero
    run2 = _ctx(site, tmp_path, run_id=2)
    e3 = train(_train_msg(1), run2).content["metrics"]["epsilon"]
    assert e3 > e2
    entries = PrivacyLedger(tmp_path / "site-01.json").entries()
    assert [(e["run"], e["round"]) for e in entries] == [(1, 1), (1, 2), (2, 1)]


def test_weights_sent_after_dp_training_are_plain_and_the_model_trains_again(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import train

    ctx = _ctx(small_sites / "site-02", tmp_path, run_id=1)
    reply = train(_train_msg(1), ctx)
    keys = set(reply.content["arrays"].keys())
    assert keys == set(build_model(parse_run_config(FAST).model).state_dict().keys())
    assert not any(k.startswith("_module.") for k in keys)
    again = train(_train_msg(2), ctx)  # no double Opacus hooks on the cached model
    assert "arrays" in again.content.array_records
    assert again.content["metrics"]["epsilon"] > reply.content["metrics"]["epsilon"]


def test_a_site_whose_budget_is_spent_refuses_and_says_why(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import train

    ctx = _ctx(small_sites / "site-03", tmp_path, run_id=1, **{"privacy.max-epsilon": 1e-3})
    reply = train(_train_msg(1), ctx)
    assert "arrays" not in reply.content.array_records
    refusal = reply.content["refusal"]
    assert refusal["kind"] == "privacy-budget" and "privacy.max-epsilon" in refusal["reason"]
    assert reply.content["site"]["name"] == "site-03"
    assert PrivacyLedger(tmp_path / "site-03.json").entries() == []  # nothing was spent


def test_the_server_stops_or_goes_on_without_a_refusing_site_per_config(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import train
    from server.recording import StopFederation
    from server.strategies import make_strategy
    from tests.flower_helpers import FakeGrid

    ok = train(_train_msg(1), _ctx(small_sites / "site-01", tmp_path, run_id=1))
    refused = train(_train_msg(1), _ctx(small_sites / "site-03", tmp_path, run_id=1, **{"privacy.max-epsilon": 1e-3}))
    arrays = to_arrays(build_model(parse_run_config(FAST).model))
    for policy in ("continue", "stop"):
        cfg = parse_run_config({**DP, "privacy.on-budget": policy, "strategy.min-sites": 1})
        s = make_strategy(cfg)
        s.configure_train(1, arrays, ConfigRecord({}), FakeGrid())
        if policy == "stop":
            with pytest.raises(StopFederation, match="privacy budget spent at site-03"):
                s.aggregate_train(1, [ok, refused])
        else:
            agg, _ = s.aggregate_train(1, [ok, refused])
            assert agg is not None
        rec = s.records[0]
        assert rec.rejected[0]["site"] == "site-03" and "refused (privacy-budget)" in rec.rejected[0]["reason"]
        assert set(rec.privacy) == {"site-01", "site-03"}


def test_the_ledger_survives_a_restart_and_a_damaged_ledger_blocks_dp(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.json")
    entry = {"run": 1, "round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10}
    ledger.write(LedgerState(id="x", delta=1e-4, accountant="rdp", entries=[entry]))
    assert PrivacyLedger(tmp_path / "l.json").history() == [(1.0, 0.1, 10)]  # a new process reads it back
    (tmp_path / "l.json").write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger(tmp_path / "l.json").entries()


def test_a_damaged_ledger_stops_dp_training_and_the_server_is_told_why(
    small_sites: Path, tmp_path: Path, task_identity: None
) -> None:
    from client.app import SiteError, train

    (tmp_path / "site-01.json").write_text("{not json")
    with pytest.raises(SiteError, match=r"LedgerError: privacy ledger .* is unreadable .* restore it from a backup"):
        train(_train_msg(1), _ctx(small_sites / "site-01", tmp_path, run_id=1))
    assert (tmp_path / "site-01.json").read_text() == "{not json"  # nothing was trained or overwritten


def test_fedsites_own_errors_share_one_base_and_config_errors_stay_value_errors() -> None:
    from client.errors import DicomError
    from client.ledger import PrivacyBudgetExceeded
    from common.errors import FedsiteError
    from common.records import RecordError

    for error in (ConfigError, RecordError, LedgerError, PrivacyBudgetExceeded, DicomError):
        assert issubclass(error, FedsiteError), error
    assert issubclass(ConfigError, ValueError) and issubclass(RecordError, ValueError)


def test_dp_with_batchnorm_or_two_noise_settings_fails_at_start() -> None:
    with pytest.raises(ConfigError, match=r"'model.norm' = 'batch' cannot be used"):
        parse_run_config({"privacy.dp": True, "model.norm": "batch"})
    with pytest.raises(ConfigError, match="both set"):
        parse_run_config({"privacy.target-epsilon": 3.0, "privacy.noise-multiplier": 1.0})


def test_membership_attack_sees_memorised_training_samples_and_not_fresh_ones() -> None:
    torch.manual_seed(0)
    cfg = parse_run_config(FAST)
    x = torch.rand(24, 1, 32, 32)
    y = (torch.rand(24, 1, 32, 32) > 0.7).long()  # random labels: only memorisation can fit them
    members, others = Batchable(x[:12], y[:12]), Batchable(x[12:], y[12:])
    model = build_model(cfg.model)
    from common.task import train

    before = membership_auc(model, members, others)
    train(model, members, epochs=60, batch_size=12, lr=1e-2)
    assert membership_auc(model, members, others) > 0.8 > before
    assert membership_auc(model, members, members) == pytest.approx(0.5)


def test_dp_training_clips_without_noise_when_asked() -> None:
    torch.manual_seed(0)
    cfg = parse_run_config(FAST)
    data = Batchable(torch.rand(16, 1, 32, 32), (torch.rand(16, 1, 32, 32) > 0.7).long())
    out = train_private(
        build_model(cfg.model), data, epochs=1, batch_size=4, lr=1e-3, noise_multiplier=0.0, max_grad_norm=1.0
    )
    assert out.steps > 0 and out.sample_rate == pytest.approx(0.25)
    assert epsilon_spent(out.history, delta=1e-3) == float("inf")


def test_audit_holds_out_slices_of_training_patients_never_trained_on(small_sites: Path) -> None:
    from client.runtime import loaded_site

    cfg = parse_run_config({**FAST, "privacy.audit": True, "privacy.audit-fraction": 0.25})
    site = loaded_site(small_sites / "site-01", cfg)
    plain = loaded_site(small_sites / "site-01", parse_run_config(FAST))
    assert site.audit is not None and plain.audit is None
    assert len(site.train) + len(site.audit) == len(plain.train)
    train_rows = {tuple(x.flatten()[:64].tolist()) for x in site.train.images}
    audit_rows = {tuple(x.flatten()[:64].tolist()) for x in site.audit.images}
    assert train_rows.isdisjoint(audit_rows)
