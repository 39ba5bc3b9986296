"""Helpers shared by every test file, and the `slow` marker.

Tests that start LIBERO (a script in a subprocess, or an environment in this process) are marked
`slow`; `pytest -m "not slow" -q tests` runs the rest (maths, copy rule, metric definitions) in
seconds. CI runs everything."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts LIBERO (a script end to end, or an environment); deselect with -m 'not slow'")


def run(script, args, cwd, timeout=900):
    """Run a top-level script (its file name, e.g. "collect_demos.py") with `args` in `cwd`."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def assert_one_sentence_error(r, *words, status=None):
    """The run failed (with exit `status` when given) and its last stderr line is one `error: ...`
    sentence holding every one of `words`, with no traceback."""
    assert r.returncode != 0 if status is None else r.returncode == status, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(w in message for w in words), message


# Tiny arguments for the two PPO scripts: 8-step episodes are 2 chunk steps, so 3 episodes per update take
# 2 x 2 chunk steps of the 2 envs (4 episodes, 32 env steps). Nothing succeeds in 8 steps, so
# --signal-min-return-std 0 lets the actor update all the same.
TINY_PPO = ["--num-envs", "2", "--episodes-per-update", "3", "--bc-epochs", "1", "--eval-episodes", "2",
            "--max-episode-steps", "8", "--critic-warmup-max", "0", "--update-epochs", "2", "--signal-min-return-std", "0"]


def tiny_ppo_run(script, cwd, *extra):
    """One tiny run of a PPO script in `cwd`, which holds no demos (so the script collects 2 scripted ones
    itself), one PPO update: returns (cwd, run_dir, stdout)."""
    r = run(script, ["--num-demos", "2", "--total-iterations", "1", *extra, *TINY_PPO], cwd)
    assert_ok(r)
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir, r.stdout
