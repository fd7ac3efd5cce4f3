"""Deployment commands without a network: what they refuse, what they start, what `fedsite run` shows."""

from __future__ import annotations

import io
import itertools
import subprocess
from pathlib import Path
from typing import ClassVar

import pytest

from certs import authority
from client import deploy as site_deploy
from common.config import ConfigError
from fedsite.cli import main
from server import deploy, submit
from tests.paths import REPO


@pytest.fixture()
def pki(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    authority.init_ca(d)
    authority.issue_server_cert(d, ["127.0.0.1"])
    authority.make_site_key(d, "site-01")
    return d


_REAL_POPEN = subprocess.Popen


class _NoProcess:
    """Stands in for subprocess.Popen for Flower's processes: records the command, starts nothing.

    Other commands (a library asking ``uname -p``) run as usual.
    """

    started: ClassVar[list[list[str]]] = []

    def __new__(cls, cmd, *args, **kwargs):
        if not any(k in str(c) for c in cmd for k in ("flower", "superlink", "approved_exec")):
            return _REAL_POPEN(cmd, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, cmd: list[str], *_args: object, **_kwargs: object) -> None:
        _NoProcess.started.append(list(cmd))
        self.stdout = io.BytesIO(b"")  # what the process printed (read by fedsite when it watches the output)

    pid = 4242

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def poll(self) -> int:
        return 0


@pytest.fixture()
def no_process(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    _NoProcess.started = []
    monkeypatch.setattr(subprocess, "Popen", _NoProcess)
    return _NoProcess.started


def test_superlink_is_not_started_without_tls_files(tmp_path: Path, no_process, capsys) -> None:
    code = main(["server", "start", "--certs-dir", str(tmp_path / "none"), "--state-dir", str(tmp_path / "st")])
    assert code == 2
    assert "fedsite certs init" in capsys.readouterr().err
    assert no_process == []


def test_superlink_starts_with_tls_supernode_auth_state_and_no_dependency_installation(
    pki: Path, tmp_path: Path, no_process
) -> None:
    assert (
        main(["server", "start", "--certs-dir", str(pki), "--state-dir", str(tmp_path / "st"), "--port", "8443"]) == 0
    )
    (cmd,) = no_process
    args = dict(itertools.pairwise(cmd))
    assert args["--ssl-certfile"] == str(pki / "server.pem") and args["--ssl-keyfile"] == str(pki / "server.key")
    assert args["--ssl-ca-certfile"] == str(pki / "ca.pem")
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert args["--database"] == str((tmp_path / "st" / "state.db").resolve())
    assert args["--log-file"] == str((tmp_path / "st" / "superlink.log").resolve())
    assert args["--port"] == "8443"


def test_insecure_superlink_says_why_it_is_unsafe(tmp_path: Path, no_process, capsys) -> None:
    assert (
        main(["server", "start", "--insecure", "--certs-dir", str(tmp_path / "none"), "--state-dir", str(tmp_path)])
        == 0
    )
    err = capsys.readouterr().err
    assert "clear text" in err and "any machine" in err
    assert "--insecure" in no_process[0] and "--enable-supernode-auth" not in no_process[0]


def test_flower_reads_the_connection_fedsite_writes(pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "home"
    deploy.write_connection(home, "fl.example.org:8000", ca=pki / "ca.pem")
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection(deploy.CONNECTION)
    assert conn.address == "fl.example.org:8000"
    assert conn.root_certificates == str((pki / "ca.pem").resolve())
    assert conn.insecure is False
    assert read_superlink_connection(None).name == deploy.CONNECTION  # the default connection


def test_site_start_refuses_a_folder_without_usable_images_and_starts_nothing(
    pki: Path, tmp_path: Path, no_process, capsys
) -> None:
    data = tmp_path / "site"
    (data / "dicom").mkdir(parents=True)
    (data / "dicom" / "notes.txt").write_text("not an image")
    code = _start_site(data, pki, tmp_path, headers_only=False)
    err = capsys.readouterr().err
    assert code == 1
    assert "refused" in err and "no usable series" in err
    assert no_process == []


def test_site_start_runs_the_supernode_with_the_ca_the_key_and_the_data_folder(
    small_sites: Path, pki: Path, tmp_path: Path, no_process
) -> None:
    assert _start_site(small_sites / "site-02", pki, tmp_path) == 0
    (cmd,) = no_process
    args = dict(itertools.pairwise(cmd))
    assert Path(cmd[0]).name == "flower-supernode"
    assert args["--superlink"] == "fl.example.org:8000"
    assert args["--root-certificates"] == str(pki / "ca.pem")
    assert args["--auth-supernode-private-key"] == str(pki / "sites" / "site-01.key")
    assert f"data-dir='{small_sites / 'site-02'}'" in args["--node-config"]
    assert "site-name='site-02'" in args["--node-config"]
    assert "--insecure" not in cmd and "--max-retries" not in cmd  # keeps retrying while the SuperLink is down


class _RefusedTwice(_NoProcess):
    """A SuperNode the SuperLink refuses to activate twice (a crashed site still held as online), then joins."""

    def __init__(self, cmd: list[str], *args: object, **kwargs: object) -> None:
        super().__init__(cmd, *args, **kwargs)
        refused = len(_NoProcess.started) <= 2
        self.code = 1 if refused else 0
        if refused:  # Flower's own words when activation fails (flwr.supernode.fleet_http_connection)
            self.stdout = io.BytesIO(
                b"ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
                b"[code: 1103] Failed to activate SuperNode.\n"
            )

    def wait(self, timeout: float | None = None) -> int:
        return self.code

    def poll(self) -> int:
        return self.code


def _start_site(data: Path, pki: Path, tmp_path: Path, *extra: str, headers_only: bool = True) -> int:
    """`fedsite site start` on ``data`` with the test PKI's CA and site-01's key (Flower's processes faked)."""
    return main(
        [
            "site",
            "start",
            "--data",
            str(data),
            "--superlink",
            "fl.example.org:8000",
            *(["--headers-only"] if headers_only else []),
            "--ca",
            str(pki / "ca.pem"),
            "--key",
            str(pki / "sites" / "site-01.key"),
            "--state-dir",
            str(tmp_path / "st"),
            *extra,
        ]
    )


def test_a_restarted_site_keeps_trying_to_join_while_the_superlink_still_holds_it_online(
    small_sites: Path, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import client.cli

    _NoProcess.started = []
    monkeypatch.setattr(subprocess, "Popen", _RefusedTwice)
    monkeypatch.setattr(client.cli, "REJOIN_PAUSE_S", 0.0)
    assert _start_site(small_sites / "site-02", pki, tmp_path) == 0
    assert len(_NoProcess.started) == 3  # refused, refused, joined
    assert "check that the coordinator enrolled this site's public key" in capsys.readouterr().out


@pytest.mark.parametrize("limit", [["--max-retries", "1"], ["--rejoin-wait", "0"]])
def test_a_site_refused_activation_stops_at_once_with_max_retries_or_no_rejoin_wait(
    limit: list[str], small_sites: Path, pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.cli

    _NoProcess.started = []
    monkeypatch.setattr(subprocess, "Popen", _RefusedTwice)
    monkeypatch.setattr(client.cli, "REJOIN_PAUSE_S", 0.0)
    assert _start_site(small_sites / "site-02", pki, tmp_path, *limit) == 1
    assert len(_NoProcess.started) == 1


def test_site_start_without_the_site_key_names_the_command_that_makes_it(
    small_sites: Path, pki: Path, tmp_path: Path
) -> None:
    spec = site_deploy.SiteSpec(
        superlink="h:1",
        data_dir=small_sites / "site-01",
        ca=pki / "ca.pem",
        key=tmp_path / "missing.key",
        name="site-01",
        state_dir=tmp_path,
    )
    with pytest.raises(site_deploy.SiteStartError, match="fedsite certs site NAME"):
        site_deploy.supernode_command(spec)


def test_fedsite_run_shows_its_own_lines_and_warnings_but_not_flower_chatter() -> None:
    shown = [
        "round 1/2: mean dice 0.412, worst 0.301 (site-02), 3 sites, 0 rejected, 12.0s",
        "\x1b[93mWARNING \x1b[0m:   site-03 did not reply",
        "site      dice",
    ]
    hidden = [
        'HTTP Request: POST https://127.0.0.1:8000/v1/runtime/push-logs "HTTP/1.1 200 OK"',
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]",
        "INFO :      configure_train: Sampled 3 nodes (out of 3)",
    ]
    assert all(submit.keep_line(s, verbose=False) for s in shown)
    assert not any(submit.keep_line(h, verbose=False) for h in hidden)
    assert all(submit.keep_line(h, verbose=True) for h in hidden)


def test_fedsite_run_rejects_an_unknown_run_config_key_before_submitting() -> None:
    import argparse

    args = argparse.Namespace(
        run_config=["train.lrr=0.1"], rounds=None, local_epochs=None, strategy=None, seed=None, out=None
    )
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        submit.run_config_overrides(args)


def _run_args(**given: object):
    import argparse

    base = {"run_config": [], "rounds": None, "local_epochs": None, "strategy": None, "seed": None, "out": None}
    return argparse.Namespace(**{**base, **given})


def test_fedsite_run_resume_submits_the_checkpointed_runs_own_config_set_to_continue(
    tmp_path: Path, task_identity: None, capsys
) -> None:
    from common.config import parse_run_config
    from server.app import run_federation
    from tests.flower_helpers import FakeGrid

    out = tmp_path / "run"
    cfg = parse_run_config(
        {
            "num-server-rounds": 2,
            "model.channels": "4,8",
            "data.image-size": 32,
            "train.lr": 0.002,
            "output.dir": str(out),
            "output.tracking-uri": "file:///nonexistent-dir-for-tests/mlruns",
        }
    )

    class Stop(RuntimeError):
        pass

    def kill_after_1(rnd: int, _arrays: object) -> None:
        if rnd == 1:
            raise Stop

    with pytest.raises(Stop):
        run_federation(FakeGrid([11, 12], answer=_EchoSites()), cfg, after_round=kill_after_1)
    overrides = submit.run_config_overrides(_run_args(resume=out))
    assert overrides["output.resume"] is True and overrides["output.dir"] == str(out.resolve())
    assert overrides["train.lr"] == 0.002 and overrides["num-server-rounds"] == 2  # the run's own config
    assert f"resuming {out.resolve()} after round 1" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="drop --rounds"):
        submit.run_config_overrides(_run_args(resume=out, rounds=5))
    with pytest.raises(ConfigError, match="checkpoint"):
        submit.run_config_overrides(_run_args(resume=tmp_path / "nothing-here"))


class _EchoSites:
    """Sites that send the global model back unchanged (enough for the server to write a checkpoint)."""

    def __call__(self, msg):
        from flwr.app import MessageType

        from tests.flower_helpers import eval_reply, train_reply

        node = msg.metadata.dst_node_id
        site = {11: "site-01", 12: "site-02"}[node]
        if msg.metadata.message_type == MessageType.EVALUATE:
            return eval_reply(node, site, {"dice": 0.5, "loss": 0.5, "num-examples": 4, "uniform-weight": 1.0}, to=msg)
        weights = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        return train_reply(node, site, weights, {"num-examples": 4, "train-loss": 0.5, "uniform-weight": 1.0}, to=msg)


def _tiny_app(root: Path, body: str) -> Path:
    app = root / "tinyapp"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "tinyapp"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "someone"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tiny:server"\nclientapp = "tiny:client"\n'
    )
    (app / "tiny.py").write_text(body)
    return app


def test_an_app_changed_in_one_byte_is_refused_and_the_reviewed_one_is_not(tmp_path: Path) -> None:
    from client.approval import approve, fab_hash_of_app, load_approved, refusal

    reviewed, app_id, version = fab_hash_of_app(_tiny_app(tmp_path / "a", "x = 1\n"))
    changed, _, _ = fab_hash_of_app(_tiny_app(tmp_path / "b", "x = 2\n"))
    again, _, _ = fab_hash_of_app(_tiny_app(tmp_path / "c", "x = 1\n"))
    assert (app_id, version) == ("someone/tinyapp", "1.0.0")
    assert again == reviewed != changed  # Flower builds FABs reproducibly: the site can recompute the hash
    listed = tmp_path / "approved.json"
    approve(listed, reviewed, app=app_id, version=version)
    assert refusal(reviewed, load_approved(listed)) is None
    reason = refusal(changed, load_approved(listed))
    assert reason is not None and changed[:12] in reason and "someone/tinyapp 1.0.0" in reason


def test_an_approved_list_that_is_not_json_is_an_error_that_names_the_fix(tmp_path: Path) -> None:
    from client.approval import ApprovalError, approve, load_approved

    listed = tmp_path / "approved.json"
    listed.write_text("fab-hash: abc")
    with pytest.raises(ApprovalError, match="fedsite site approve"):
        load_approved(listed)
    with pytest.raises(ApprovalError, match="64 hex digits"):
        approve(tmp_path / "new.json", "not-a-hash")


def test_site_start_with_an_approved_list_runs_the_supernode_without_its_own_executor_and_fedsites_beside_it(
    small_sites: Path,
    pki: Path,
    tmp_path: Path,
    no_process,
) -> None:
    code = main(
        [
            "site",
            "start",
            "--data",
            str(small_sites / "site-01"),
            "--superlink",
            "h:8000",
            "--headers-only",
            "--ca",
            str(pki / "ca.pem"),
            "--key",
            str(pki / "sites" / "site-01.key"),
            "--state-dir",
            str(tmp_path),
            "--runtime-port",
            "9191",
            "--approved",
            str(tmp_path / "approved.json"),
        ]
    )
    assert code == 0
    node, executor = no_process
    assert node[node.index("--isolation") + 1] == "process"
    assert executor[1:3] == ["-m", "client.approved_exec"]
    assert executor[executor.index("--runtime-api-address") + 1] == "127.0.0.1:9191"
    assert executor[executor.index("--approved") + 1] == str((tmp_path / "approved.json").resolve())


def test_stopping_a_foreground_command_stops_the_process_it_started(tmp_path: Path) -> None:
    import os
    import signal
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys; from common.processes import run_foreground; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pidfile)!r}, 'w').write(str(p.pid)); sys.exit(run_foreground([p]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = _REAL_POPEN([sys.executable, "-c", code], env=env)
    try:
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.1)
        child = int(pidfile.read_text())
        parent.send_signal(signal.SIGTERM)  # what `kill` or a service manager sends
        assert parent.wait(timeout=30) == 130
        time.sleep(0.5)
        try:
            os.kill(child, 0)
            gone = False
        except ProcessLookupError:
            gone = True
        assert gone, "the child outlived the command"
    finally:
        if parent.poll() is None:
            parent.kill()
