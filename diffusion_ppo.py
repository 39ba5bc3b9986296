"""Diffusion policy on one LIBERO task: behaviour cloning warm start, then DPPO on the success reward.

Stage 2 of the pipeline (DESIGN.md). Reads a demos file in the "demos.hdf5" layout (ours, or an
official LIBERO human file: only `actions` and `states` are used, the state observation is
rebuilt by restoring each saved MuJoCo state). Pretrains a DDPM action-chunk policy on it, then
fine-tunes the last K' denoising steps with PPO over the denoising chain (DPPO) on LIBERO's
sparse task-success reward, evaluating on the task's 50 standard init states. Writes
runs/<run_name>/{expert.pt (best by eval), last.pt, summary.json, success.png, TensorBoard events}; the
checkpoint is the self-describing dict of DESIGN.md "Checkpoints", kind "diffusion_ppo".

    python diffusion_ppo.py --task libero_spatial_0

Rolling a checkpoint out elsewhere (collect_demos.py, eval_libero.py), from the dict alone:
    policy = DiffusionPolicy.from_checkpoint(torch.load(path, weights_only=True), device)
    actions = policy.act(state_obs(raw_obs)[None])[0]  # (Te, 7) env actions, executed in order

Code between `# --- begin copied block: <name> ---` and its end marker is copied, unchanged, in
gaussian_ppo.py (environments, critic, GAE, evaluation, checkpoint I/O, and the main body but for
its three lines of PPO clip and discount), so the two methods differ only in the policy class, which
`Policy` names; tests/test_copies.py holds the copies together.

References: Ren et al. 2024, "Diffusion Policy Policy Optimization" (arXiv 2409.00588) and its
robomimic state configs (cfg/robomimic/{pretrain,finetune}/can/*_diffusion_mlp.yaml); Ho et al.
2020 (DDPM); Nichol & Dhariwal 2021 (cosine schedule); Chi et al. 2023 (Diffusion Policy:
chunks, EMA); CleanRL ppo_continuous_action.py (script layout, GAE).

Dimension legend
  B   batch (envs while rolling out, samples in an update)
  K   denoising steps, k = K ... 1; step k maps x_k to x_{k-1}, x_0 is the action chunk
  K'  fine-tuned denoising steps: the last K' of the chain (k = K' ... 1)
  To  observation horizon (1: the current state only)
  Ta  actions predicted per chunk (act_horizon)
  Te  actions executed per chunk (act_exec <= Ta); one env "chunk step" is Te control steps
  Do  state observation width, robot0_proprio-state ++ object-state (109 for libero_spatial_0)
  Da  action width (7: OSC_POSE deltas, gripper -1 open / +1 closed)

Horizon diagram (To = 1, Ta = Te = 4):
  control step:   t    t+1  t+2  t+3 | t+4
  observation:    o                  | o      <- the next chunk is planned from o_{t+4}
  predicted:      a    a    a    a   |
  executed:       a    a    a    a   |

Denoising chain of one chunk (K = 20, K' = 10):
  x_20 ~ N(0, I) --frozen BC denoiser--> x_10 --fine-tuned copy, 10 Gaussian steps--> x_0
  Each fine-tuned step p(x_{k-1} | x_k, s) is one action of the inner MDP; its log-likelihood
  enters the PPO ratio, and the chunk's environment advantage reaches it discounted by
  gamma_denoising^(k-1).
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import atexit
import copy
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Annotated, Optional

import gymnasium as gym
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

# LIBERO is imported inside the functions that build environments: it takes seconds and prints
# robosuite banners, which `--help`, user errors and `from diffusion_ppo import DiffusionPolicy`
# need not pay for.


DEFAULT_IN_DOC = tyro.conf.arg(help_behavior_hint="")  # the field's docstring says what None means


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of torch, numpy, random and of the training placements (never the eval init states)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use CUDA when it is present"""
    torch_threads: int = 1
    """CPU threads for torch while the env workers step (they need the other cores: oversubscribed cores make small matmuls ~30x slower); behaviour cloning and each PPO update, with the workers idle, use every core"""
    out_dir: str = "runs"
    """runs are written to <out_dir>/<run_name>/"""
    task: str = "libero_spatial_0"
    """LIBERO task, <suite>_<index> (libero_spatial, libero_object, libero_goal, libero_10: 0-9; libero_90: 0-89)"""
    demos_path: Annotated[Optional[str], DEFAULT_IN_DOC] = None
    """LIBERO-layout demos for the warm start (default data/<task>_scripted.hdf5, collected with collect_demos.py when missing)"""
    num_demos: int = 20
    """demos for behaviour cloning: the first N of the file, or how many a missing default file gets. Few, so BC is weak: on libero_spatial_0, 20 scripted demos give a BC policy of 0.64, like DPPO's robomimic can start (57.8%), and 10 give 0.24 (docs/EXPERIMENTS.md)"""
    resume: Optional[str] = None
    """a last.pt to continue from (policy, critic, optimisers, iteration, env steps, RNG); BC is skipped"""

    # environment and evaluation
    num_envs: int = 4
    """parallel rollout workers (AsyncVectorEnv); DPPO's can config uses 50 on a GPU node"""
    max_episode_steps: Annotated[Optional[int], DEFAULT_IN_DOC] = None
    """control steps before truncation (default: the suite's limit, 220 for libero_spatial)"""
    eval_episodes: int = 50
    """episodes of each evaluation, on the first N of the task's 50 standard init states"""
    eval_every: int = 10
    """evaluate the deterministic policy every N PPO updates and after the last one (DPPO val_freq 10)"""
    eval_explore: bool = False
    """also evaluate the exploring sampler (std floor, noise at the last step) on the init states: doubles the evaluation cost; without it the progress line gives the exploring policy's training success since the last evaluation beside the deterministic one"""

    # policy shape
    act_horizon: int = 4
    """Ta, actions predicted per chunk (DPPO can config horizon_steps 4)"""
    act_exec: int = 4
    """Te, actions executed per chunk (DPPO can config act_steps 4)"""
    denoising_steps: int = 20
    """K, DDPM steps with a cosine schedule (DPPO can config denoising_steps 20)"""
    ft_denoising_steps: int = 10
    """K', last denoising steps fine-tuned by PPO (DPPO can config ft_denoising_steps 10)"""
    hidden_dim: int = 768
    """denoiser width: DPPO's can config has a residual [512, 512, 512] (0.6 M parameters); 768 gives ~1.3 M"""

    # behaviour cloning
    bc_epochs: int = 2000
    """passes over the demos (DPPO trains robomimic can 8000 epochs on 200 demos; ours are few and short)"""
    bc_batch_size: int = 256
    """BC minibatch (DPPO pretrain batch_size 256)"""
    bc_lr: float = 1e-4
    """peak BC learning rate (DPPO pretrain learning_rate 1e-4)"""
    bc_min_lr: float = 1e-5
    """end of the cosine BC schedule (DPPO pretrain min_lr 1e-5; its 100 warm-up steps are left out)"""
    bc_weight_decay: float = 1e-6
    """AdamW weight decay for BC (DPPO pretrain weight_decay 1e-6)"""
    ema_decay: float = 0.995
    """EMA decay of the BC weights; the EMA weights are what RL starts from (DPPO ema.decay 0.995)"""

    # DPPO fine-tuning
    total_iterations: int = 100
    """PPO updates (DPPO can config n_train_itr 300, of ~8x more episodes each)"""
    episodes_per_update: int = 16
    """experience behind one update: roll the envs on (across updates, episodes are never cut) until this many episodes have ended, whatever --num-envs is; DPPO's can config has ~50-100 a batch on a GPU node"""
    minibatch_size: int = 128
    """chunks per minibatch, each with all K' of its denoising steps (1280 (chunk, step) pairs; DPPO can config batch_size 7500 pairs)"""
    gamma: float = 0.999
    """environment discount per chunk step (DPPO can config gamma 0.999)"""
    gae_lambda: float = 0.95
    """GAE lambda (DPPO can config gae_lambda 0.95)"""
    gamma_denoising: float = 0.99
    """advantage discount per denoising step away from the action (DPPO can config gamma_denoising 0.99)"""
    clip_coef_base: float = 0.001
    """PPO ratio clip at the first fine-tuned denoising step (DPPO clip_ploss_coef_base 0.001)"""
    clip_coef: float = 0.01
    """PPO ratio clip at the last denoising step (DPPO clip_ploss_coef 0.01)"""
    min_sampling_std: float = 0.1
    """floor of the exploring sampler's denoising std, i.e. the exploration noise (DPPO min_sampling_denoising_std: 0.1 in its robomimic configs, 0.04 in its Furniture-Bench ones)"""
    min_logprob_std: float = 0.1
    """floor of the denoising std in the PPO log-probabilities, for stable ratios (DPPO min_logprob_denoising_std 0.1)"""
    randn_clip: float = 3.0
    """sampled denoising noise clipped to +-this many std (DPPO randn_clip_value 3)"""
    actor_lr: float = 1e-5
    """fine-tuned denoiser learning rate (DPPO can config actor_lr 1e-5; its schedule has min_lr = lr, i.e. constant)"""
    critic_lr: float = 1e-3
    """critic learning rate (DPPO can config critic_lr 1e-3)"""
    update_epochs: int = 10
    """passes over each update's batch (DPPO can config update_epochs 10)"""
    vf_coef: float = 0.5
    """value-loss weight (DPPO can config vf_coef 0.5)"""
    bc_loss_coeff: float = 1.0
    """weight of DPPO's optional behaviour-cloning regulariser: -log-likelihood, under the fine-tuned chain, of chains the frozen BC denoiser samples at the batch's states (DPPO use_bc_loss / bc_loss_coeff; off in its can config). On here: without it the deterministic policy drifted below its start (libero_spatial_3 0.92 -> 0.46), with it 0.92 -> 0.94 and libero_spatial_4 0.56 -> 0.82 against 0.62 (docs/EXPERIMENTS.md); it doubles the network part of an update; 0 turns it off"""
    target_kl: float = 1.0
    """stop the update's epochs once the approximate KL exceeds this (DPPO can config target_kl 1)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip of the fine-tuned denoiser (a safety net; DPPO's robomimic configs leave it off)"""
    signal_min_return_std: float = 1e-3
    """an update whose ended episodes' discounted returns spread less than this (no success, or all succeeded alike) trains the critic only: its advantages would be the critic's noise; 0 never skips"""
    critic_warmup_ev: float = 0.5
    """update only the critic until its explained variance on a fresh batch, before that batch's update, reaches this (DPPO instead warms up a fixed n_critic_warmup_itr 2)"""
    critic_warmup_max: int = 5
    """at most this many critic-only updates for the warm-up, whatever the explained variance"""
    time_limit_min: Optional[float] = None
    """stop fine-tuning once this many minutes of wall time (BC and evaluations included) have passed, with a last evaluation"""


KIND = "diffusion_ppo"  # the checkpoint kind this script writes and resumes
TIME_DIM = 16  # sinusoidal time embedding of the denoiser (DPPO can config time_dim 16)
EMA_EVERY, EMA_START_EPOCH = 10, 20  # gradient steps between EMA updates; epochs of plain copy first (DPPO pretrain)
CLIP_COEF_RATE = 3.0  # exponential rate of the PPO clip's growth across denoising steps (DPPO clip_ploss_coef_rate 3)


# --- begin copied block: tasks and environments ---
SUITE_SIZES = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
STEP_LIMITS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
"""control steps per episode after the settle steps (the protocol of OpenVLA and openpi)"""
NUM_SETTLE_STEPS = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
OBS_KEYS = ("robot0_proprio-state", "object-state")
ACT_DIM = 7


def fail(message):
    """A mistake the user can fix: one sentence on stderr, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_task(task):
    """'libero_spatial_0' -> ('libero_spatial', 0), or exit with the list of valid names."""
    suite, _, index = task.rpartition("_")
    if suite not in SUITE_SIZES or not index.isdigit() or int(index) >= SUITE_SIZES[suite]:
        fail(
            f"unknown task '{task}': use <suite>_<index> with libero_spatial, libero_object, libero_goal "
            "or libero_10 and index 0-9, or libero_90 and index 0-89 (e.g. libero_spatial_0)"
        )
    return suite, int(index)


def task_bddl_and_init_states(task):
    """The task's BDDL file path and its 50 standard init states (the evaluation set)."""
    from libero.libero import benchmark, get_libero_path

    suite_name, index = parse_task(task)
    suite = benchmark.get_benchmark_dict()[suite_name]()
    t = suite.get_task(index)
    bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
    return bddl, np.asarray(suite.get_task_init_states(index), dtype=np.float64)


def make_control_env(bddl, horizon):
    """State-only LIBERO env. It keeps robosuite's hard reset (a fresh model each reset, ~0.7 s): with
    hard_reset=False, objects placed in or on another object's region (a bowl in a drawer, on a cookie
    box) were dropped from the air, 0.9 m above their place, and trained the policy on scenes that
    evaluation never shows (a test holds it)."""
    from libero.libero.envs.env_wrapper import ControlEnv

    return ControlEnv(bddl_file_name=bddl, use_camera_obs=False, has_offscreen_renderer=False, horizon=horizon)


def skip_repeated_forward(env):
    """Make each control step ~25% faster with bit-identical states (docs/EXPERIMENTS.md).

    robosuite's step runs mj_forward before each of its 25 physics substeps, and the OSC
    controller's update runs it again on the same state. This drops the controller's call
    (forced updates, at resets, keep it). robosuite builds a new controller at every reset, so
    call this after each one; a controller already patched is left alone.
    """
    for robot in env.env.robots:
        controller = robot.controller
        if getattr(controller, "skips_forward", False):
            continue

        def update(force=False, sim=controller.sim, update=controller.update):
            if force:
                return update(force)
            sim.forward = lambda: None  # shadows MjSim.forward for this one call
            try:
                update(force)
            finally:
                del sim.forward

        controller.update, controller.skips_forward = update, True


def state_obs(raw):
    """robosuite observation dict -> (Do,) float32 state: robot0_proprio-state ++ object-state."""
    return np.concatenate([raw[k] for k in OBS_KEYS]).astype(np.float32)


class LiberoStateEnv(gym.Env):
    """One LIBERO task as a gymnasium env whose step executes one action chunk of Te actions.

    Resets go to a fresh placement from this env's seeded generator, or, while `eval_queue` is a
    list, to its next init state (idle, with no physics, once it is empty). Both are followed by
    the 10 settle steps. Success ends the episode as `terminated` with reward 1, the step limit
    as `truncated`. The MuJoCo env is built on the first reset, i.e. inside the worker process:
    AsyncVectorEnv's throw-away copy in the parent never builds one.
    """

    def __init__(self, bddl, obs_dim, act_exec, max_episode_steps):
        self.bddl, self.max_episode_steps = bddl, max_episode_steps
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_exec, ACT_DIM), np.float32)
        self.env, self.eval_queue, self.idle, self.t = None, None, False, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.env is None:  # robosuite raises when stepped past its horizon: keep it out of reach
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # in the worker: Ctrl-C is the main process's to handle
            self.env = make_control_env(self.bddl, self.max_episode_steps + NUM_SETTLE_STEPS + 10)
        self.idle, self.t = False, 0
        if self.eval_queue is not None:
            if not self.eval_queue:
                self.idle = True
                return np.zeros(self.observation_space.shape, np.float32), {}
            self.env.reset()
            raw = self.env.set_init_state(self.eval_queue.pop(0))
        else:
            raw = fresh_placement(self.env, int(self.np_random.integers(2**31 - 1)))
        skip_repeated_forward(self.env)
        for _ in range(NUM_SETTLE_STEPS):
            raw, _, _, _ = self.env.step(SETTLE_ACTION)
        return state_obs(raw), {}

    def step(self, action):
        if self.idle:
            return np.zeros(self.observation_space.shape, np.float32), 0.0, False, False, {"steps": 0, "t": 0}
        success, steps = False, 0
        for a in action:
            raw, reward, _, _ = self.env.step(np.asarray(a, dtype=np.float64))
            steps, self.t = steps + 1, self.t + 1
            success = reward >= 1.0
            if success or self.t >= self.max_episode_steps:
                break
        truncated = not success and self.t >= self.max_episode_steps
        return state_obs(raw), float(success), success, truncated, {"steps": steps, "t": self.t}

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None


def make_vector_env(bddl, obs_dim, args, max_episode_steps):
    """Same-step autoreset: a finished env's last observation arrives in info['final_obs']."""
    thunk = partial(LiberoStateEnv, bddl, obs_dim, args.act_exec, max_episode_steps)
    return gym.vector.AsyncVectorEnv(
        [thunk for _ in range(args.num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
# --- end copied block: tasks and environments ---


# --- begin copied block: arm start ---
ARM_START_NOISE = 0.02
"""std (rad) of the arm's joints around their home pose at a fresh placement: robosuite's default reset noise,
with which LIBERO's shipped init states were made (LIBERO's ControlEnv turns it off)"""


def fresh_placement(env, seed):
    """Reset to the placement of `seed` and start the arm as LIBERO's init states do: its joints drawn
    around the home pose, then set as evaluation sets an init state (after a reset, so the arm
    controller keeps the home pose as its nullspace target, as in evaluation). Returns the observation.

    The same seed gives the same placement whatever the env did before. LIBERO appends a copy of each
    articulated object's open/close (on/off) sampler to `object_property_initializers` at every model
    load and draws from all of them before placing the objects, so the k-th hard reset would shift the
    placements' random stream by k draws; the copies are alike, so only the newest set is kept."""
    samplers = env.env.object_property_initializers
    del samplers[: len(samplers) - len({s.name for s in samplers})]
    env.seed(seed)
    env.reset()
    state = env.get_sim_state().copy()
    arm = 1 + np.asarray(env.env.robots[0]._ref_joint_pos_indexes)  # a flattened state is [time, qpos, qvel]
    state[arm] += np.random.default_rng(seed).normal(0.0, ARM_START_NOISE, len(arm))
    return env.set_init_state(state)
# --- end copied block: arm start ---


# networks: DPPO's residual MLPs, the DDPM schedule, and the policy that samples and scores chains


def sinusoidal_embedding(k, dim):  # (B,) -> (B, dim), as in transformers and DDPM
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=k.device) / (dim // 2 - 1))
    angles = k.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# --- begin copied block: residual block ---
class ResidualBlock(nn.Module):
    """DPPO's TwoLayerPreActivationResNetLinear: x + W2 mish(W1 mish(x))."""

    def __init__(self, dim):
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.l2(F.mish(self.l1(F.mish(x))))
# --- end copied block: residual block ---


class DiffusionMLP(nn.Module):
    """Noise predictor eps(x_k, k, s), DPPO's DiffusionMLP with residual_style=True."""

    def __init__(self, obs_dim, act_dim, act_horizon, hidden_dim, time_dim=TIME_DIM):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, 2 * time_dim), nn.Mish(), nn.Linear(2 * time_dim, time_dim))
        self.inp = nn.Linear(act_horizon * act_dim + time_dim + obs_dim, hidden_dim)
        self.block = ResidualBlock(hidden_dim)
        self.out = nn.Linear(hidden_dim, act_horizon * act_dim)

    def forward(self, x, k, obs):  # x (B, Ta, Da), k (B,), obs (B, Do) -> (B, Ta, Da)
        h = torch.cat([x.flatten(1), self.time_mlp(sinusoidal_embedding(k, self.time_dim)), obs], dim=-1)
        return self.out(self.block(self.inp(h))).view(x.shape)


# --- begin copied block: critic ---
CRITIC_HIDDEN = 256  # critic width (DPPO can config: residual [256, 256, 256], Mish)


class Critic(nn.Module):
    """V(s) on the normalised state, DPPO's CriticObs with residual_style=True."""

    def __init__(self, obs_dim, hidden_dim=CRITIC_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden_dim), ResidualBlock(hidden_dim), nn.Linear(hidden_dim, 1))

    def forward(self, obs):  # (B, Do) -> (B,)
        return self.net(obs).squeeze(-1)
# --- end copied block: critic ---


def cosine_schedule(K, s=0.008):
    """betas[k], alpha_bar[k] for k = 0..K (Nichol & Dhariwal 2021); alpha_bar[0] = 1 is the clean action."""
    k = torch.arange(K + 1, dtype=torch.float64)
    f = torch.cos((k / K + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - f[1:] / f[:-1]).clamp(max=0.999)])
    return betas, torch.cumprod(1 - betas, dim=0)


class DiffusionPolicy(nn.Module):
    """DDPM action-chunk policy with a frozen BC denoiser (`actor`) for steps K..K'+1 and a
    trainable copy (`actor_ft`) for the last K' steps. Works in normalised units (obs z-scored,
    actions in [-1, 1]); `act` wraps it for raw observations and env-unit actions.

    Rebuild from a checkpoint dict alone with `DiffusionPolicy.from_checkpoint(ckpt)`.
    """

    def __init__(self, obs_dim, act_dim, act_horizon, act_exec, denoising_steps, ft_denoising_steps,
                 hidden_dim, min_sampling_std, min_logprob_std, randn_clip, obs_mean, obs_std, act_min, act_max):
        super().__init__()
        self.obs_dim, self.act_dim, self.act_horizon, self.act_exec = obs_dim, act_dim, act_horizon, act_exec
        self.K, self.K_ft, self.randn_clip = denoising_steps, ft_denoising_steps, randn_clip
        self.min_sampling_std, self.min_logprob_std = min_sampling_std, min_logprob_std
        self.hidden_dim = hidden_dim
        self.actor = DiffusionMLP(obs_dim, act_dim, act_horizon, hidden_dim).requires_grad_(False)
        self.actor_ft = DiffusionMLP(obs_dim, act_dim, act_horizon, hidden_dim)
        betas, ab = cosine_schedule(denoising_steps)
        ab_prev = torch.cat([ab[:1], ab[:-1]])  # index k holds alpha_bar_{k-1}
        buffers = {
            "sqrt_recip_ab": (1 / ab).sqrt(),  # x0 = sqrt(1/ab_k) x_k - sqrt(1/ab_k - 1) eps
            "sqrt_recipm1_ab": (1 / ab - 1).sqrt(),
            "mu_x0": betas * ab_prev.sqrt() / (1 - ab).clamp(min=1e-12),  # posterior mean coefficients
            "mu_xk": (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab).clamp(min=1e-12),
            "post_std": (betas * (1 - ab_prev) / (1 - ab).clamp(min=1e-12)).sqrt(),  # 0 at k = 1
            "alpha_bar": ab,  # q(x_k | x_0) = N(sqrt(ab_k) x_0, (1 - ab_k) I), for behaviour cloning
            "obs_mean": torch.as_tensor(obs_mean, dtype=torch.float64),
            "obs_std": torch.as_tensor(obs_std, dtype=torch.float64),
            "act_min": torch.as_tensor(act_min, dtype=torch.float64),
            "act_max": torch.as_tensor(act_max, dtype=torch.float64),
        }
        for name, value in buffers.items():  # not in state_dict: rebuilt from the checkpoint fields
            self.register_buffer(name, value.float(), persistent=False)

    def config(self):
        """Checkpoint fields that rebuild this policy (with `model` = state_dict())."""
        return dict(
            obs_dim=self.obs_dim, act_dim=self.act_dim, obs_horizon=1, act_horizon=self.act_horizon,
            act_exec=self.act_exec, denoising_steps=self.K, ft_denoising_steps=self.K_ft, beta_schedule="cosine",
            min_sampling_std=self.min_sampling_std, min_logprob_std=self.min_logprob_std, randn_clip=self.randn_clip,
            hidden_dim=self.hidden_dim,
            obs_keys=list(OBS_KEYS),
            normalizer={k: getattr(self, k).cpu() for k in ("obs_mean", "obs_std", "act_min", "act_max")},
        )

    @classmethod
    def from_checkpoint(cls, c, device="cpu"):
        """The policy of a checkpoint dict (torch.load(path, weights_only=True)), in eval mode on `device`."""
        floors = [c.get(key, c.get("min_std")) for key in ("min_sampling_std", "min_logprob_std")]  # min_std: one floor for both, before the two were split
        policy = cls(c["obs_dim"], c["act_dim"], c["act_horizon"], c["act_exec"], c["denoising_steps"],
                     c["ft_denoising_steps"], c["hidden_dim"], *floors, c["randn_clip"], **c["normalizer"])
        policy.load_state_dict(c["model"])
        return policy.to(device).eval()

    @classmethod
    def from_demos(cls, obs, actions, args):
        """A new policy of the script's Args, its normalisers fitted to the demos' states (N, Do) and actions (N, Da)."""
        return cls(obs.shape[1], actions.shape[1], args.act_horizon, args.act_exec, args.denoising_steps,
                   args.ft_denoising_steps, args.hidden_dim, args.min_sampling_std, args.min_logprob_std, args.randn_clip,
                   **demo_normalizers(obs, actions))

    def normalize_obs(self, obs):
        return ((obs - self.obs_mean) / self.obs_std).clamp(-10, 10)  # states far outside the demos stay bounded

    def normalize_action(self, a):
        return 2 * (a - self.act_min) / (self.act_max - self.act_min) - 1

    def unnormalize_action(self, a):
        return (a + 1) / 2 * (self.act_max - self.act_min) + self.act_min

    def step_mean_std(self, x, k, obs, net):
        """Mean and std of p(x_{k-1} | x_k, s): x (B, Ta, Da), k (B,) in 1..K, obs (B, Do)."""
        eps = net(x, k, obs)
        x0 = (self.sqrt_recip_ab[k, None, None] * x - self.sqrt_recipm1_ab[k, None, None] * eps).clamp(-1, 1)
        mean = self.mu_x0[k, None, None] * x0 + self.mu_xk[k, None, None] * x
        return mean, self.post_std[k, None, None].expand_as(mean)

    @torch.no_grad()
    def sample(self, obs, explore, base=False):
        """Normalised obs (B, Do) -> chunk x_0 (B, Ta, Da) in [-1, 1] and chain (B, K'+1, Ta, Da) = x_K' .. x_0.

        explore=True is fine-tuning's sampler: every step's std floored at min_sampling_std, so the chain
        has the density `chain_log_prob` scores. explore=False is plain DDPM (no noise at k = 1).
        base=True samples with the frozen BC denoiser at every step (the BC regulariser's teacher).
        """
        B = obs.shape[0]
        x = torch.randn(B, self.act_horizon, self.act_dim, device=obs.device)
        chain = [x] if self.K_ft == self.K else []
        for k in range(self.K, 0, -1):
            net = self.actor_ft if k <= self.K_ft and not base else self.actor
            mean, std = self.step_mean_std(x, torch.full((B,), k, device=obs.device), obs, net)
            if explore:
                std = std.clamp(min=self.min_sampling_std)
            x = mean + std * torch.randn_like(x).clamp(-self.randn_clip, self.randn_clip)
            if k == 1:
                x = x.clamp(-1, 1)
            if k - 1 <= self.K_ft:
                chain.append(x)
        return x, torch.stack(chain, dim=1)

    def chain_log_prob(self, obs, chain):
        """Per-element log N(x_{k-1}; mu(x_k, k, s), max(sigma_k, min_logprob_std)^2) of the K' fine-tuned steps.

        obs (B, Do), chain (B, K'+1, Ta, Da) -> (B, K', Ta, Da), ordered k = K' .. 1; the sum over the
        last three dims is the log-probability of the chunk's fine-tuned chain.
        """
        B, K_ft = chain.shape[0], self.K_ft
        x_k = chain[:, :-1].reshape(B * K_ft, self.act_horizon, self.act_dim)
        x_prev = chain[:, 1:].reshape(B * K_ft, self.act_horizon, self.act_dim)
        k = torch.arange(K_ft, 0, -1, device=chain.device).repeat(B)
        mean, std = self.step_mean_std(x_k, k, obs.repeat_interleave(K_ft, dim=0), self.actor_ft)
        std = std.clamp(min=self.min_logprob_std)
        logp = -((x_prev - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
        return logp.view(B, K_ft, self.act_horizon, self.act_dim)

    @torch.no_grad()
    def act(self, obs, explore=False):
        """Raw state observations (B, Do), see `state_obs` -> executed chunk (B, Te, Da) in env units, numpy."""
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.obs_mean.device)
        chunk, _ = self.sample(self.normalize_obs(obs), explore)
        return self.unnormalize_action(chunk[:, : self.act_exec]).cpu().numpy()

    def bc_loss(self, obs):
        """DPPO's behaviour-cloning regulariser at normalised states (B, Do): minus the PPO-scale
        log-likelihood, under the fine-tuned chain, of chains the frozen BC denoiser samples there."""
        _, teacher_chain = self.sample(obs, explore=True, base=True)
        return -ppo_log_prob(self, obs, teacher_chain, self.act_exec).mean()

    def imitation_loss(self, obs, chunk):
        """Behaviour cloning's DDPM loss at normalised states (B, Do) and demo chunks (B, Ta, Da): the
        fine-tuned denoiser predicts the noise that q(x_k | x_0) added at a random step k."""
        k = torch.randint(1, self.K + 1, (len(chunk),), device=chunk.device)
        eps = torch.randn_like(chunk)
        x_k = self.alpha_bar[k, None, None].sqrt() * chunk + (1 - self.alpha_bar[k, None, None]).sqrt() * eps
        return F.mse_loss(self.actor_ft(x_k, k, obs), eps)

    def start_from_bc(self, state):
        """After behaviour cloning: its EMA weights become both the frozen denoiser and the fine-tuned copy."""
        self.actor.load_state_dict(state)
        self.actor_ft.load_state_dict(state)

    def ft_parameters(self):
        """What PPO trains: the fine-tuned denoiser."""
        return list(self.actor_ft.parameters())

    def after_actor_step(self):
        """Called after each actor optimiser step; the denoiser has no constrained parameter to project."""

    def log_scalars(self):
        """Scalars of the policy itself for the progress line and TensorBoard: none for the denoiser."""
        return {}


Policy = DiffusionPolicy  # the policy the main body builds, clones and fine-tunes (GaussianPolicy in gaussian_ppo.py)


# small maths, each held by a unit test


def ppo_log_prob(policy, obs, chain, act_exec):
    """(B, K') per-step log-probabilities for the PPO ratio, as DPPO computes them: per-element
    log-likelihoods of the executed actions clamped to [-5, 2] and averaged over (Te, Da); the clip
    range 0.001-0.01 is tuned for this per-element scale."""
    return policy.chain_log_prob(obs, chain)[..., :act_exec, :].clamp(-5, 2).mean(dim=(-1, -2))


# --- begin copied block: gae ---
def gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """GAE over (T, N) arrays. next_values[t] is V of the observation that followed step t (the
    final observation when the episode ended); terminated cuts the bootstrap, dones cut the trace."""
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] * (1 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values
# --- end copied block: gae ---


def clip_schedule(K_ft, base, final, rate):
    """PPO clip per fine-tuned step, ordered k = K' .. 1: grows exponentially from base to final."""
    if K_ft == 1:
        return torch.tensor([final])
    tau = torch.arange(K_ft, dtype=torch.float64) / (K_ft - 1)
    return (base + (final - base) * (torch.exp(rate * tau) - 1) / (math.exp(rate) - 1)).float()


def denoising_discount(K_ft, gamma_denoising):
    """gamma_denoising^(k-1) per fine-tuned step, ordered k = K' .. 1 (1 at the step that makes the action)."""
    return gamma_denoising ** torch.arange(K_ft - 1, -1, -1, dtype=torch.float32)


# --- begin copied block: wilson interval ---
def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval of a success rate, clamped to [0, 1] (rounding can put an end a hair outside)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))
# --- end copied block: wilson interval ---


# --- begin copied block: reward scaling ---
class RewardScaler:
    """Divides rewards by the running std of the discounted return (DPPO's RunningRewardScaler)."""

    def __init__(self, num_envs, gamma, clip=10.0):
        self.gamma, self.clip = gamma, clip
        self.ret, self.mean, self.var, self.count = np.zeros(num_envs), 0.0, 1.0, 1e-4

    def __call__(self, rewards, dones):  # (T, N) numpy
        rets = np.zeros_like(rewards)
        for t in range(len(rewards)):
            self.ret = self.ret * self.gamma + rewards[t]
            rets[t] = self.ret
            self.ret = self.ret * (1 - dones[t])
        delta, n = rets.mean() - self.mean, rets.size
        total = self.count + n
        self.var = (self.var * self.count + rets.var() * n + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total
        return np.clip(rewards / np.sqrt(self.var + 1e-8), -self.clip, self.clip)

    def state_dict(self):  # the running return restarts with the episodes whenever the envs are reset
        return {"mean": float(self.mean), "var": float(self.var), "count": float(self.count)}

    def load_state_dict(self, d):
        self.mean, self.var, self.count = d["mean"], d["var"], d["count"]
# --- end copied block: reward scaling ---


# --- begin copied block: rollout and ppo update ---
@torch.no_grad()
def rollout(policy, envs, next_obs, min_episodes, gamma):
    """Roll the vector env on, one chunk step of every env at a time, with the exploring sampler until
    at least `min_episodes` episodes have ended, whatever the number of envs. Episodes still running
    go on in the next batch (their last step is bootstrapped by the critic). Returns the batch,
    (T, N, ...) over chunk steps and envs, and the envs' current observations."""
    device, N = policy.obs_mean.device, envs.num_envs
    steps_obs, steps_next, steps_chain, steps_rew, steps_term, steps_done = [], [], [], [], [], []
    batch = dict(ep_success=[], ep_len=[], ep_return=[], env_steps=0, env_time=0.0)
    while len(batch["ep_success"]) < min_episodes:
        obs = policy.normalize_obs(torch.as_tensor(next_obs, device=device))
        chunk, chain = policy.sample(obs, explore=True)
        t0 = time.time()
        next_obs, reward, terminated, truncated, info = envs.step(policy.unnormalize_action(chunk[:, : policy.act_exec]).cpu().numpy())
        batch["env_time"] += time.time() - t0
        done = terminated | truncated
        real_next, steps = next_obs.copy(), np.asarray(info.get("steps", np.zeros(N)), dtype=np.int64)
        for i in np.nonzero(done)[0]:  # same-step autoreset: the finished episode's data sits in info
            real_next[i], steps[i] = info["final_obs"][i], info["final_info"]["steps"][i]
            t = int(info["final_info"]["t"][i])
            batch["ep_success"].append(float(terminated[i]))
            batch["ep_len"].append(t)
            # the discounted return of the episode: reward 1 at its last chunk step on success
            batch["ep_return"].append(float(terminated[i]) * gamma ** (math.ceil(t / policy.act_exec) - 1))
        batch["env_steps"] += int(steps.sum())
        steps_obs.append(obs)
        steps_next.append(policy.normalize_obs(torch.as_tensor(real_next, device=device)))
        steps_chain.append(chain)
        steps_rew.append(reward)
        steps_term.append(terminated)
        steps_done.append(done)
    batch.update(obs=torch.stack(steps_obs), next_obs=torch.stack(steps_next), chains=torch.stack(steps_chain),
                 rewards=np.stack(steps_rew).astype(np.float64), terminated=np.stack(steps_term).astype(np.float64),
                 dones=np.stack(steps_done).astype(np.float64))
    return batch, next_obs


def has_learning_signal(ep_returns, min_return_std):
    """Whether the ended episodes' discounted returns differ enough to rank the batch's actions: with
    no success (or every episode succeeding alike) the advantages are only the critic's noise."""
    return len(ep_returns) > 0 and float(np.std(ep_returns)) >= min_return_std


@torch.no_grad()
def advantages(policy, critic, scaler, batch, args):
    """GAE over the batch's chunk steps, normalised over the whole batch; the old log-probabilities
    of the sampled chains; the critic's explained variance on this batch, before it trains on it."""
    T, N = batch["rewards"].shape
    b_obs, b_chain = batch["obs"].flatten(0, 1), batch["chains"].flatten(0, 1)  # (T*N, Do), (T*N, K'+1, Ta, Da)
    values = critic(b_obs).view(T, N)
    next_values = critic(batch["next_obs"].flatten(0, 1)).view(T, N)
    old_logp = torch.cat([ppo_log_prob(policy, b_obs[i : i + 1024], b_chain[i : i + 1024], policy.act_exec)
                          for i in range(0, T * N, 1024)])  # (T*N, K')
    rewards = torch.as_tensor(scaler(batch["rewards"], batch["dones"]), dtype=torch.float32, device=b_obs.device)
    term, dones = (torch.as_tensor(batch[k], dtype=torch.float32, device=b_obs.device) for k in ("terminated", "dones"))
    adv, returns = gae(rewards, values, next_values, term, dones, args.gamma, args.gae_lambda)
    adv, returns, values = adv.view(-1), returns.view(-1), values.view(-1)
    var_y = returns.var().item()
    explained_variance = float("nan") if var_y == 0 else 1 - (returns - values).var().item() / var_y
    adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv  # over the whole batch, not per minibatch
    return dict(obs=b_obs, chains=b_chain, old_logp=old_logp, adv=adv, returns=returns,
                explained_variance=explained_variance)


def ppo_update(policy, critic, actor_opt, critic_opt, data, args, clip_coefs, discounts, update_actor, bc_loss_coeff=0.0):
    """update_epochs passes over the batch in minibatches of ~minibatch_size chunks, each chunk with all
    its fine-tuned steps. The critic always trains; the actor only when `update_actor`. Returns the logs."""
    actor_params = policy.ft_parameters()
    n = len(data["adv"])
    logs = dict(value_loss=[], policy_loss=[], bc_loss=[], approx_kl=[], clipfrac=[], actor_steps=0, critic_steps=0)
    for epoch in range(args.update_epochs):
        approx_kl = 0.0
        for mb in torch.randperm(n, device=data["adv"].device).tensor_split(max(1, round(n / args.minibatch_size))):
            v_loss = 0.5 * ((critic(data["obs"][mb]) - data["returns"][mb]) ** 2).mean()
            loss = args.vf_coef * v_loss
            logs["value_loss"].append(v_loss.item())
            if update_actor:
                adv = data["adv"][mb, None] * discounts  # (B, K'): the chunk's advantage, discounted per denoising step
                logratio = ppo_log_prob(policy, data["obs"][mb], data["chains"][mb], policy.act_exec) - data["old_logp"][mb]
                ratio = logratio.exp()
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coefs, 1 + clip_coefs)).mean()
                loss = loss + pg_loss
                if bc_loss_coeff > 0:
                    bc_loss = policy.bc_loss(data["obs"][mb])
                    loss = loss + bc_loss_coeff * bc_loss
                    logs["bc_loss"].append(bc_loss.item())
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - logratio).mean().item()
                    logs["clipfrac"].append(((ratio - 1).abs() > clip_coefs).float().mean().item())
                logs["policy_loss"].append(pg_loss.item())
                logs["approx_kl"].append(approx_kl)
            actor_opt.zero_grad()
            critic_opt.zero_grad()
            loss.backward()
            critic_opt.step()
            logs["critic_steps"] += 1
            if update_actor:
                nn.utils.clip_grad_norm_(actor_params, args.max_grad_norm)
                actor_opt.step()
                policy.after_actor_step()
                logs["actor_steps"] += 1
                if approx_kl > args.target_kl:
                    break
        if approx_kl > args.target_kl:
            break
    return logs
# --- end copied block: rollout and ppo update ---


# warm-start data


# --- begin copied block: warm-start data ---
WARM_START_VARIETY = 1.0
"""collect_demos.py --expert-variety of collected warm-start demos: varied motions (speed, heights, a bend of the
carry) clone better than one motion per placement (libero_spatial_1: BC 0.90 against 0.74, docs/EXPERIMENTS.md)"""


def find_or_collect_demos(args):
    """--demos-path, else data/<task>_scripted.hdf5, collected by collect_demos.py when missing."""
    if args.demos_path is not None:
        if not os.path.isfile(args.demos_path):
            fail(f"demos file '{args.demos_path}' does not exist: pass an existing --demos-path, "
                 "or leave it out to collect scripted demos")
        return args.demos_path
    path = os.path.join("data", f"{args.task}_scripted.hdf5")
    if os.path.isfile(path):
        return path
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collect_demos.py")
    if not os.path.isfile(script):
        fail(f"no demos at {path} and no collect_demos.py beside this script to make them: pass --demos-path")
    print(f"no demos at {path}: collecting {args.num_demos} scripted demos with collect_demos.py", flush=True)
    cmd = [sys.executable, script, "--task", args.task, "--policy", "scripted", "--num-demos", str(args.num_demos),
           "--expert-variety", str(WARM_START_VARIETY), "--no-images", "--out-path", path,
           "--num-workers", str(args.num_envs)]
    if subprocess.run(cmd).returncode != 0 or not os.path.isfile(path):
        fail(f"collect_demos.py could not make {path} (see its message above): fix that or pass --demos-path")
    return path


def load_demos(path, task, bddl, num_demos):
    """Returns per-demo lists of state observations (T, Do) and actions (T, Da), states replayed in the env."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        fail(f"'{path}' is not a readable HDF5 file: pass a demos file in the LIBERO layout")
    with f:
        if "data" not in f:
            fail(f"'{path}' has no 'data' group: pass a demos file in the LIBERO layout (DESIGN.md)")
        data = f["data"]
        file_task = data.attrs.get("task")
        file_task = file_task.decode() if isinstance(file_task, bytes) else file_task
        if file_task and file_task != task:
            fail(f"'{path}' holds demos of {file_task}, not {task}: pass --task {file_task} or other demos")
        bddl_name = data.attrs.get("bddl_file_name")  # all an official LIBERO file says of its task
        bddl_name = os.path.basename(bddl_name.decode() if isinstance(bddl_name, bytes) else bddl_name or "")
        if not file_task and bddl_name and bddl_name != os.path.basename(bddl):
            fail(f"'{path}' holds demos of {bddl_name}, not of {task} ({os.path.basename(bddl)}): pass {task}'s demos")
        try:
            controller = json.loads(data.attrs.get("env_args", "{}"))["env_kwargs"]["controller_configs"]["type"]
        except (KeyError, TypeError, ValueError):
            controller = "OSC_POSE"
        if controller != "OSC_POSE":
            fail(f"'{path}' was recorded with the {controller} controller; this script drives OSC_POSE")
        names = sorted((k for k in data if k[:5] == "demo_" and k[5:].isdigit()), key=lambda s: int(s[5:]))[:num_demos]
        if not names:
            fail(f"'{path}' holds no demo_<i> groups: collect some demos first")
        if len(names) < num_demos:
            print(f"{path} holds {len(names)} demos, fewer than --num-demos {num_demos}: cloning those", flush=True)
        for name in names:
            for key in ("actions", "states"):
                if key not in data[name]:
                    fail(f"'{path}' lacks data/{name}/{key}: pass a file in the LIBERO layout")
        raw = [(data[n]["states"][()], data[n]["actions"][()].astype(np.float32)) for n in names]
    env = make_control_env(bddl, 1000)
    env.reset()
    state_dim = len(env.get_sim_state())
    print(f"rebuilding state observations of {len(raw)} demos ({sum(len(a) for _, a in raw)} steps) by replay", flush=True)
    obs, actions = [], []
    for states, acts in raw:
        if states.shape[1] != state_dim or acts.shape[1] != ACT_DIM:
            fail(f"'{path}' has states of width {states.shape[1]} and actions of {acts.shape[1]}, "
                 f"where {task} needs {state_dim} and {ACT_DIM}: are these demos of {task}?")
        obs.append(np.stack([state_obs(env.regenerate_obs_from_state(s)) for s in states]))
        actions.append(acts)
    env.close()
    return obs, actions


def action_chunks(actions, act_horizon):
    """(T, Da) -> (T, Ta, Da): the chunk starting at each step, padded with the demo's last action."""
    padded = np.concatenate([actions, np.repeat(actions[-1:], act_horizon - 1, axis=0)])
    return np.stack([padded[t : t + act_horizon] for t in range(len(actions))])


def demo_normalizers(obs, actions):
    """The policy's normalisers, fitted to the demos' states (N, Do) and actions (N, Da): states z-scored,
    each action dimension's range mapped to [-1, 1]."""
    centre = (actions.min(0) + actions.max(0)) / 2
    half = np.maximum((actions.max(0) - actions.min(0)) / 2, 1e-2)  # a constant action dim gets a +-0.01 range
    return dict(obs_mean=obs.mean(0), obs_std=np.maximum(obs.std(0), 1e-2), act_min=centre - half, act_max=centre + half)
# --- end copied block: warm-start data ---


# evaluation and resuming


# --- begin copied block: evaluation and resuming ---
@torch.no_grad()
def evaluate(policy, envs, init_states, explore=False):
    """Run one episode from each init state with the deterministic policy (or, with explore=True, the
    exploring sampler that fine-tuning optimises); returns the number of successes."""
    n = envs.num_envs
    envs.set_attr("eval_queue", [list(init_states[i::n]) for i in range(n)])
    obs, _ = envs.reset()
    finished, successes = 0, 0
    while finished < len(init_states):
        actions = policy.act(obs, explore=explore)
        obs, _, terminated, truncated, _ = envs.step(actions)
        finished += int((terminated | truncated).sum())  # idle envs never report an end
        successes += int(terminated.sum())
    envs.set_attr("eval_queue", [None] * n)
    return successes


def plot_eval_history(history, path, title):
    """Evaluation success against env steps and against wall time, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rows: iteration, env steps, wall seconds, success, exploring sampler's success (or None), training success
    h = np.asarray([[np.nan if v is None else v for v in row] for row in history], dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, x, label in ((axes[0], h[:, 1], "env steps"), (axes[1], h[:, 2] / 60, "wall time (min)")):
        ax.plot(x, h[:, 3], "o-", label="deterministic, init states")
        ax.plot(x, h[:, 4], "x--", alpha=0.6, label="exploring sampler, init states")
        ax.plot(x, h[:, 5], ".:", alpha=0.6, label="training episodes (exploring)")
        ax.set_xlabel(label), ax.grid(alpha=0.3)
    axes[0].set_ylabel("success on the init states"), axes[0].set_ylim(-0.02, 1.02), axes[0].legend(fontsize=8)
    fig.suptitle(title), fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_resume(path, task):
    if not os.path.isfile(path):
        fail(f"--resume '{path}' does not exist: pass a runs/<run>/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        fail(f"--resume '{path}' is not a checkpoint this script can read: pass a runs/<run>/last.pt")
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind != KIND:
        fail(f"--resume '{path}' is a checkpoint of kind '{kind}', not '{KIND}': pass a last.pt written by this script")
    if ckpt["task"] != task:
        fail(f"--resume '{path}' is a run on {ckpt['task']}: pass --task {ckpt['task']}")
    return ckpt
# --- end copied block: evaluation and resuming ---


if __name__ == "__main__":
    args = tyro.cli(Args)
    # --- begin copied block: run set-up and behaviour cloning ---
    suite_name, _ = parse_task(args.task)
    least = dict(num_demos=1, num_envs=1, max_episode_steps=1, eval_episodes=1, eval_every=1, act_exec=1,
                 total_iterations=0, episodes_per_update=1, minibatch_size=1, update_epochs=1, critic_warmup_max=0)
    for flag, low in least.items():
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            fail(f"--{flag.replace('_', '-')} must be at least {low} (got {getattr(args, flag)})")
    if args.eval_episodes > 50:
        fail(f"--eval-episodes must be at most 50, the number of shipped init states (got {args.eval_episodes})")
    if args.time_limit_min is not None and args.time_limit_min <= 0:
        fail("--time-limit-min must be more than 0")
    if args.act_exec > args.act_horizon:
        fail("--act-exec must be at most --act-horizon: a chunk cannot execute more actions than it predicts")
    existing = os.path.abspath(args.out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--out-dir '{args.out_dir}' lies under the file '{existing}': pass a directory")
    resumed = load_resume(args.resume, args.task) if args.resume else None
    demos_path = None if resumed else find_or_collect_demos(args)
    max_episode_steps = args.max_episode_steps or STEP_LIMITS[suite_name]
    N = args.num_envs
    run_name = f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.dirname(os.path.abspath(args.resume)) if resumed else os.path.join(args.out_dir, run_name)
    new_out_dir = not resumed and not os.path.isdir(args.out_dir)
    for n in range(2, 100):  # two runs started in the same second get two folders, never one
        try:
            os.makedirs(run_dir, exist_ok=bool(resumed))
            break
        except FileExistsError:
            run_dir = os.path.join(args.out_dir, f"{run_name}-{n}")
        except OSError as e:
            fail(f"cannot create the run folder '{run_dir}' ({e.strerror}): pass another --out-dir")
    run_name = os.path.basename(run_dir)

    def on_exit():  # a run that ends before its first checkpoint leaves no folder behind
        if not resumed and not os.path.isfile(os.path.join(run_dir, "last.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)
            if new_out_dir and os.path.isdir(args.out_dir) and not os.listdir(args.out_dir):  # nor an --out-dir it made
                os.rmdir(args.out_dir)

    def on_uncaught(kind, value, tb):  # Ctrl-C: one line with the command that continues the run
        if not issubclass(kind, KeyboardInterrupt):
            return sys.__excepthook__(kind, value, tb)
        last = os.path.join(run_dir, "last.pt")
        print(f"interrupted: continue with python {os.path.basename(__file__)} --task {args.task} --resume {last}"
              if os.path.isfile(last) else "interrupted before the first checkpoint: nothing was kept", file=sys.stderr)

    atexit.register(on_exit)
    sys.excepthook = on_uncaught
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    start_time = time.time()

    bddl, init_states = task_bddl_and_init_states(args.task)
    init_states = init_states[: args.eval_episodes]
    if resumed:
        policy = Policy.from_checkpoint(resumed, device).train()
    else:
        demo_obs, demo_actions = load_demos(demos_path, args.task, bddl, args.num_demos)
        all_obs = np.concatenate(demo_obs)
        policy = Policy.from_demos(all_obs, np.concatenate(demo_actions), args).to(device)
    critic = Critic(policy.obs_dim).to(device)
    # workers are forked before the torch work below; each builds its MuJoCo env on its first reset
    envs = make_vector_env(bddl, policy.obs_dim, args, max_episode_steps)
    print(f"{args.task}: obs {policy.obs_dim}, {N} envs, {max_episode_steps} steps per episode, {KIND} policy with "
          f"{sum(p.numel() for p in policy.ft_parameters()) / 1e6:.2f} M parameters to fine-tune", flush=True)
    actor_opt = torch.optim.Adam(policy.ft_parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    scaler = RewardScaler(N, args.gamma)
    # everything that summary.json reports and a resumed run continues from
    stats = dict(iteration=0, env_steps=0, episodes=0, wall_time=0.0, bc_success=None, eval_success=None, eval_ci=None,
                 eval_explore_success=None, best_success=-1.0, best_ci=None, best_iteration=None, best_env_steps=None,
                 best_wall_time=None, eval_history=[], actor_grad_steps=0,
                 critic_grad_steps=0, critic_ready=False, skipped_actor_updates=0)
    if resumed:
        bc_ema_state = resumed["ema"]
        critic.load_state_dict(resumed["critic"])
        actor_opt.load_state_dict(resumed["optimizers"]["actor"])
        critic_opt.load_state_dict(resumed["optimizers"]["critic"])
        scaler.load_state_dict(resumed["reward_scaler"])
        torch.set_rng_state(resumed["rng"])
        stats.update({k: resumed[k] for k in stats if k in resumed})
        print(f"resumed {args.resume} at iteration {stats['iteration']}, {stats['env_steps']} env steps", flush=True)
    else:
        # ALGO LOGIC: behaviour cloning, the policy's imitation loss on the demos' action chunks; RL starts from the EMA
        obs_t = policy.normalize_obs(torch.as_tensor(all_obs, device=device))
        chunks = np.concatenate([action_chunks(a, args.act_horizon) for a in demo_actions])
        act_t = policy.normalize_action(torch.as_tensor(chunks, device=device))  # (N, Ta, Da) in [-1, 1]
        net = policy.actor_ft  # the network that behaviour cloning trains, in place
        ema = copy.deepcopy(net).requires_grad_(False)
        bc_opt = torch.optim.AdamW(net.parameters(), lr=args.bc_lr, weight_decay=args.bc_weight_decay)
        steps_per_epoch = math.ceil(len(obs_t) / args.bc_batch_size)
        bc_sched = torch.optim.lr_scheduler.CosineAnnealingLR(bc_opt, args.bc_epochs * steps_per_epoch, args.bc_min_lr)
        print(f"behaviour cloning: {len(obs_t)} samples, {args.bc_epochs} epochs of {steps_per_epoch} steps", flush=True)
        step, bc_start = 0, time.time()
        torch.set_num_threads(max(args.torch_threads, os.cpu_count() or 1))  # the env workers idle until BC ends
        for epoch in range(args.bc_epochs):
            perm, epoch_loss = torch.randperm(len(obs_t), device=device), 0.0
            for i in range(0, len(obs_t), args.bc_batch_size):
                loss = policy.imitation_loss(obs_t[perm[i : i + args.bc_batch_size]], act_t[perm[i : i + args.bc_batch_size]])
                bc_opt.zero_grad()
                loss.backward()
                bc_opt.step()
                bc_sched.step()
                step, epoch_loss = step + 1, epoch_loss + loss.item() / steps_per_epoch
                if epoch < EMA_START_EPOCH:
                    ema.load_state_dict(net.state_dict())
                elif step % EMA_EVERY == 0:
                    for p_ema, p in zip(ema.parameters(), net.parameters()):
                        p_ema.lerp_(p, 1 - args.ema_decay)
            writer.add_scalar("losses/bc_loss", epoch_loss, epoch)
            if epoch % max(1, args.bc_epochs // 20) == 0 or epoch == args.bc_epochs - 1:
                print(f"bc epoch {epoch}: loss {epoch_loss:.4f}, {time.time() - bc_start:.0f}s", flush=True)
        bc_ema_state = {k: v.cpu() for k, v in ema.state_dict().items()}
        policy.start_from_bc(ema.state_dict())
        del obs_t, act_t, ema, bc_opt
        torch.set_num_threads(args.torch_threads)
    # --- end copied block: run set-up and behaviour cloning ---

    # DPPO's PPO clip and advantage discount per fine-tuned denoising step, and its BC regulariser
    clip_coefs = clip_schedule(args.ft_denoising_steps, args.clip_coef_base, args.clip_coef, CLIP_COEF_RATE).to(device)
    discounts = denoising_discount(args.ft_denoising_steps, args.gamma_denoising).to(device)
    bc_loss_coeff = args.bc_loss_coeff

    # --- begin copied block: training loop ---
    wall_offset, iteration = stats["wall_time"], stats["iteration"]
    recent_train_success = []  # the exploring policy's episodes since the last evaluation

    def save(name):
        """Checkpoint dict (DESIGN.md): rebuilds the policy alone, and resumes the run."""
        stats.update(iteration=iteration, wall_time=wall_offset + time.time() - start_time)
        ckpt = dict(kind=KIND, task=args.task, **policy.config(), max_episode_steps=max_episode_steps,
                    model={k: v.cpu() for k, v in policy.state_dict().items()}, ema=bc_ema_state,
                    critic={k: v.cpu() for k, v in critic.state_dict().items()},
                    optimizers={"actor": actor_opt.state_dict(), "critic": critic_opt.state_dict()},
                    reward_scaler=scaler.state_dict(), rng=torch.get_rng_state(), args=asdict(args), **stats)
        torch.save(ckpt, os.path.join(run_dir, name + ".tmp"))  # then rename: never half a file under the real name
        os.replace(os.path.join(run_dir, name + ".tmp"), os.path.join(run_dir, name))
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(dict(run_name=run_name, task=args.task, final_success=stats["eval_success"], **stats), f, indent=2)

    def out_of_time():
        return args.time_limit_min is not None and wall_offset + time.time() - start_time > 60 * args.time_limit_min

    seeds = np.random.default_rng([args.seed, iteration]).integers(2**31 - 1, size=N)
    next_obs, _ = envs.reset(seed=[int(s) for s in seeds])
    line = None if resumed else "iter 0 (BC)"  # the progress line of the update just made; a resumed run has none yet
    while True:
        if line is not None and (iteration % args.eval_every == 0 or iteration >= args.total_iterations or out_of_time()):
            # evaluation of the deterministic policy (and with --eval-explore the exploring sampler) on the
            # init states: the BC policy's first, then every eval_every updates and after the last one
            t0 = time.time()
            successes = evaluate(policy, envs, init_states)
            explore_rate = evaluate(policy, envs, init_states, explore=True) / len(init_states) if args.eval_explore else None
            train_rate = float(np.mean(recent_train_success)) if recent_train_success else None
            recent_train_success.clear()
            rate, ci = successes / len(init_states), list(wilson_interval(successes, len(init_states)))
            stats.update(eval_success=rate, eval_ci=ci, eval_explore_success=explore_rate)
            if iteration == 0:  # the BC policy's score, known before its checkpoint is written
                stats["bc_success"] = rate
            stats["eval_history"].append([iteration, stats["env_steps"], wall_offset + time.time() - start_time,
                                          rate, explore_rate, train_rate])
            plot_eval_history(stats["eval_history"], os.path.join(run_dir, "success.png"), f"{args.task}, {args.exp_name}")
            scalars = {"success_rate": rate, "ci_low": ci[0], "ci_high": ci[1], "explore_success_rate": explore_rate,
                       "train_success_since_last_eval": train_rate}
            for tag, value in scalars.items():
                if value is not None:
                    writer.add_scalar(f"eval/{tag}", value, stats["env_steps"])
            if rate > stats["best_success"]:
                stats.update(best_success=rate, best_ci=ci, best_iteration=iteration,
                             best_env_steps=stats["env_steps"], best_wall_time=wall_offset + time.time() - start_time)
                save("expert.pt")
            explore = "" if explore_rate is None else f", exploring sampler {explore_rate:.2f}"
            train = "" if train_rate is None else f" (training episodes since the last: {train_rate:.2f})"
            line += f" | eval {rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]{explore} on {len(init_states)} init states{train} ({time.time() - t0:.0f}s)"
            next_obs, _ = envs.reset()
            scaler.ret[:] = 0
        if line is not None:
            print(line, flush=True)
            save("last.pt")
        if iteration >= args.total_iterations or out_of_time():
            break
        iteration += 1
        it_start = time.time()
        # ALGO LOGIC: experience until episodes_per_update episodes have ended, then one PPO update on all of it
        batch, next_obs = rollout(policy, envs, next_obs, args.episodes_per_update, args.gamma)
        torch.set_num_threads(max(args.torch_threads, os.cpu_count() or 1))  # the env workers idle during the update
        data = advantages(policy, critic, scaler, batch, args)
        if not stats["critic_ready"]:  # warm-up ends once the critic predicts fresh returns, or after a bounded wait
            warmup_done = iteration > args.critic_warmup_max
            stats["critic_ready"] = warmup_done or data["explained_variance"] >= args.critic_warmup_ev
        signal = has_learning_signal(batch["ep_return"], args.signal_min_return_std)
        update_actor = stats["critic_ready"] and signal
        stats["skipped_actor_updates"] += int(stats["critic_ready"] and not signal)
        logs = ppo_update(policy, critic, actor_opt, critic_opt, data, args, clip_coefs, discounts, update_actor,
                          bc_loss_coeff)
        torch.set_num_threads(args.torch_threads)
        stats["env_steps"] += batch["env_steps"]
        stats["episodes"] += len(batch["ep_success"])
        recent_train_success.extend(batch["ep_success"])
        stats["actor_grad_steps"] += logs["actor_steps"]
        stats["critic_grad_steps"] += logs["critic_steps"]

        it_time, env_time = time.time() - it_start, batch["env_time"]
        charts = {
            "charts/train_success_rate": float(np.mean(batch["ep_success"])),
            "charts/episodes": len(batch["ep_success"]),
            "charts/chunks": data["adv"].numel(),
            "charts/episode_length": float(np.mean(batch["ep_len"])),
            "charts/env_steps_per_s": batch["env_steps"] / it_time,
            "charts/env_seconds": env_time,
            "charts/network_seconds": it_time - env_time,
            "charts/iteration": iteration,
            "charts/actor_updated": float(update_actor),
            "losses/explained_variance": data["explained_variance"],
            **{f"losses/{k}": float(np.mean(v)) for k, v in logs.items() if isinstance(v, list) and v},
        }
        charts.update({f"charts/{k}": v for k, v in policy.log_scalars().items()})
        for tag, value in charts.items():
            writer.add_scalar(tag, value, stats["env_steps"])
        line = (f"iter {iteration}/{args.total_iterations}: train success {charts['charts/train_success_rate']:.2f} "
                f"({len(batch['ep_success'])} eps, {data['adv'].numel()} chunks), {stats['env_steps']} env steps, "
                f"{batch['env_steps'] / it_time:.0f} steps/s, env {env_time:.1f}s net {it_time - env_time:.1f}s, "
                f"{''.join(f'{k} {v:.3f}, ' for k, v in policy.log_scalars().items())}v_loss {charts['losses/value_loss']:.4f} ev {data['explained_variance']:.2f}")
        if update_actor:
            line += (f", pg {charts['losses/policy_loss']:.5f} kl {charts['losses/approx_kl']:.5f} "
                     f"clipfrac {charts['losses/clipfrac']:.3f}")
        elif not stats["critic_ready"]:
            line += ", critic warm-up: actor not updated"
        else:
            line += ", no learning signal (returns alike): actor not updated"

    envs.close()
    writer.close()
    print(f"done: BC {stats['bc_success']:.2f}, final {stats['eval_success']:.2f}, best {stats['best_success']:.2f}, "
          f"{stats['env_steps']} env steps, {stats['wall_time'] / 60:.1f} min; checkpoints in {run_dir}", flush=True)
    # --- end copied block: training loop ---
