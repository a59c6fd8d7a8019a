"""The test suite as a new user and CI meet it: a fresh clone, a fresh venv, no pip cache.

Clones the committed HEAD into a temporary folder and runs one of
  lock     `make setup`, then `make test`             (requirements.lock; skips `slow` tests)
  ci       `make setup`, then `CI=true bash .ci/run`  (requirements.lock; every test)
  latest   `make test-latest`                         (the newest releases pyproject allows)
and records the pytest counts, the set-up and test times and the versions installed into
bench/results/test_suite.json (one entry per mode, the others kept), which the README's
development table is generated from.

    python bench/test_suite.py lock|ci|latest [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import PACKAGES, RESULTS, ROOT, provenance

COUNTS = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|deselected|errors?)")
MODES = {"lock": (["make", "setup"], ["make", "test"], ".venv"),
         "ci": (["make", "setup"], ["bash", ".ci/run"], ".venv"),
         "latest": (None, ["make", "test-latest"], ".venv-latest")}


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    return code, round(time.perf_counter() - start, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=list(MODES))
    ap.add_argument("--json", type=Path, default=RESULTS / "test_suite.json")
    ap.add_argument("--log", type=Path, help="also keep the set-up's and tests' output here "
                    "(e.g. with PYTEST_ARGS=--durations=30 in the environment)")
    args = ap.parse_args()
    setup, test, venv = MODES[args.mode]
    with tempfile.TemporaryDirectory(prefix="distill-suite-") as tmp:
        clone, log = Path(tmp) / "clone", Path(tmp) / "log.txt"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        # What ran is the clone's HEAD (the checkout may move on while the suite runs).
        tested = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, check=True,
                                capture_output=True, text=True).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "VIRTUAL_ENV")}
        # No cache a new user lacks: pip's, the toolkit's, torch.compile's (/tmp/torchinductor_*
        # outlives a run: with it warm, a compile test took 6 s instead of 30).
        env |= {"PIP_NO_CACHE_DIR": "1", "DISTILL_CACHE": str(Path(tmp) / "cache"),
                "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")}
        if args.mode == "ci":
            env["CI"] = "true"
        setup_code, setup_seconds = timed(setup, clone, env, log) if setup else (0, 0.0)
        code, seconds = timed(test, clone, env, log) if setup_code == 0 else (setup_code, 0.0)
        text = log.read_text(errors="replace")
        if args.log:
            args.log.write_text(text, encoding="utf-8")
        summary = [line for line in text.splitlines() if COUNTS.search(line) and " in " in line]
        counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
                  for n, kind in COUNTS.findall(summary[-1])} if summary else {}
        freeze = subprocess.run([str(clone / venv / "bin" / "python"), "-m", "pip", "freeze"],
                                capture_output=True, text=True).stdout
        versions = {name: next((line.split("==")[1] for line in freeze.splitlines()
                                if line.lower().startswith(name + "==")), None)
                    for name in PACKAGES}
        if code != 0:
            print(text[-5000:], file=sys.stderr)
    machine = provenance()
    del machine["packages"]  # this script's interpreter; the suite's are `versions`
    machine |= {"commit": tested, "dirty": False}  # a fresh clone of a commit is clean
    entry = {"command": " ".join(test), "exit_code": code, "counts": counts,
             "setup_seconds": setup_seconds, "test_seconds": seconds, "versions": versions,
             "provenance": machine}
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results[args.mode] = entry
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"{args.mode}: exit {code}, {counts}, set-up {setup_seconds} s, tests {seconds} s "
          f"-> {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
