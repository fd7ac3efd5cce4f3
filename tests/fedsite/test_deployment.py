"""A deployment on loopback: one SuperLink and three SuperNodes as separate processes, TLS and auth on.

The processes are started the way a coordinator and three hospitals start them (``fedsite server``
building blocks, ``fedsite site start``, ``fedsite run``), each in its own process group, and every
group is stopped by the fixture that started it, also when a test fails.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certs import authority
from server import deploy
from tests.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

SITES = ("site-01", "site-02", "site-03")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - closed with the process by _stop
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or _env(), start_new_session=True)
    proc._log = fh  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen) -> None:
    """Stop the process and everything it started (its process group): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            # children may outlive the leader a moment: one more signal to the group
            os.killpg(proc.pid, signal.SIGKILL)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        break
    proc._log.close()  # type: ignore[attr-defined]


def _wait_for(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    authority.init_ca(d)
    authority.issue_server_cert(d, ["127.0.0.1", "localhost"])
    for name in (*SITES, "intruder", "careful"):
        authority.make_site_key(d, name)
    return d


@contextlib.contextmanager
def _superlink(pki: Path, state: Path, sites: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """A SuperLink on a free loopback port with ``sites`` enrolled; yields (address, flwr home)."""
    port = _free_port()
    spec = deploy.SuperLinkSpec(
        certfile=pki / "server.pem",
        keyfile=pki / "server.key",
        cafile=pki / "ca.pem",
        database=state / "state.db",
        log_file=state / "superlink.log",
        host="127.0.0.1",
        port=port,
    )
    home = deploy.flwr_home(state)
    home.mkdir(parents=True, exist_ok=True)
    proc = _start(deploy.superlink_command(spec), state / f"stdout-{port}.log", env={**_env(), "FLWR_HOME": str(home)})
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))

        def ready() -> bool:
            assert proc.poll() is None, (state / f"stdout-{port}.log").read_text()[-2000:]
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return True
            except OSError:
                return False

        _wait_for(ready, 90, "the SuperLink to accept TLS connections")
        address = f"127.0.0.1:{port}"
        deploy.write_connection(home, address, ca=pki / "ca.pem")
        for name in sites:
            deploy.register_site(pki / "sites" / f"{name}.pub", home, name=name)
        yield address, home
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def superlink(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The federation's SuperLink with the three sites enrolled; yields (address, flwr home)."""
    with _superlink(pki, tmp_path_factory.mktemp("superlink"), SITES) as link:
        yield link


def _site_start(address: str, pki: Path, data: Path, key: Path, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedsite.cli",
        "site",
        "start",
        "--data",
        str(data),
        "--superlink",
        address,
        "--ca",
        str(pki / "ca.pem"),
        "--key",
        str(key),
        "--state-dir",
        str(state),
        "--runtime-port",
        str(_free_port()),
        "--headers-only",
        *extra,
    ]


@dataclass
class Site:
    """A site's running `fedsite site start`: its command, its state folder and its process group."""

    cmd: list[str]
    state: Path
    proc: subprocess.Popen

    def log(self) -> str:
        return Path(self.proc._log.name).read_text(errors="replace")  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def supernodes(superlink, pki: Path, small_sites: Path, tmp_path_factory) -> Iterator[dict[str, Site]]:
    """Three enrolled sites joined through `fedsite site start`, each its own process group.

    A test may replace a site's process (a restart); whatever runs at the end is stopped here.
    """
    address, home = superlink
    sites: dict[str, Site] = {}
    try:
        for name in SITES:
            state = tmp_path_factory.mktemp(name)
            cmd = _site_start(address, pki, small_sites / name, pki / "sites" / f"{name}.key", state)
            sites[name] = Site(cmd, state, _start(cmd, state / "site.log"))

        def online() -> bool:
            for s in sites.values():
                assert s.proc.poll() is None, "a site stopped: " + s.log()[-2000:]
            return sum(n["status"] == "online" for n in deploy.list_sites(home)) == len(SITES)

        _wait_for(online, 120, "three sites online")
        yield sites
    finally:
        for s in sites.values():
            _stop(s.proc)


#: The round deadline of the deployed run, a safety net: a deployed site's first message installs the app
#: and starts a ClientApp process (2-6 minutes on a loaded 2-core machine). A crashed site is noticed
#: sooner: its heartbeat stops and the SuperLink answers for it ("Node Unavailable", about a minute).
ROUND_TIMEOUT_S = 900


def test_a_deployed_federation_survives_a_site_killed_mid_round_and_ends_with_results_per_site(
    superlink, supernodes: dict[str, Site], pki: Path, tmp_path: Path
) -> None:
    # site-03's SuperNode is killed (SIGKILL: a crash, no goodbye to the SuperLink) as round 1's training
    # reaches it, and started again at once. The SuperLink reports the node unavailable once its heartbeat
    # stops (the deadline is the safety net if it did not), and the quorum (2 of 3) lets round 1 go on
    # with the two others; the restarted site rejoins (once the SuperLink lets its stale registration
    # expire) and trains in round 2.
    address, home = superlink
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fedsite.cli",
        "run",
        "--superlink",
        address,
        "--ca",
        str(pki / "ca.pem"),
        "--state-dir",
        str(home.parent),
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--out",
        str(out),
        "--run-config",
        f"data.image-size=32 strategy.min-sites=2 strategy.round-timeout={ROUND_TIMEOUT_S}",
    ]
    proc = _start(cmd, tmp_path / "run.log")
    victim = supernodes["site-03"]
    try:
        _wait_for(lambda: "Receiving: train message" in victim.log(), 600, "round 1's training to reach site-03")
        os.killpg(victim.proc.pid, signal.SIGKILL)
        _stop(victim.proc)
        victim.proc = _start(victim.cmd, victim.state / "site-restarted.log")
        code = proc.wait(timeout=1200)
    finally:
        _stop(proc)
    printed = (tmp_path / "run.log").read_text()
    assert code == 0, printed[-3000:]
    results = json.loads((out / "results.json").read_text())
    first, second = results["rounds"]
    assert sorted(first["train"]) == ["site-01", "site-02"] and not first.get("skipped")
    (late,) = [m for m in first["missing"] if m["phase"] == "train"]
    assert late["site"] == "site-03"
    assert "Node Unavailable" in late["reason"] or "no reply within the round deadline" in late["reason"]
    assert sorted(second["train"]) == list(SITES)  # the restarted site rejoined
    assert sorted(results["final"]["per_site"]) == list(SITES)
    assert "Receiving: train message" in victim.log()  # the restarted SuperNode got round 2
    assert "round 2/2: mean dice" in printed
    assert "finished:completed" in printed
    assert "HTTP Request" not in printed
    lines = [ln for ln in printed.splitlines() if ln.strip()]
    doubled = [a for a, b in itertools.pairwise(lines) if a == b]
    assert not doubled, doubled[:5]


def test_a_supernode_whose_key_is_not_enrolled_is_refused(
    superlink, pki: Path, small_sites: Path, tmp_path: Path
) -> None:
    address, home = superlink
    cmd = _site_start(
        address, pki, small_sites / "site-01", pki / "sites" / "intruder.key", tmp_path, "--max-retries", "1"
    )
    proc = _start(cmd, tmp_path / "intruder.log")
    try:
        code = proc.wait(timeout=120)
    finally:
        _stop(proc)
    log = (tmp_path / "intruder.log").read_text()
    assert code != 0
    assert "Failed to activate SuperNode" in log
    assert len(deploy.list_sites(home)) == len(SITES)  # nothing new was enrolled


def test_a_supernode_that_does_not_trust_the_ca_cannot_connect(
    superlink, pki: Path, small_sites: Path, tmp_path: Path
) -> None:
    address, _ = superlink
    other = tmp_path / "other-ca"
    authority.init_ca(other)
    cmd = _site_start(
        address, pki, small_sites / "site-01", pki / "sites" / "site-01.key", tmp_path, "--max-retries", "1"
    )
    cmd[cmd.index("--ca") + 1] = str(other / "ca.pem")
    proc = _start(cmd, tmp_path / "untrusting.log")
    try:
        code = proc.wait(timeout=120)
    finally:
        _stop(proc)
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "untrusting.log").read_text()


def test_a_plaintext_client_is_refused(superlink, pki: Path, tmp_path: Path) -> None:
    address, _ = superlink
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/v1/fleet/create-node", body=b"{}")
        status: int | None = conn.getresponse().status
    except (http.client.HTTPException, OSError):
        status = None
    finally:
        conn.close()
    assert status is None or not 200 <= status < 300
    # a SuperNode without TLS is refused as well
    node = [
        sys.executable,
        "-c",
        "from flwr.supernode.cli import flower_supernode; flower_supernode()",
        "--superlink",
        address,
        "--insecure",
        "--max-retries",
        "1",
        "--port",
        str(_free_port()),
    ]
    proc = _start(node, tmp_path / "plain.log")
    try:
        code = proc.wait(timeout=120)
    finally:
        _stop(proc)
    assert code != 0
    assert "Failed to initialize the connection" in (tmp_path / "plain.log").read_text()


def _modified_app(dst: Path) -> Path:
    """A copy of fedsite's app with one comment added to the site's code: what a compromised coordinator might send."""
    app = dst / "fedsite"
    app.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, app / name)
    for pkg in ("common", "client", "server", "certs", "simulations"):
        shutil.copytree(REPO / pkg, app / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(app / "client" / "app.py", "a") as fh:
        fh.write("# changed by someone else\n")
    return app


def test_a_site_refuses_an_app_it_did_not_approve(pki: Path, small_sites: Path, tmp_path: Path) -> None:
    from client.approval import approve, fab_hash_of_app

    approved = tmp_path / "approved.json"
    reviewed, app_id, version = fab_hash_of_app(REPO)
    approve(approved, reviewed, app=app_id, version=version)
    modified = _modified_app(tmp_path)
    changed, _, _ = fab_hash_of_app(modified)
    assert changed != reviewed
    with _superlink(pki, tmp_path / "link", ("careful",)) as (address, home):
        cmd = _site_start(
            address,
            pki,
            small_sites / "site-01",
            pki / "sites" / "careful.key",
            tmp_path / "node",
            "--approved",
            str(approved),
        )
        node = _start(cmd, tmp_path / "careful.log")
        try:
            _wait_for(lambda: any(n["status"] == "online" for n in deploy.list_sites(home)), 120, "the site online")
            res = deploy.flwr(
                [
                    "run",
                    str(modified),
                    deploy.CONNECTION,
                    "--format",
                    "json",
                    "--run-config",
                    "num-server-rounds=1 strategy.min-sites=1 data.image-size=32",
                ],
                home,
                cwd=modified,
                timeout=300,
            )
            run_id = json.loads(res.stdout[res.stdout.find("{") :])["run-id"]
            log = tmp_path / "careful.log"
            _wait_for(lambda: "refused run" in log.read_text(), 400, "the site to refuse the run")
            deploy.flwr(["stop", str(run_id), deploy.CONNECTION], home, timeout=120)
        finally:
            _stop(node)
    text = (tmp_path / "careful.log").read_text()
    assert f"refused run {run_id}: app {changed[:12]}... is not approved" in text
    assert "uses approved app" not in text  # the executor never launched the modified code


def test_a_restarted_superlink_keeps_its_enrolled_sites(pki: Path, tmp_path: Path) -> None:
    with _superlink(pki, tmp_path, ("careful",)) as (_, home):
        before = {n["node-id"] for n in deploy.list_sites(home)}
    assert len(before) == 1
    with _superlink(pki, tmp_path, ()) as (_, home):  # same database, nothing registered this time
        after = {n["node-id"]: n["status"] for n in deploy.list_sites(home)}
    assert set(after) == before and all(s != "unregistered" for s in after.values())
