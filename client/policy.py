"""The site's own privacy policy, and what it grants a run. Plain code; no Flower.

Whether DP is on, the unit of its guarantee (a patient or a slice), the lifetime budget, delta, the
accountant, the ledger's place and whether the membership audit may run are the *site's* settings,
not the coordinator's. They live in a policy file the site's operator writes: ``<site>/privacy.json``
(:data:`client.layout.POLICY_FILE`), or the file named by the node config key ``privacy-policy``
(e.g. outside the data folder)::

    {"dp": true, "unit": "patient", "max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
     "ledger_dir": "", "audit": false, "class_weights": [1.0, 3.0], "public_size": 0}

The run config (``privacy.*``, sent by the coordinator) only *asks*: :func:`grant` accepts a run
that asks for at least the policy's protection and returns a refusal reason for one that asks for
less (DP off, a larger budget or delta). A run may ask for more protection (DP on a site whose
policy leaves it off, a smaller budget). A site without a policy file has the default policy (DP
off, no budget, patient-level unit): there the run's request decides, as it is the only wish there is.
The unit is the site's alone (the run config has no key for it): ``"patient"`` by default, the
guarantee a privacy officer expects; ``"slice"`` only when the site's policy says so. It is fixed in
the ledger when the ledger is created.

When the site's ledger is created, its id is written into the policy file (``ledger_id``): from
then on a missing or replaced ledger stops DP training instead of counting epsilon from zero.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from client.layout import POLICY_FILE
from common.config import RunConfig
from common.errors import FedsiteError

__all__ = ["NODE_KEY", "UNITS", "Grant", "PolicyError", "SitePolicy", "grant", "load_policy", "write_policy"]

#: The units a guarantee can be stated in: one patient (all of its slices) or one slice.
UNITS = ("patient", "slice")

#: Node config key naming the policy file (default: ``<site>/privacy.json``).
NODE_KEY = "privacy-policy"


class PolicyError(FedsiteError, ValueError):
    """The site's privacy policy file is unreadable or invalid; the site does not train until it is fixed."""


@dataclass(frozen=True)
class SitePolicy:
    """A site's privacy policy (the operator's file; defaults when there is none)."""

    dp: bool = False
    """DP-SGD on every training round of this site; a run asking ``privacy.dp = false`` is refused."""
    unit: str = "patient"
    """The unit of the guarantee: ``"patient"`` (all of a patient's slices are sampled and clipped as
    one) or ``"slice"`` (each slice alone: per patient epsilon can be far larger). Fixed in the ledger."""
    max_epsilon: float = 0.0
    """Lifetime epsilon budget over the site's whole ledger; 0 = none (required when ``dp``)."""
    delta: float = 0.0
    """Delta, fixed in the ledger when it is created; 0 = 1/(10 x training samples) at creation."""
    accountant: str = ""
    """``"rdp"`` or ``"prv"``, fixed in the ledger when it is created; '' = as the run asks."""
    ledger_dir: str = ""
    """Folder of the ledger (``<dir>/<site>.json``); '' = ``<site>/.fedsite-privacy/ledger.json``."""
    audit: bool = False
    """Under DP, the membership audit may run (its AUCs are a release outside the accountant)."""
    class_weights: tuple[float, ...] = ()
    """Classification under DP: fixed loss weights per class (public prior); () = uniform."""
    public_size: int = 0
    """Under DP, the training-set size the site agrees to publish (FedAvg weight); 0 = withheld."""
    ledger_id: str = ""
    """Written by fedsite when the ledger is created; a DP site whose ledger is missing then stops."""
    path: str = ""
    """Where the policy was read from ('' = default policy, no file)."""

    def as_file(self) -> dict[str, Any]:
        """The policy as its JSON file holds it."""
        out = asdict(self)
        out.pop("path")
        out["class_weights"] = list(self.class_weights)
        return out


def _checked(raw: Mapping[str, Any], where: Path) -> SitePolicy:
    known = {f.name for f in fields(SitePolicy)} - {"path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PolicyError(f"privacy policy {where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    try:
        policy = SitePolicy(
            dp=bool(raw.get("dp", False)),
            unit=str(raw.get("unit", "patient")),
            max_epsilon=float(raw.get("max_epsilon", 0.0)),
            delta=float(raw.get("delta", 0.0)),
            accountant=str(raw.get("accountant", "")),
            ledger_dir=str(raw.get("ledger_dir", "")),
            audit=bool(raw.get("audit", False)),
            class_weights=tuple(float(w) for w in raw.get("class_weights", ())),
            public_size=int(raw.get("public_size", 0)),
            ledger_id=str(raw.get("ledger_id", "")),
            path=str(where),
        )
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"privacy policy {where}: a value has the wrong type ({exc})") from None
    if policy.unit not in UNITS:
        raise PolicyError(
            f"privacy policy {where}: unit = {policy.unit!r}; use 'patient' (a guarantee per patient) or 'slice'"
        )
    if policy.accountant not in ("", "rdp", "prv"):
        raise PolicyError(f"privacy policy {where}: accountant = {policy.accountant!r}; use 'rdp' or 'prv'")
    if policy.max_epsilon < 0 or not 0 <= policy.delta < 1 or policy.public_size < 0:
        raise PolicyError(f"privacy policy {where}: max_epsilon, public_size must be >= 0 and delta in [0, 1)")
    if policy.dp and policy.max_epsilon <= 0:
        raise PolicyError(
            f"privacy policy {where}: dp = true needs a lifetime budget; set max_epsilon (e.g. 8.0) to a value "
            "the site's governance approved"
        )
    if any(w <= 0 for w in policy.class_weights):
        raise PolicyError(f"privacy policy {where}: class_weights must all be > 0")
    return policy


def policy_path(site_dir: Path, node_config: Mapping[str, Any] | None = None) -> Path:
    """The policy file of a site: node config ``privacy-policy``, else ``<site>/privacy.json``."""
    if node_config and NODE_KEY in node_config:
        return Path(str(node_config[NODE_KEY])).expanduser()
    return Path(site_dir) / POLICY_FILE


def load_policy(site_dir: Path, node_config: Mapping[str, Any] | None = None) -> SitePolicy:
    """Read the site's policy; the default policy (DP off) when the site has no policy file.

    Raises:
        PolicyError: If the node config names a file that does not exist, or the file is invalid.
    """
    path = policy_path(site_dir, node_config)
    if not path.is_file():
        if node_config and NODE_KEY in node_config:
            raise PolicyError(f"node config {NODE_KEY}={path} is not a file; write the site's privacy policy there")
        return SitePolicy()
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"privacy policy {path} is unreadable ({type(exc).__name__}); fix or restore it") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"privacy policy {path} must hold a JSON object")
    return _checked(raw, path)


def write_policy(path: Path, policy: SitePolicy) -> SitePolicy:
    """Write ``policy`` to ``path`` atomically (the simulation writes each simulated site's policy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".privacy-")
    with os.fdopen(fd, "w") as fh:
        json.dump(policy.as_file(), fh, indent=1)
    os.replace(tmp, path)
    return replace(policy, path=str(path))


@dataclass(frozen=True)
class Grant:
    """What the site grants a run: its effective privacy settings (policy and request together)."""

    dp: bool
    budget: float
    """Lifetime epsilon budget (0 = none): the smaller of the policy's and the run's, and the run's
    ``privacy.target-epsilon`` when set (a lifetime target)."""
    delta: float
    """Delta asked for a new ledger (0 = default); an existing ledger keeps its own."""
    accountant: str
    audit: bool
    unit: str = "patient"
    """The unit of the guarantee (the site's policy's: the run cannot change it)."""


def grant(policy: SitePolicy, cfg: RunConfig) -> Grant | str:
    """The run's privacy request checked against the site's policy.

    Returns:
        The effective settings, or the reason the site refuses the run (it asks for less protection).
    """
    ask = cfg.privacy
    if policy.dp and not ask.dp:
        return "the site's privacy policy requires DP; the run asks privacy.dp = false"
    dp = policy.dp or ask.dp
    limits = [b for b in (policy.max_epsilon, ask.max_epsilon, ask.target_epsilon) if b > 0]
    if dp and policy.max_epsilon > 0:
        for key, value in (("max-epsilon", ask.max_epsilon), ("target-epsilon", ask.target_epsilon)):
            if value > policy.max_epsilon:
                return f"the run asks privacy.{key} = {value:g}, above the site's budget {policy.max_epsilon:g}"
        if ask.noise_multiplier <= 0 and ask.target_epsilon <= 0:
            return "the run asks for DP without noise (privacy.noise-multiplier = 0): no guarantee"
    if dp and policy.delta > 0 and ask.delta > policy.delta:
        return f"the run asks privacy.delta = {ask.delta:g}, above the site's delta {policy.delta:g}"
    delta = policy.delta if policy.delta > 0 else ask.delta
    return Grant(
        dp=dp,
        budget=min(limits) if limits else 0.0,
        delta=delta,
        accountant=policy.accountant or ask.accountant,
        audit=ask.audit and (policy.audit or not dp),
        unit=policy.unit,
    )
