"""Tests of diffusion_ppo.py: a tiny end-to-end run on the CPU, its resume, the user errors, and the maths.

The end-to-end run starts with no demos file, so the script collects two scripted demos with
collect_demos.py, behaviour-clones one epoch, evaluates, runs one PPO iteration with updates of
both actor and critic, and writes its checkpoints (about a minute on two cores).
"""

import json
import math
import os
import subprocess
import sys

import diffusion_ppo as dp
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_PPO, assert_ok, assert_one_sentence_error, run, tiny_ppo_run

SCRIPT = "diffusion_ppo.py"

DESIGN_KEYS = {"kind", "task", "obs_dim", "act_dim", "obs_horizon", "act_horizon", "act_exec", "denoising_steps",
               "ft_denoising_steps", "beta_schedule", "min_sampling_std", "min_logprob_std", "normalizer", "model", "ema", "critic", "args",
               "iteration", "env_steps", "eval_success"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_ppo_run(SCRIPT, tmp_path_factory.mktemp("tiny"), "--bc-loss-coeff", "0.1")


@pytest.mark.slow
def test_tiny_run_collects_demos_and_writes_checkpoints(tiny_run):
    cwd, run_dir, stdout = tiny_run
    assert "collecting 2 scripted demos with collect_demos.py" in stdout
    assert (cwd / "data" / "libero_spatial_0_scripted.hdf5").is_file()
    assert "iter 0 (BC)" in stdout and "iter 1/1" in stdout
    assert any(f.name.startswith("events.out.tfevents") for f in run_dir.iterdir())
    assert (run_dir / "success.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("bc_success", "final_success", "best_success"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["best_success"] >= max(summary["bc_success"], summary["final_success"])
    assert summary["env_steps"] == 2 * 4 * 4 and summary["episodes"] == 4  # 2 envs x 4 chunk steps x 4 actions
    assert summary["wall_time"] > 0
    assert summary["actor_grad_steps"] >= 1 and summary["critic_grad_steps"] >= 1

    for name in ("last.pt", "expert.pt"):
        ckpt = torch.load(run_dir / name, weights_only=True)
        assert DESIGN_KEYS <= set(ckpt), DESIGN_KEYS - set(ckpt)
        assert ckpt["kind"] == "diffusion_ppo" and ckpt["task"] == "libero_spatial_0"
        assert (ckpt["obs_dim"], ckpt["act_dim"], ckpt["obs_horizon"]) == (109, 7, 1)
        assert ckpt["args"]["num_envs"] == 2
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["iteration"] == 1
    # the fine-tuned copy moved away from the frozen BC denoiser it started as
    assert any(not torch.equal(last["model"][f"actor.{k}"], last["model"][f"actor_ft.{k}"])
               for k in last["ema"])

    # a consumer rebuilds the policy from the dict alone
    policy = dp.DiffusionPolicy.from_checkpoint(last)
    actions = policy.act(np.zeros((3, last["obs_dim"]), np.float32))
    assert actions.shape == (3, last["act_exec"], 7)
    assert np.all(actions >= policy.act_min.numpy() - 1e-6) and np.all(actions <= policy.act_max.numpy() + 1e-6)


@pytest.mark.slow
def test_resume_continues_the_run(tiny_run):
    cwd, run_dir, _ = tiny_run
    r = run(SCRIPT, ["--resume", str(run_dir / "last.pt"), "--total-iterations", "2", *TINY_PPO], cwd)
    assert_ok(r)
    assert "resumed" in r.stdout and "iter 2/2" in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iteration"] == 2 and summary["env_steps"] == 2 * (2 * 4 * 4)
    assert [h[0] for h in summary["eval_history"]] == [0, 1, 2]


@pytest.mark.slow
def test_update_without_success_moves_the_critic_only(tmp_path, tiny_run):
    """With the default signal rule, a batch where no episode succeeded trains the critic and leaves
    the fine-tuned denoiser exactly where BC put it."""
    cwd, _, _ = tiny_run
    tiny = [a for a in TINY_PPO]
    i = tiny.index("--signal-min-return-std")
    del tiny[i : i + 2]
    r = run(SCRIPT, ["--demos-path", str(cwd / "data" / "libero_spatial_0_scripted.hdf5"), "--num-demos", "2",
                     "--total-iterations", "1", "--out-dir", str(tmp_path), *tiny], tmp_path)
    assert_ok(r)
    assert "no learning signal" in r.stdout
    (run_dir,) = tmp_path.iterdir()
    bc, last = (torch.load(run_dir / name, weights_only=True) for name in ("expert.pt", "last.pt"))
    assert last["iteration"] == 1 and bc["iteration"] == 0
    assert bc["bc_success"] is not None and bc["bc_success"] == last["bc_success"]  # a resume from expert.pt knows its start
    assert last["actor_grad_steps"] == 0 and last["skipped_actor_updates"] == 1 and last["critic_grad_steps"] >= 1
    for k, v in bc["model"].items():
        assert torch.equal(v, last["model"][k]), k
    assert any(not torch.equal(v, last["critic"][k]) for k, v in bc["critic"].items())


@pytest.mark.slow
def test_ctrl_c_ends_with_the_resume_command(tiny_run, tmp_path):
    """SIGINT once the run has a last.pt: exit 130, one line naming the --resume command, no traceback."""
    import signal

    cwd, _, _ = tiny_run
    demos = str(cwd / "data" / "libero_spatial_0_scripted.hdf5")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, SCRIPT), "--demos-path", demos, "--num-demos", "2",
                             "--total-iterations", "1000", "--out-dir", str(tmp_path), *TINY_PPO], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job ignores SIGINT and its children inherit that: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("iter 2/"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    (run_dir,) = tmp_path.iterdir()
    # Python ends an uncaught Ctrl-C by SIGINT itself: the shell sees 130 either way
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in stderr, stderr[-3000:]
    assert (f"interrupted: continue with python diffusion_ppo.py --task libero_spatial_0 --resume {run_dir / 'last.pt'}"
            in stderr.splitlines())


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    (tmp_path / "empty.hdf5").write_bytes(b"")
    r = run(SCRIPT, ["--demos-path", str(tmp_path / "empty.hdf5"), "--out-dir", str(tmp_path / "runs")], tmp_path)
    assert_one_sentence_error(r, "empty.hdf5")
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the --out-dir the run made


@pytest.mark.slow
def test_demos_of_another_task_are_refused_by_their_bddl_file(tiny_run, tmp_path):
    """An official LIBERO file has no `task` attribute; its bddl_file_name still names the task."""
    import h5py
    import shutil

    cwd, _, _ = tiny_run
    path = tmp_path / "no_task_attr.hdf5"
    shutil.copy(cwd / "data" / "libero_spatial_0_scripted.hdf5", path)
    with h5py.File(path, "a") as f:
        del f["data"].attrs["task"]
    r = run(SCRIPT, ["--task", "libero_spatial_1", "--demos-path", str(path), "--out-dir", str(tmp_path / "runs")], tmp_path)
    assert_one_sentence_error(r, "libero_spatial_1", "no_task_attr.hdf5")
    assert not (tmp_path / "runs").exists()  # the run folder made before the check is gone, its --out-dir too


@pytest.mark.slow
def test_bc_pairs_are_the_same_from_an_official_layout_file(tiny_run, tmp_path):
    """The warm start rebuilds its observations from `states` (the state before each action in both
    layouts), so a file laid out as LIBERO's official ones (obs after each action, no task, source
    or obs_alignment attribute) gives the very pairs our own file gives."""
    import shutil

    import h5py

    cwd, _, _ = tiny_run
    ours = cwd / "data" / "libero_spatial_0_scripted.hdf5"
    official = tmp_path / "official.hdf5"
    shutil.copy(ours, official)
    with h5py.File(official, "a") as f:
        for key in ("task", "source", "obs_alignment", "language", "generator"):
            del f["data"].attrs[key]
        for name in f["data"]:
            for key in f["data"][name]["obs"]:
                obs = f["data"][name]["obs"][key]
                obs[:-1] = obs[1:][()]  # obs[t] now the observation after actions[t]
    bddl = dp.task_bddl_and_init_states("libero_spatial_0")[0]
    (obs_a, act_a), (obs_b, act_b) = (dp.load_demos(str(path), "libero_spatial_0", bddl, 2) for path in (ours, official))
    assert len(obs_a) == len(obs_b) == 2
    for a, b in zip(obs_a + act_a, obs_b + act_b):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_rollout_gathers_the_asked_episodes_whatever_the_env_count():
    """rollout() runs until episodes_per_update episodes have ended: 4 episodes of 2 chunk steps take 8 chunk
    steps of 1 env or 4 of 3 envs (6 episodes), and the batch's shapes follow."""
    bddl, _ = dp.task_bddl_and_init_states("libero_spatial_0")
    policy = tiny_policy(K=4, K_ft=2, obs_dim=109, act_dim=7, act_horizon=4, act_exec=4)
    scaler = dp.RewardScaler(1, 0.999)
    for num_envs, chunk_steps, episodes in ((1, 8, 4), (3, 4, 6)):
        args = dp.Args(num_envs=num_envs, act_exec=4)
        envs = dp.make_vector_env(bddl, 109, args, max_episode_steps=8)
        next_obs, _ = envs.reset(seed=list(range(num_envs)))
        batch, next_obs = dp.rollout(policy, envs, next_obs, min_episodes=4, gamma=0.999)
        envs.close()
        assert len(batch["ep_success"]) == episodes and batch["ep_len"] == [8] * episodes
        assert batch["env_steps"] == chunk_steps * num_envs * 4 and next_obs.shape == (num_envs, 109)
        assert batch["obs"].shape == (chunk_steps, num_envs, 109) and batch["rewards"].shape == (chunk_steps, num_envs)
        assert batch["chains"].shape == (chunk_steps, num_envs, 3, 4, 7) and batch["dones"].sum() == episodes
        scaler.ret = np.zeros(num_envs)
        data = dp.advantages(policy, dp.Critic(109), scaler, batch, args)
        assert data["adv"].shape == (chunk_steps * num_envs,)
        assert data["adv"].mean().abs() < 1e-5 and abs(data["adv"].std().item() - 1) < 1e-4  # whole-batch normalisation


def test_learning_signal_rule():
    assert not dp.has_learning_signal([0.0, 0.0, 0.0], 1e-3)  # no success
    assert dp.has_learning_signal([0.0, 0.0, 0.999**40], 1e-3)  # some succeed
    assert not dp.has_learning_signal([0.999**40] * 3, 1e-3)  # all succeed at the same length
    assert dp.has_learning_signal([0.999**40, 0.999**45], 1e-3)  # all succeed, some faster
    assert dp.has_learning_signal([0.0, 0.0], 0.0)  # 0 never skips


def test_bc_regulariser_reaches_only_the_fine_tuned_denoiser():
    policy = tiny_policy()
    loss = policy.bc_loss(torch.randn(6, 5))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > -2.0  # minus a clamped per-element log-likelihood
    assert all(p.grad is None for p in policy.actor.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.actor_ft.parameters())


@pytest.mark.slow
def test_unknown_task_is_one_sentence(tmp_path, capsys):
    r = run(SCRIPT, ["--task", "libero_spatial_10"], tmp_path)
    assert_one_sentence_error(r, "libero_spatial_10", "libero_spatial", "libero_90", "0-89")
    for task in ("libero_foo_0", "spatial", "libero_90_90"):
        with pytest.raises(SystemExit) as exc:
            dp.parse_task(task)
        assert exc.value.code != 0 and task in capsys.readouterr().err
    assert dp.parse_task("libero_10_9") == ("libero_10", 9) and dp.parse_task("libero_90_89") == ("libero_90", 89)


@pytest.mark.slow
def test_missing_demos_file_is_one_sentence(tmp_path):
    r = run(SCRIPT, ["--demos-path", str(tmp_path / "nope.hdf5")], tmp_path)
    assert_one_sentence_error(r, "nope.hdf5", "--demos-path")


@pytest.mark.slow
def test_checkpoint_of_another_kind_is_one_sentence(tmp_path):
    path = tmp_path / "gauss.pt"
    torch.save({"kind": "gaussian_ppo", "task": "libero_spatial_0"}, path)
    r = run(SCRIPT, ["--resume", str(path)], tmp_path)
    assert_one_sentence_error(r, "gaussian_ppo", "diffusion_ppo")


# ---- maths ----


def tiny_policy(K=6, K_ft=3, obs_dim=5, act_dim=2, act_horizon=3, act_exec=2):
    torch.manual_seed(0)
    return dp.DiffusionPolicy(obs_dim, act_dim, act_horizon, act_exec, K, K_ft, 32, 0.1, 0.1, 3.0, np.zeros(obs_dim),
                              np.ones(obs_dim), -np.ones(act_dim), np.ones(act_dim))


def test_chain_log_prob_matches_torch_normal():
    policy, K, K_ft = tiny_policy(), 6, 3
    obs = torch.randn(4, 5)
    chunk, chain = policy.sample(obs, explore=True)
    assert chain.shape == (4, K_ft + 1, 3, 2) and torch.equal(chain[:, -1], chunk)

    # DDPM posterior of each fine-tuned step, written out independently of the module
    s, k = 0.008, np.arange(K + 1)
    f = np.cos((k / K + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.concatenate([[0.0], np.clip(1 - f[1:] / f[:-1], 0, 0.999)])
    ab = np.cumprod(1 - betas)
    expected = torch.zeros(4)
    with torch.no_grad():
        for i in range(K_ft):
            step = K_ft - i  # chain[:, i] is x_step, chain[:, i + 1] is x_{step - 1}
            x = chain[:, i]
            eps = policy.actor_ft(x, torch.full((4,), step), obs)
            x0 = ((x - math.sqrt(1 - ab[step]) * eps) / math.sqrt(ab[step])).clamp(-1, 1)
            mean = (betas[step] * math.sqrt(ab[step - 1]) * x0 + (1 - ab[step - 1]) * math.sqrt(1 - betas[step]) * x) / (1 - ab[step])
            std = max(math.sqrt(betas[step] * (1 - ab[step - 1]) / (1 - ab[step])), 0.1)
            expected += torch.distributions.Normal(mean, std).log_prob(chain[:, i + 1]).sum(dim=(-1, -2))
        got = policy.chain_log_prob(obs, chain)
    assert got.shape == (4, K_ft, 3, 2)
    torch.testing.assert_close(got.sum(dim=(1, 2, 3)), expected, rtol=1e-4, atol=1e-3)


def test_plain_sampling_ends_without_noise_and_in_range():
    policy = tiny_policy()
    assert policy.post_std[1].item() == 0.0  # p(x_0 | x_1) is deterministic without the exploration floor
    chunk, _ = policy.sample(torch.randn(8, 5), explore=False)
    assert chunk.abs().max() <= 1.0


def test_sampling_floor_sets_exploration_and_logprob_floor_sets_the_density():
    policy = tiny_policy()
    policy.min_sampling_std, policy.min_logprob_std = 0.04, 0.1
    obs = torch.randn(1, 5).repeat(4000, 1)
    with torch.no_grad():
        torch.manual_seed(1)
        _, chain = policy.sample(obs, explore=True)
        # the last step is deterministic in DDPM (post_std 0), so its spread is the sampling floor alone
        mean, _ = policy.step_mean_std(chain[:, -2], torch.ones(4000, dtype=torch.long), obs, policy.actor_ft)
        inside = mean.abs() < 0.8  # away from the [-1, 1] clamp
        spread = (chain[:, -1] - mean)[inside].std().item()
        assert spread == pytest.approx(0.04, rel=0.05)
        logp = policy.chain_log_prob(obs[:8], chain[:8])[:, -1]
        expected = torch.distributions.Normal(mean[:8], 0.1).log_prob(chain[:8, -1])
        torch.testing.assert_close(logp, expected)
    # a checkpoint written with the single floor of earlier versions loads with it as both floors
    c = {**policy.config(), "model": policy.state_dict()}
    del c["min_sampling_std"], c["min_logprob_std"]
    old = dp.DiffusionPolicy.from_checkpoint({**c, "min_std": 0.07})
    assert old.min_sampling_std == old.min_logprob_std == 0.07


def test_gae_matches_hand_worked_case():
    # env 0 succeeds at the last step (terminated); env 1 is truncated after step 1 and bootstraps V(final obs) = 0.9
    rewards = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5], [0.6, 0.6], [0.7, 0.7]])
    next_values = torch.tensor([[0.6, 0.6], [0.7, 0.9], [0.0, 0.8]])
    terminated = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    dones = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    adv, ret = dp.gae(rewards, values, next_values, terminated, dones, gamma=0.9, lam=0.8)
    # env 0: A2 = 1 - 0.7 = 0.3; A1 = 0.9*0.7 - 0.6 + 0.72*0.3 = 0.246; A0 = 0.9*0.6 - 0.5 + 0.72*0.246 = 0.21712
    # env 1: A2 = 0.9*0.8 - 0.7 = 0.02; A1 = 0.9*0.9 - 0.6 = 0.21 (trace cut); A0 = 0.04 + 0.72*0.21 = 0.1912
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.1912], [0.246, 0.21], [0.3, 0.02]]))
    torch.testing.assert_close(ret, adv + values)


def test_clip_schedule_and_denoising_discount_end_points():
    clips = dp.clip_schedule(10, 0.001, 0.01, 3.0)
    assert clips.shape == (10,)
    assert clips[0].item() == pytest.approx(0.001) and clips[-1].item() == pytest.approx(0.01)
    assert torch.all(clips[1:] > clips[:-1])
    # exponential, not linear: the midpoint sits below the average of the end points
    assert dp.clip_schedule(3, 0.001, 0.01, 3.0)[1].item() < 0.0055
    discount = dp.denoising_discount(10, 0.99)
    assert discount[-1].item() == 1.0 and discount[0].item() == pytest.approx(0.99**9)


def test_wilson_interval():
    low, high = dp.wilson_interval(0, 50)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.0713, abs=1e-4)
    low, high = dp.wilson_interval(25, 50)
    assert low + high == pytest.approx(1.0) and low == pytest.approx(0.3664, abs=1e-4)
    assert dp.wilson_interval(50, 50)[1] == pytest.approx(1.0)
    # never outside [0, 1], even where rounding would put an end a hair past it (seen as -0.00)
    for n in range(1, 51):
        for k in range(n + 1):
            low, high = dp.wilson_interval(k, n)
            assert 0.0 <= low <= k / n + 1e-12 and k / n - 1e-12 <= high <= 1.0


@pytest.mark.slow
def test_collect_demos_rolls_out_the_checkpoint(tiny_run, tmp_path):
    """The tiny policy succeeds nowhere: collect_demos.py says so in one sentence and writes nothing."""
    _, run_dir, _ = tiny_run
    out = tmp_path / "rl.hdf5"
    r = run("collect_demos.py", ["--policy", str(run_dir / "expert.pt"), "--num-demos", "1", "--max-attempts", "1",
                     "--no-images", "--num-workers", "1", "--out-path", str(out)], tmp_path)
    assert "seed 0: failure in 220 steps" in r.stdout, r.stdout + r.stderr  # the task came from the checkpoint
    assert_one_sentence_error(r, "no episode succeeded")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_collect_demos_rejects_other_checkpoints(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    torch.save({"kind": "vla", "task": ["libero_spatial_0"]}, tmp_path / "vla.pt")
    r = run("collect_demos.py", ["--policy", str(tmp_path / "vla.pt"), "--task", "libero_spatial_0"], tmp_path)
    assert_one_sentence_error(r, "kind 'vla'")
    r = run("collect_demos.py", ["--policy", str(run_dir / "expert.pt"), "--task", "libero_object_0"], tmp_path)
    assert_one_sentence_error(r, "trained on libero_spatial_0")


@pytest.mark.slow
def test_training_placements_start_the_arm_as_the_init_states_do():
    """Fresh placements start the arm's joints spread around the home pose, as LIBERO's shipped init states
    were made (LIBERO's ControlEnv resets to the home pose itself): a seed gives the same start again,
    another seed another, and the controller keeps the home pose as its nullspace target, as in evaluation."""
    bddl, init_states = dp.task_bddl_and_init_states("libero_spatial_0")
    env = dp.make_control_env(bddl, 100)
    starts = [dp.fresh_placement(env, seed)["robot0_joint_pos"].copy() for seed in (0, 1, 0)]
    home = np.array(env.env.robots[0].init_qpos)
    np.testing.assert_allclose(env.env.robots[0].controller.initial_joint, home)
    env.close()
    np.testing.assert_array_equal(starts[0], starts[2])
    spread = np.abs(starts[0] - starts[1]).max()
    shipped = np.abs(init_states[0, 1:8] - init_states[1, 1:8]).max()  # the arm's joints in LIBERO's flattened state
    assert 0.002 < spread < 0.2 and 0.002 < shipped < 0.2, (spread, shipped)


@pytest.mark.slow
def test_skipping_the_repeated_forward_keeps_states_bit_identical():
    """Two envs from the same init state and actions, one with robosuite's controller forward
    dropped, end in the same MuJoCo state; a reset builds a new controller, and it is patched too."""
    bddl, init_states = dp.task_bddl_and_init_states("libero_spatial_0")
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-0.5, 0.5, (30, 6)), np.repeat([[-1.0], [1.0]], 15, axis=0)], axis=1)
    states = []
    for patched in (False, True):
        env = dp.make_control_env(bddl, 100)
        for _ in range(2):  # twice, so the second pass runs on the controller a reset rebuilt
            env.reset()
            env.set_init_state(init_states[0])
            if patched:
                dp.skip_repeated_forward(env)
            assert getattr(env.env.robots[0].controller, "skips_forward", False) == patched
            for a in actions:
                env.step(a)
        states.append(env.env.sim.get_state().flatten())
        env.close()
    assert np.array_equal(states[0], states[1])


@pytest.mark.slow
def test_training_env_places_objects_where_the_init_states_do():
    """libero_spatial_4's bowl starts in the cabinet's top drawer: the RL env's fresh placements put it
    at the height the shipped init states do (with robosuite's soft reset it was dropped from 0.9 m
    above, onto the cabinet)."""
    bddl, init_states = dp.task_bddl_and_init_states("libero_spatial_4")
    env = dp.make_control_env(bddl, 300)
    env.reset()
    height = env.set_init_state(init_states[0])["akita_black_bowl_1_pos"][2]
    for seed in (0, 1):
        assert abs(dp.fresh_placement(env, seed)["akita_black_bowl_1_pos"][2] - height) < 0.02
    env.close()
