"""Bad input ends in one sentence on stderr with exit status 2, before any training, rollout or file:
one parametrised test over every script's flags and output locations, and the checkpoint whose
contents do not match its kind (once a hang: the evaluation pool respawned its failing workers)."""

import concurrent.futures
import json

import h5py
import pytest
import torch
from conftest import assert_one_sentence_error, run

pytestmark = pytest.mark.slow  # every case starts a script (torch and LIBERO imports)
A_FILE = "a_file"  # made in the test's directory; paths under it cannot be directories


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


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's run, started four at a time (each is mostly a Python start-up importing torch and
    LIBERO), each in a directory of its own holding only A_FILE: index -> (directory, result)."""
    base = tmp_path_factory.mktemp("bad_input")

    def one(i):
        cwd = base / str(i)
        cwd.mkdir()
        (cwd / A_FILE).write_text("not a directory")
        return cwd, run(CASES[i][0], CASES[i][1], cwd, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(enumerate(pool.map(one, range(len(CASES)))))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]}:{' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_sentence_before_any_work(outcomes, i):
    cwd, r = outcomes[i]
    assert_one_sentence_error(r, CASES[i][2], status=2)
    assert sorted(p.name for p in cwd.iterdir()) == [A_FILE]  # no run folder, data file or results left


@pytest.mark.parametrize("script, flag", [("eval_libero.py", "--checkpoint-path"), ("collect_demos.py", "--policy")])
def test_checkpoint_without_its_contents_is_one_sentence_not_a_hang(tmp_path, script, flag):
    torch.save({"kind": "diffusion_ppo", "task": "libero_spatial_0", "iteration": 0}, tmp_path / "bad.pt")
    extra = ["--num-episodes", "1", "--num-workers", "1"] if script == "eval_libero.py" else ["--num-workers", "1"]
    r = run(script, [flag, "bad.pt", *extra], tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "bad.pt" in message or "cannot be rebuilt" in message, message


def test_malformed_files_are_one_sentence(tmp_path):
    """A demos file whose only group is demo_x, a checkpoint without its task, a results file that
    is a JSON list: each named in one sentence, nothing written."""
    import numpy as np

    import diffusion_ppo as dp

    with h5py.File(tmp_path / "demo_x.hdf5", "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps({"language_instruction": "pick up the bowl"})
        data.create_group("demo_x")["actions"] = np.zeros((5, 7))
    policy = dp.DiffusionPolicy(109, 7, 4, 4, 20, 10, 32, 0.1, 0.1, 3.0, np.zeros(109), np.ones(109), -np.ones(7), np.ones(7))
    torch.save(dict(kind="diffusion_ppo", task="libero_spatial_0", **policy.config(), model=policy.state_dict(),
                    iteration=0), tmp_path / "expert.pt")
    torch.save({"kind": "diffusion_ppo"}, tmp_path / "no_task.pt")
    (tmp_path / "list.json").write_text("[]")
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ("diffusion_ppo.py", ["--task", "libero_spatial_0", "--demos-path", "demo_x.hdf5"], "no demo_<i> groups"),
        ("train_vla.py", ["--demos-paths", "demo_x.hdf5"], "no demo_<i> groups"),
        ("eval_libero.py", ["--checkpoint-path", "no_task.pt"], "names no task"),
        ("collect_demos.py", ["--policy", "no_task.pt"], "no_task.pt"),
        ("eval_libero.py", ["--checkpoint-path", "expert.pt", "--results-path", "list.json"], "not a results JSON"),
    ]
    for script, args, words in cases:
        assert_one_sentence_error(run(script, args, tmp_path), words, status=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, script
