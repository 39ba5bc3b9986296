"""Bad input ends in one sentence on stderr with exit status 2, before any training, rollout or file:
one parametrised test over every script's flags and output locations, and the checkpoint whose
contents do not match its kind (once a hang: the evaluation pool respawned its failing workers)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A_FILE = "a_file"  # made in the test's directory; paths under it cannot be directories


def run(script, args, cwd, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


CASES = [
    ("diffusion_ppo.py", ["--episodes-per-update", "0"], "--episodes-per-update"),
    ("diffusion_ppo.py", ["--minibatch-size", "0"], "--minibatch-size"),
    ("diffusion_ppo.py", ["--eval-every", "0"], "--eval-every"),
    ("diffusion_ppo.py", ["--act-exec", "0"], "--act-exec"),
    ("diffusion_ppo.py", ["--act-exec", "5"], "--act-horizon"),
    ("diffusion_ppo.py", ["--num-demos", "-1"], "--num-demos"),
    ("diffusion_ppo.py", ["--eval-episodes", "51"], "--eval-episodes"),
    ("diffusion_ppo.py", ["--critic-warmup-max", "-1"], "--critic-warmup-max"),
    ("diffusion_ppo.py", ["--time-limit-min", "0"], "--time-limit-min"),
    ("diffusion_ppo.py", ["--out-dir", f"{A_FILE}/runs"], "--out-dir"),
    ("gaussian_ppo.py", ["--episodes-per-update", "0"], "--episodes-per-update"),
    ("gaussian_ppo.py", ["--out-dir", f"{A_FILE}/runs"], "--out-dir"),
    ("collect_demos.py", ["--task", "libero_spatial_0", "--max-attempts", "-1"], "--max-attempts"),
    ("collect_demos.py", ["--task", "libero_spatial_0", "--num-workers", "-1"], "--num-workers"),
    ("collect_demos.py", ["--task", "libero_spatial_0", "--seed", "-1"], "--seed"),
    ("collect_demos.py", ["--task", "libero_spatial_0", "--out-path", A_FILE], "--overwrite"),
    ("collect_demos.py", ["--task", "libero_spatial_0", "--out-path", f"{A_FILE}/x.hdf5"], "output directory"),
    ("eval_libero.py", ["--checkpoint-path", "x.pt", "--num-workers", "-1"], "--num-workers"),
    ("eval_libero.py", ["--checkpoint-path", "x.pt", "--max-steps", "0"], "--max-steps"),
    ("eval_libero.py", ["--checkpoint-path", "x.pt", "--video", "-1"], "--video"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--batch-size", "0"], "--batch-size"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--log-every", "0"], "--log-every"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--save-every", "0"], "--save-every"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--warmup-steps", "-1"], "--warmup-steps"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--image-size", "0"], "--image-size"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--channels", "4"], "--channels"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--torch-threads", "-1"], "--torch-threads"),
    ("train_vla.py", ["--demos-paths", "x.hdf5", "--out-dir", f"{A_FILE}/runs"], "--out-dir"),
]


@pytest.mark.parametrize("script, args, word", CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_sentence_before_any_work(tmp_path, script, args, word):
    (tmp_path / A_FILE).write_text("not a directory")
    r = run(script, args, tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and word in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == [A_FILE]  # no run folder, data file or results left


@pytest.mark.parametrize("script, flag", [("eval_libero.py", "--checkpoint-path"), ("collect_demos.py", "--policy")])
def test_checkpoint_without_its_contents_is_one_sentence_not_a_hang(tmp_path, script, flag):
    torch.save({"kind": "diffusion_ppo", "task": "libero_spatial_0", "iteration": 0}, tmp_path / "bad.pt")
    extra = ["--num-episodes", "1", "--num-workers", "1"] if script == "eval_libero.py" else ["--num-workers", "1"]
    r = run(script, [flag, "bad.pt", *extra], tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "bad.pt" in message or "cannot be rebuilt" in message, message
