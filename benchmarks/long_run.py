"""Memory and time over a long run: peak RSS of the server and of each site, and round time, per round.

One real Flower simulation (Ray) of ``--rounds`` rounds (default 30). A sampler thread reads, every
``--interval`` seconds, the resident memory of this process (the server: the ServerApp runs in the
driver) and of each Ray worker process (the sites); each round's peak is the highest sample between
two checkpoints (the server's ``after_round`` hook). Round time is the server's own ``rounds[r].seconds``.
Goal (issue 10): round 30 <= 1.05 x round 3 for both memory and time.

Usage::

    python benchmarks/long_run.py --out benchmarks/results/long_run.json
    python benchmarks/long_run.py --rounds 6 --out /tmp/long_run.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (Linux /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> dict[int, str]:
    """``{pid: command line}`` of every process below ``root`` (Linux /proc)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, par in parent.items():
            if par == p and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
                except OSError:
                    found[child] = ""
                frontier.append(child)
    return found


class Sampler:
    """Samples the RSS of this process and of the Ray workers; keeps each round's peaks."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.me = os.getpid()
        self.server_peak = 0
        self.site_peak: dict[int, int] = {}
        self.rounds: list[dict] = []
        self._lock = threading.Lock()
        self._tick = 0
        self._pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _workers(self) -> list:
        """This run's site processes: Ray workers (``ray::ClientAppActor``) below this process's raylet.

        Only descendants count: other Ray clusters on the machine are not this run's.
        """
        return [
            pid
            for pid, cmd in _descendants(self.me).items()
            if "ClientAppActor" in cmd or (cmd.startswith("ray::") and "IDLE" not in cmd)
        ]

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._tick % 10 == 0:  # the process tree changes rarely; scanning /proc costs
                self._pids = self._workers()
            self._tick += 1
            rss = _rss(self.me)
            workers = {pid: _rss(pid) for pid in self._pids}
            with self._lock:
                self.server_peak = max(self.server_peak, rss)
                for pid, w in workers.items():
                    self.site_peak[pid] = max(self.site_peak.get(pid, 0), w)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def close_round(self, server_round: int, _arrays: object) -> None:
        """The server's after-round hook: store this round's peaks and start the next round's."""
        with self._lock:
            self.rounds.append(
                {
                    "round": server_round,
                    "server_peak_rss_mb": self.server_peak / 2**20,
                    "site_peak_rss_mb": {str(pid): v / 2**20 for pid, v in sorted(self.site_peak.items())},
                    "t": time.time(),
                }
            )
            self.server_peak = _rss(self.me)
            self.site_peak = {}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    """Run the long federation and write the per-round figures and the round-N/round-3 ratios as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run-config", default="data.image-size=32 data.spacing-mm=7.5 sim.patients=3 sim.slices=6")
    args = ap.parse_args(argv)

    from common.config import RunConfig, flatten, parse_overrides, parse_run_config
    from simulations.runner import simulate

    flat = flatten(RunConfig())
    flat.update(parse_overrides([args.run_config]))
    flat.update({"num-server-rounds": args.rounds, "sim.sites": args.sites, "train.local-epochs": 1, "seed": 1})
    cfg = parse_run_config(flat)
    sampler = Sampler(args.interval)
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="fedsite-long-") as tmp:
        cfg = parse_run_config({**flatten(cfg), "sim.root": str(Path(tmp) / "sites")})
        results = simulate(cfg, Path(tmp) / "run", after_round=sampler.close_round)
    sampler.stop()
    rounds = []
    for rec, mem in zip(results["rounds"], sampler.rounds, strict=True):
        sites = list(mem["site_peak_rss_mb"].values())
        rounds.append(
            {
                "round": rec["round"],
                "seconds": rec["seconds"],
                "server_peak_rss_mb": round(mem["server_peak_rss_mb"], 1),
                "site_peak_rss_mb_max": round(max(sites), 1) if sites else None,
                "site_peak_rss_mb": {k: round(v, 1) for k, v in mem["site_peak_rss_mb"].items()},
            }
        )

    def ratio(key: str) -> float | None:
        a, b = rounds[2].get(key), rounds[-1].get(key)
        return round(b / a, 3) if a and b else None

    report = {
        "rounds": args.rounds,
        "sites": args.sites,
        "config": args.run_config,
        "goal": "round N <= 1.05 x round 3",
        "ratio_last_over_round3": {
            "seconds": ratio("seconds"),
            "server_peak_rss": ratio("server_peak_rss_mb"),
            "site_peak_rss_max": ratio("site_peak_rss_mb_max"),
        },
        "per_round": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratio_last_over_round3"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
