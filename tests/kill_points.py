"""Kill a run at its N-th file operation, then resume it: the driver behind test_kill_points.py.

Run as a script in a fresh interpreter so that no torch thread pool exists when it forks:

    python tests/kill_points.py RECIPE.yaml WORKDIR N [N ...]

The parent only imports; every run happens in a forked child, which inherits the imports (a
second of training per child instead of seconds of imports): the toolkit imports lazily, so
after the reference run the parent imports every module that run did. For each N:

  WORKDIR/kill-N/run   a child runs the recipe and `os._exit`s just before its N-th call of
                       `os.replace` or `shutil.rmtree` (every commit and every deletion of the
                       toolkit's writers goes through one of them); a second child resumes it.

and `WORKDIR/reference/run`, a run never interrupted, whose calls are listed in
`WORKDIR/trace.json` ([function, path relative to the run] per call) so that a test can pick its
points. `WORKDIR/results.json` holds each N's exit status of the killed and the resumed child.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

KILLED = 77  # the exit status of a child killed on purpose


def _instrument(run_dir: Path, kill_at: int | None, trace: list[list[str]]) -> None:
    """Count (and list) the calls of os.replace and shutil.rmtree; die before call `kill_at`."""
    real = {"replace": os.replace, "rmtree": shutil.rmtree}

    def wrap(name: str):
        def call(path, *args, **kwargs):
            trace.append([name, os.path.relpath(os.fspath(path), run_dir)])
            if kill_at is not None and len(trace) == kill_at:
                os._exit(KILLED)  # as SIGKILL would: no cleanup, no finally blocks
            return real[name](path, *args, **kwargs)
        return call

    os.replace = wrap("replace")
    shutil.rmtree = wrap("rmtree")


def _child(job) -> int:
    """Run `job()` in a forked child; its exit status (KILLED, 0 for success, 1 for an error)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            job()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(recipe_path: str, workdir: str, points: list[int]) -> None:
    import torch
    from rich.console import Console

    from distill import load_recipe, run_recipe
    from distill.run.pipeline import resume_recipe

    torch.set_num_threads(1)  # bitwise-equal runs need one summation order
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the script
    work = Path(workdir)

    def start(run_dir: Path, kill_at: int | None, trace: list[list[str]]):
        def job() -> None:
            _instrument(run_dir, kill_at, trace)
            run_recipe(load_recipe(recipe_path), output=run_dir, console=quiet)
            if kill_at is None:
                (work / "trace.json").write_text(json.dumps(trace))
                (work / "modules.json").write_text(json.dumps(sorted(sys.modules)))
        return job

    results = {"reference": _child(start(work / "reference" / "run", None, []))}
    if results["reference"] == 0:
        for name in json.loads((work / "modules.json").read_text()):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module only its importer can load; the
                pass           # child then imports it as the reference did
        gc.freeze()  # as the CLI does: collections at stage ends skip the modules
    for n in points:
        run_dir = work / f"kill-{n}" / "run"
        killed = _child(start(run_dir, n, []))
        resumed = _child(lambda: resume_recipe(run_dir, console=quiet)) if killed == KILLED \
            else None
        results[str(n)] = {"killed": killed, "resumed": resumed}
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(n) for n in sys.argv[3:]])
