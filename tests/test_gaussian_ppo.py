"""Tests of gaussian_ppo.py: a tiny end-to-end run on the CPU and its rollout through
collect_demos.py, the copied blocks that must match diffusion_ppo.py, the user errors, and the
Gaussian maths."""

import json
import math

import gaussian_ppo as gp
import numpy as np
import pytest
import torch
from conftest import assert_one_sentence_error, run, tiny_ppo_run

SCRIPT = "gaussian_ppo.py"

DESIGN_KEYS = {"kind", "task", "obs_dim", "act_dim", "obs_horizon", "act_horizon", "act_exec", "normalizer", "model",
               "ema", "critic", "args", "iteration", "env_steps", "eval_success", "init_std", "min_std", "max_std"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_ppo_run(SCRIPT, tmp_path_factory.mktemp("tiny_gaussian"))


@pytest.mark.slow
def test_tiny_run_updates_actor_and_critic_and_writes_checkpoints(tiny_run):
    cwd, run_dir, stdout = tiny_run
    assert "collecting 2 scripted demos with collect_demos.py" in stdout
    assert "iter 0 (BC)" in stdout and "iter 1/1" in stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("bc_success", "final_success", "best_success"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["env_steps"] == 2 * 4 * 4  # 3 episodes per update: 2 envs x 4 chunk steps x 4 actions
    assert summary["actor_grad_steps"] >= 1 and summary["critic_grad_steps"] >= 1
    assert (run_dir / "success.png").is_file()

    first = torch.load(run_dir / "expert.pt", weights_only=True)  # saved by the BC evaluation, before any update
    last = torch.load(run_dir / "last.pt", weights_only=True)
    for ckpt in (first, last):
        assert DESIGN_KEYS <= set(ckpt), DESIGN_KEYS - set(ckpt)
        assert ckpt["kind"] == "gaussian_ppo" and ckpt["task"] == "libero_spatial_0"
        assert (ckpt["obs_dim"], ckpt["act_dim"], ckpt["act_horizon"]) == (109, 7, 4)
    assert last["iteration"] == 1 and first["iteration"] == 0
    # the gradient steps moved the mean network, the log-std and the critic
    assert any(not torch.equal(first["model"][k], last["model"][k]) for k in first["model"] if k.startswith("actor_ft."))
    assert not torch.equal(first["model"]["log_std"], last["model"]["log_std"])
    assert any(not torch.equal(first["critic"][k], last["critic"][k]) for k in first["critic"])
    torch.testing.assert_close(first["model"]["log_std"], torch.full((4, 7), math.log(0.1)))

    policy = gp.GaussianPolicy.from_checkpoint(last)
    actions = policy.act(np.zeros((3, last["obs_dim"]), np.float32))
    assert actions.shape == (3, 4, 7)
    assert np.all(actions >= policy.act_min.numpy() - 1e-6) and np.all(actions <= policy.act_max.numpy() + 1e-6)


@pytest.mark.slow
def test_checkpoint_rolls_out_through_collect_demos(tiny_run, tmp_path):
    """collect_demos.py loads the Gaussian checkpoint and rolls it out; the tiny policy succeeds
    nowhere, so it says so in one sentence and writes nothing."""
    _, run_dir, _ = tiny_run
    out = tmp_path / "gauss.hdf5"
    r = run("collect_demos.py", ["--policy", str(run_dir / "expert.pt"), "--num-demos", "1", "--max-attempts", "1",
                                 "--no-images", "--num-workers", "1", "--out-path", str(out)], tmp_path)
    assert "seed 0: failure in 220 steps" in r.stdout, r.stdout + r.stderr  # the task came from the checkpoint
    assert_one_sentence_error(r, "no episode succeeded")
    assert not out.exists()


@pytest.mark.slow
def test_other_kind_and_unknown_task_are_one_sentence(tmp_path):
    path = tmp_path / "dppo.pt"
    torch.save({"kind": "diffusion_ppo", "task": "libero_spatial_0"}, path)
    for args, words in ((["--resume", str(path)], ("diffusion_ppo", "gaussian_ppo")),
                        (["--task", "libero_object_12"], ("libero_object_12", "0-89"))):
        assert_one_sentence_error(run(SCRIPT, args, tmp_path), *words)


def tiny_policy():
    torch.manual_seed(0)
    return gp.GaussianPolicy(5, 2, 3, 2, 32, 0.1, 0.01, 0.2, 3.0, np.zeros(5), np.ones(5), -np.ones(2), np.ones(2))


def test_log_prob_matches_torch_normal_and_samples_stay_clipped():
    policy = tiny_policy()
    with torch.no_grad():
        policy.log_std.copy_(torch.linspace(-3, -2, 6).view(3, 2))
    obs = torch.randn(64, 5)
    chunk, sample = policy.sample(obs, explore=True)
    assert sample.shape == (64, 1, 3, 2) and chunk.abs().max() <= 1
    mean, std = policy.actor_ft(obs), policy.log_std.exp()
    assert ((sample[:, 0] - mean).abs() <= 3 * std + 1e-6).all()  # noise clipped at 3 sigma
    with torch.no_grad():
        expected = torch.distributions.Normal(mean, std).log_prob(sample[:, 0])
        torch.testing.assert_close(policy.chain_log_prob(obs, sample)[:, 0], expected)
        # the PPO score: executed actions only, per-element mean, clamped as DPPO clamps it
        got = gp.ppo_log_prob(policy, obs, sample, 2)
    assert got.shape == (64, 1)
    torch.testing.assert_close(got[:, 0], expected[:, :2].mean(dim=(1, 2)).clamp(-5, 2))
    deterministic, _ = policy.sample(obs, explore=False)
    torch.testing.assert_close(deterministic, mean.clamp(-1, 1))


def test_std_projection_keeps_sigma_in_its_range():
    policy = tiny_policy()
    with torch.no_grad():
        policy.log_std[0, 0], policy.log_std[1, 1] = 5.0, -20.0
    policy.project_std()
    std = policy.log_std.exp()
    assert math.isclose(std.max().item(), 0.2, rel_tol=1e-5) and math.isclose(std.min().item(), 0.01, rel_tol=1e-5)
    assert math.isclose(std[2, 0].item(), 0.1, rel_tol=1e-5)  # in range: untouched
