"""Collect LIBERO demonstrations without a human: roll out a policy, keep successes, render.

Stage 1 of the pipeline (README; docs/SCRIPTS.md): writes demos in the LIBERO / robomimic HDF5 layout
(DESIGN.md "demos.hdf5"), so that every later stage reads ours and LIBERO's human files alike.

    python collect_demos.py --task libero_spatial_0 --policy scripted --num-demos 50
    python collect_demos.py --replay human_demo.hdf5 --image-size 128     # re-render any file
    python collect_demos.py --report a.hdf5 b.hdf5                        # metrics side by side

How it works
  1. Rollout, no renderer: `--num-workers` processes each build a state-only LIBERO env
     (about 25 ms a step here) and run episodes from fresh placements, `env.seed(s);
     env.reset()` with a recorded per-episode seed. The 50 shipped init states of the task are
     the evaluation set and are never used here. Successes are kept until `--num-demos` or
     `--max-attempts`; the kept set is the first N successes in seed order, so a run is
     deterministic whatever the worker timing.
  2. Render afterwards: each kept step's saved MuJoCo state is restored in a rendering env and
     agentview and eye-in-hand images are taken (about 0.1 s a camera frame in software EGL,
     so only kept steps are rendered). `--no-images` skips this for state-only warm-start data.

The scripted expert (scripted_expert.py) reads the goal from the task's BDDL and the privileged
simulator state: pick-and-place for On / In, drawers, doors and stove knobs for Open / Close /
TurnOn / TurnOff. `--scripted-table` measures its success per task from fresh placements.

Dimension legend
  T   steps in a demo (after the 10 unrecorded settle steps)
  S   flattened MuJoCo state (92 for libero_spatial_0)
  H,W image size (--image-size)
  D   robosuite object-state width (70 for libero_spatial_0)

References: LIBERO (Liu et al. 2023) for the layout, task suites and step limits; robomimic
for `env_args`; the smoothness metrics follow DESIGN.md.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import contextlib
import json
import logging
import multiprocessing as mp
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, List, Optional

import h5py
import numpy as np
import tyro

# robosuite warns about a missing private macro file at every import, in every worker
logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())
import robosuite.utils.transform_utils as T  # noqa: E402 (after the filter above)
from scripted_expert import ScriptedExpert, UnsupportedGoal  # noqa: E402 (the policy behind --policy scripted)


DEFAULT_IN_DOC = tyro.conf.arg(help_behavior_hint="")  # the field's docstring says what None means


@dataclass
class Args:
    task: Annotated[Optional[str], DEFAULT_IN_DOC] = None
    """task to collect, `<suite>_<index>`: suite in libero_spatial, libero_object, libero_goal, libero_10, libero_90 (default with a checkpoint: its task)"""
    policy: str = "scripted"
    """`scripted` (privileged-state expert) or an RL checkpoint (`runs/<run>/expert.pt` of diffusion_ppo.py or gaussian_ppo.py)"""
    num_demos: int = 50
    """successful demonstrations to keep"""
    max_attempts: Annotated[Optional[int], DEFAULT_IN_DOC] = None
    """episodes to try at most before giving up (default: 4 x num_demos + 10)"""
    seed: int = 0
    """base seed: episode i starts from `env.seed(seed * 1_000_003 + i); env.reset()`"""
    num_workers: int = 0
    """rollout / rendering processes, each with its own env (0: one per CPU core)"""
    out_path: Annotated[Optional[str], DEFAULT_IN_DOC] = None
    """output file (default: data/<task>_<source>.hdf5, or <input>_replay.hdf5 with --replay)"""
    overwrite: bool = False
    """replace an existing --out-path (without it, an existing file is refused before any rollout)"""
    image_size: int = 128
    """side of the square agentview and eye-in-hand images"""
    images: bool = True
    """render the camera images; --no-images writes state-only demos, enough for the state-based RL warm start"""
    reflections: bool = True
    """render MuJoCo's mirror pass (the table's reflections); --no-reflections halves the cost of a software-rendered frame, the file records it, and train_vla.py and eval_libero.py render the same way"""
    video: int = 0
    """write upright MP4s of the first N kept demos next to the output file"""
    replay: Optional[str] = None
    """re-render an existing LIBERO-layout file (ours or LIBERO's own): replays `states`, drops demos that no longer succeed, fills obs/object_states"""
    report: List[str] = field(default_factory=list)
    """print the metrics of these HDF5 files side by side and save a comparison PNG (no collection)"""
    report_png: str = "demo_metrics.png"
    """where `--report` writes its plot"""
    expert_variety: float = 0.0
    """with the scripted expert: vary each demo's motion (speed, approach and carrying heights, a sideways bend of the carry) by this scale; 1 = gain x0.6-1.4, heights +-2-4 cm, bend std 4 cm; 0 = one motion for a placement (the same seed gives the same demo either way)"""
    quiet: bool = False
    """print only the summary, not one line per episode"""
    scripted_table: Optional[str] = None
    """write no demos: roll the scripted expert out from --num-demos fresh placements of each of --table-tasks and merge its success and episode lengths per task into this JSON (a task already in it is skipped unless --overwrite, so an interrupted run goes on where it stopped)"""
    table_tasks: List[str] = field(default_factory=lambda: list(STEP_LIMITS))
    """tasks (libero_goal_3) and/or whole suites (libero_90) for --scripted-table"""


STEP_LIMITS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
"""suite -> step limit (the protocol of OpenVLA and openpi, after the settle steps)"""
NUM_SETTLE_STEPS = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
CAMERAS = {"agentview_rgb": "agentview_image", "eye_in_hand_rgb": "robot0_eye_in_hand_image"}


class UserError(Exception):
    """A mistake the user can fix; main prints its message as one sentence and exits 2."""


# --- begin copied block: task names ---
SUITE_SIZES = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}


def expand_tasks(names):
    """Suites and task names -> task names, or a UserError naming the valid ones."""
    out = []
    for name in names:
        if name in SUITE_SIZES:
            out += [f"{name}_{i}" for i in range(SUITE_SIZES[name])]
            continue
        suite, _, index = name.rpartition("_")
        if suite not in SUITE_SIZES or not index.isdigit() or int(index) >= SUITE_SIZES[suite]:
            raise UserError(f"unknown task '{name}': use a suite (libero_spatial, libero_object, libero_goal, libero_10, "
                            "libero_90) or <suite>_<index> with index 0-9 (0-89 for libero_90)")
        out.append(name)
    return list(dict.fromkeys(out))
# --- end copied block: task names ---


def resolve_task(name):
    """`libero_spatial_0` -> dict with the suite, BDDL path, instruction, step limit and eval init states."""
    from libero.libero import benchmark, get_libero_path

    if name in SUITE_SIZES or expand_tasks([name]) != [name]:
        raise UserError(f"unknown task '{name}': give one task, <suite>_<index> (e.g. libero_spatial_0)")
    suite_name, _, index = name.rpartition("_")
    with contextlib.redirect_stdout(None):  # the benchmark prints a line about task order
        suite = benchmark.get_benchmark_dict()[suite_name]()
    task = suite.get_task(int(index))
    return dict(
        name=name,
        suite=suite_name,
        index=int(index),
        bddl=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
        language=task.language,
        max_steps=STEP_LIMITS[suite_name],
        init_states=suite.get_task_init_states(int(index)),
    )


def task_from_bddl_name(bddl_file_name):
    """Find the `<suite>_<index>` name of a LIBERO file from its `bddl_file_name` attribute."""
    task = benchmark_task(bddl_file_name)
    if task is None:
        raise UserError(f"no LIBERO task has the BDDL file '{bddl_file_name}'")
    return task[0]


# --- begin copied block: benchmark task of a BDDL file ---
def benchmark_task(bddl_file_name):
    """(`<suite>_<index>`, task.language) of the LIBERO benchmark task whose BDDL file a demos file
    names, or None. task.language is what LIBERO, OpenVLA and openpi evaluations prompt with; the
    BDDL's own :language (problem_info) words 29 of the 130 tasks differently."""
    from libero.libero import benchmark

    folder, stem = os.path.basename(os.path.dirname(bddl_file_name)), os.path.basename(bddl_file_name)
    for suite_name in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"):
        if folder and folder != suite_name:
            continue
        with contextlib.redirect_stdout(None):  # the benchmark prints a line about task order
            suite = benchmark.get_benchmark_dict()[suite_name]()
        for i in range(suite.n_tasks):
            if suite.get_task(i).bddl_file == stem:
                return f"{suite_name}_{i}", suite.get_task(i).language
    return None
# --- end copied block: benchmark task of a BDDL file ---


def env_overrides(image_size=None):
    """What make_env changes from LIBERO's ControlEnv defaults; with no image_size, no renderer at all."""
    render = image_size is not None
    size = image_size or 128
    # horizon above every step limit: robosuite raises when stepped past its own horizon
    return dict(use_camera_obs=render, has_offscreen_renderer=render, horizon=2000, camera_heights=size, camera_widths=size)


def make_env(bddl, image_size=None):
    """A LIBERO env; with no image_size it has no renderer at all (state-only, far faster)."""
    from libero.libero.envs.env_wrapper import ControlEnv

    return ControlEnv(bddl_file_name=bddl, **env_overrides(image_size))


def libero_env_kwargs(bddl_file_name, image_size=None):
    """The keyword arguments make_env's ControlEnv hands LIBERO's env class, spelt out as LIBERO's
    create_dataset.py stores them in env_args (the controller as its robosuite config dict), so that
    TASK_MAPPING[problem_name](**env_kwargs) builds the same env from the file alone."""
    import inspect

    import robosuite
    from libero.libero.envs.env_wrapper import ControlEnv

    params = inspect.signature(ControlEnv.__init__).parameters
    kwargs = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    kwargs.update(env_overrides(image_size))
    kwargs["controller_configs"] = robosuite.load_controller_config(default_controller=kwargs.pop("controller"))
    return dict(bddl_file_name=bddl_file_name, **kwargs)


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


def set_reflections(env, on):
    """Turn the mirror pass of the env's offscreen renderer on (LIBERO's look) or off (half the cost in software)."""
    import mujoco

    env.env.sim._render_context_offscreen.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = int(on)


# ---------------------------------------------------------------------------------------
# POLICIES: the scripted expert, or an RL checkpoint rebuilt from its dict alone
# ---------------------------------------------------------------------------------------
POLICY_SCRIPTS = {"diffusion_ppo": ("diffusion_ppo", "DiffusionPolicy"), "gaussian_ppo": ("gaussian_ppo", "GaussianPolicy")}
"""checkpoint kind -> (script, policy class with `from_checkpoint(dict)` and `act(obs (B, Do)) -> (B, Te, 7)`)"""


def load_policy(spec):
    """`scripted` -> None (an expert is built per episode); a path -> (checkpoint dict, policy)."""
    if spec == "scripted":
        return None
    import importlib

    import torch

    ckpt, kind = load_checkpoint(spec, POLICY_SCRIPTS, "--policy takes 'scripted' or a checkpoint of kind " + " or ".join(POLICY_SCRIPTS))
    module, cls = POLICY_SCRIPTS[kind]
    try:  # the policy class lives in the script that trained it (as CleanRL's evals import theirs)
        policy_cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise UserError(f"rolling out a '{kind}' checkpoint needs {module}.py beside collect_demos.py")
    torch.set_num_threads(1)  # one core per rollout worker
    try:
        return ckpt, policy_cls.from_checkpoint(ckpt, device="cpu")
    except Exception as e:
        raise UserError(f"'{spec}' cannot be rebuilt as a {kind} policy ({type(e).__name__}: {e}): pass one written by {module}.py")


# --- begin copied block: checkpoint of a known kind ---
def load_checkpoint(path, kinds, use):
    """(checkpoint dict, kind) of a file torch.load reads with weights_only=True whose `kind` is one of
    `kinds`, or a UserError saying so; `use` says what the script takes, for the message."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist ({use})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"'{path}' is not a checkpoint torch.load can read with weights_only=True")
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in kinds:
        raise UserError(f"'{path}' is a checkpoint of kind '{kind}' ({use})")
    return ckpt, kind
# --- end copied block: checkpoint of a known kind ---


def chunk_actor(ckpt, policy):
    """Per-step actions from a chunked policy: plan a chunk of act_exec actions, execute it, replan."""
    queue = []

    def act(obs):
        if not queue:
            state = np.concatenate([obs[k] for k in ckpt["obs_keys"]]).astype(np.float32)
            queue.extend(np.asarray(policy.act(state[None]))[0])
        return np.clip(queue.pop(0), -1, 1)

    return act


def record_step(buf, env, obs):
    """Append the pre-action state and the LIBERO low-dim observations of this step."""
    eef_pos, eef_quat, grip = obs["robot0_eef_pos"], obs["robot0_eef_quat"], obs["robot0_gripper_qpos"]
    buf["states"].append(env.get_sim_state())
    buf["robot_states"].append(np.concatenate([grip, eef_pos, eef_quat]))
    buf["gripper_states"].append(grip)
    buf["joint_states"].append(obs["robot0_joint_pos"])
    buf["ee_pos"].append(eef_pos)
    buf["ee_ori"].append(T.quat2axisangle(np.array(eef_quat)))  # a copy: it clips w in place
    buf["object_states"].append(obs["object-state"])


_WORKER = {}


def _rollout_init(task_name, policy_spec, expert_variety=0.0):
    import warnings

    warnings.filterwarnings("ignore")
    task = resolve_task(task_name)
    _WORKER.update(task=task, env=make_env(task["bddl"]), policy=load_policy(policy_spec),
                   expert_variety=expert_variety)


def rollout_episode(seed):
    """One episode from the fresh placement of `seed`; returns its arrays and whether it succeeded."""
    env, task = _WORKER["env"], _WORKER["task"]
    t0 = time.time()
    obs = fresh_placement(env, seed)
    model_file = env.env.sim.model.get_xml()  # this placement's MuJoCo model, as LIBERO's files keep it
    for _ in range(NUM_SETTLE_STEPS):  # let objects settle; not recorded (LIBERO protocol)
        obs, _, _, _ = env.step(SETTLE_ACTION)
    policy = _WORKER["policy"]
    variety = _WORKER["expert_variety"]
    act = ScriptedExpert(env, variety, np.random.default_rng([seed, 1])).act if policy is None else chunk_actor(*policy)
    buf = {k: [] for k in ("states", "robot_states", "gripper_states", "joint_states", "ee_pos", "ee_ori", "object_states", "actions")}
    success = False
    for _ in range(task["max_steps"]):
        action = act(obs)
        record_step(buf, env, obs)
        buf["actions"].append(action)
        obs, reward, done, _ = env.step(action)
        if reward > 0 or done:
            success = reward > 0
            break
    ep = {k: np.asarray(v) for k, v in buf.items()}
    ep.update(seed=seed, success=success, model_file=model_file, seconds=time.time() - t0)
    return ep


def _render_init(task_name, image_size, reflections):
    task = resolve_task(task_name)
    _WORKER.update(render_env=make_env(task["bddl"], image_size=image_size), reflections=reflections)


# ---------------------------------------------------------------------------------------
# METRICS (DESIGN.md): smoothness per demo, summarised per file
# ---------------------------------------------------------------------------------------
def demo_metrics(actions, ee_pos, control_freq=20.0):
    a = np.asarray(actions, dtype=np.float64)[:, :6]
    p = np.asarray(ee_pos, dtype=np.float64)
    d2 = np.diff(a, n=2, axis=0)
    d3 = np.diff(p, n=3, axis=0) * control_freq**3
    return dict(
        action_jerk=float((d2**2).sum(1).mean()) if len(d2) else 0.0,
        ee_jerk=float((d3**2).sum(1).mean()) if len(d3) else 0.0,
        action_tv=float(np.linalg.norm(np.diff(a, axis=0), axis=1).mean()) if len(a) > 1 else 0.0,
        path_length=float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()),
        episode_length=float(len(a)),
    )


def summarize_metrics(per_demo, attempts):
    out = {"num_demos": len(per_demo), "attempts": int(attempts),
           "success_rate": len(per_demo) / attempts if attempts else float("nan")}
    for k in ("action_jerk", "ee_jerk", "action_tv", "path_length", "episode_length"):
        v = np.array([m[k] for m in per_demo], dtype=np.float64)
        out[k] = {"mean": float(v.mean()), "std": float(v.std())} if len(v) else {"mean": float("nan"), "std": float("nan")}
    return out


# ---------------------------------------------------------------------------------------
# HDF5 I/O in the LIBERO / robomimic layout, written atomically
# ---------------------------------------------------------------------------------------
REQUIRED_DEMO_KEYS = ("actions", "states", "obs/ee_pos")


_interrupted = False


def _on_sigint(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_h5(path):
    """Write to `<path>.tmp-<pid>`, rename onto `path` only if the block completes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    f = h5py.File(tmp, "w")
    try:
        yield f
        f.close()
        if _interrupted:  # a Ctrl-C that Python swallowed (one landing in a destructor) still stops the rename
            raise KeyboardInterrupt
        os.replace(tmp, path)
    except BaseException:
        f.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_header(f, task, source, generator, image_size, reflections):
    """The `data` group attributes as LIBERO's create_dataset.py writes them (its tools and
    robomimic rebuild the env from env_args alone), then ours."""
    from libero.libero.envs import TASK_MAPPING
    from libero.libero.envs.bddl_utils import get_problem_info

    info = get_problem_info(task["bddl"])  # language_instruction: the BDDL's :language, as LIBERO writes it
    env_name = TASK_MAPPING[info["problem_name"]].__name__  # the env class, e.g. Libero_Tabletop_Manipulation
    bddl_name = "libero/libero/bddl_files/" + "/".join(task["bddl"].split(os.sep)[-2:])  # as LIBERO's files store it
    data = f.require_group("data")
    data.attrs["env_name"] = env_name
    data.attrs["problem_info"] = json.dumps(info)
    data.attrs["bddl_file_name"] = bddl_name
    data.attrs["bddl_file_content"] = open(task["bddl"]).read()
    data.attrs["env_args"] = json.dumps({"type": 1, "env_name": env_name, "problem_name": info["problem_name"],
                                         "bddl_file": bddl_name, "env_kwargs": libero_env_kwargs(bddl_name, image_size)})
    data.attrs["macros_image_convention"] = "opengl"
    # ours: obs[t] is the observation actions[t] was taken from (LIBERO's files hold the one after it)
    data.attrs["obs_alignment"] = "before_action"
    data.attrs["render_reflections"] = reflections  # LIBERO's own files are rendered with them
    data.attrs["task"] = task["name"]
    data.attrs["language"] = task["language"]  # the benchmark's instruction, what evaluations prompt with
    data.attrs["source"] = source
    data.attrs["generator"] = json.dumps(generator)
    return data


def write_demo(data, i, ep, images=None):
    g = data.create_group(f"demo_{i}")
    T = len(ep["actions"])
    g.attrs["num_samples"] = T
    g.attrs["init_state"] = ep["states"][0]  # as in LIBERO's files: the first recorded state, after settling
    if ep.get("model_file"):
        g.attrs["model_file"] = ep["model_file"]
    g.attrs["seed"] = int(ep.get("seed", -1))
    g.create_dataset("actions", data=np.asarray(ep["actions"], dtype=np.float64))
    g.create_dataset("states", data=np.asarray(ep["states"], dtype=np.float64))
    g.create_dataset("robot_states", data=np.asarray(ep["robot_states"], dtype=np.float64))
    rewards = np.zeros(T, dtype=np.uint8)
    rewards[-1] = 1  # only successes are written
    g.create_dataset("rewards", data=rewards)
    g.create_dataset("dones", data=rewards.copy())
    o = g.create_group("obs")
    o.create_dataset("gripper_states", data=np.asarray(ep["gripper_states"], dtype=np.float64))
    o.create_dataset("joint_states", data=np.asarray(ep["joint_states"], dtype=np.float64))
    o.create_dataset("ee_pos", data=np.asarray(ep["ee_pos"], dtype=np.float64))
    o.create_dataset("ee_ori", data=np.asarray(ep["ee_ori"], dtype=np.float64))
    o.create_dataset("ee_states", data=np.concatenate([ep["ee_pos"], ep["ee_ori"]], 1).astype(np.float64))
    o.create_dataset("object_states", data=np.asarray(ep["object_states"], dtype=np.float64))
    if images is not None:
        for key in CAMERAS:
            o.create_dataset(key, data=images[key], compression="gzip", compression_opts=4, chunks=(1, *images[key].shape[1:]))


def open_demos(path):
    """Open a LIBERO-layout file for reading, or raise a UserError naming what is wrong."""
    if not os.path.isfile(path):
        raise UserError(f"demos file '{path}' does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"'{path}' is not an HDF5 file")
    if "data" not in f:
        raise UserError(f"'{path}' is not in LIBERO layout: it has no 'data' group")
    demos = sorted((k for k in f["data"] if k[:5] == "demo_" and k[5:].isdigit()), key=lambda k: int(k[5:]))
    if not demos:
        raise UserError(f"'{path}' is not in LIBERO layout: 'data' holds no demo_<i> group")
    for key in REQUIRED_DEMO_KEYS:
        if key not in f["data"][demos[0]]:
            raise UserError(f"'{path}' is not in LIBERO layout: data/{demos[0]} has no '{key}'")
    for key in ("bddl_file_name", "problem_info"):
        if key not in f["data"].attrs:
            raise UserError(f"'{path}' is not in LIBERO layout: data has no attribute '{key}'")
    return f, demos


def write_videos(path, task_name, demo_images, fps=20):
    """Upright MP4s (the renderer's images are upside down): agentview | eye-in-hand."""
    import imageio

    base = os.path.splitext(path)[0]
    for i, images in demo_images:
        frames = np.concatenate([images["agentview_rgb"], images["eye_in_hand_rgb"]], axis=2)[:, ::-1, ::-1]
        name = f"{base}_{task_name}_demo{i}.mp4"
        imageio.mimsave(name, list(frames), fps=fps, macro_block_size=1)
        print(f"wrote {name}")


def report(paths, png_path):
    """Table of the DESIGN metrics for several files (ours or LIBERO's) and a bar-chart PNG."""
    rows = []
    for path in paths:
        f, demos = open_demos(path)
        with f:
            data = f["data"]
            stored = json.loads(data.attrs["metrics"]) if "metrics" in data.attrs else {}
            per_demo = [demo_metrics(data[d]["actions"][()], data[d]["obs/ee_pos"][()]) for d in demos]
            summary = summarize_metrics(per_demo, stored.get("attempts", len(demos)))
            source = data.attrs.get("source", "human")
        rows.append((os.path.basename(path), str(source), summary))
    cols = ["action_jerk", "ee_jerk", "action_tv", "path_length", "episode_length"]
    head = f"{'file':34s} {'source':14s} {'demos':>5s} {'gen.succ':>8s} " + " ".join(f"{c:>18s}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, source, s in rows:
        cells = " ".join(f"{s[c]['mean']:>9.4g} ±{s[c]['std']:<7.3g}" for c in cols)
        print(f"{name[:34]:34s} {source[:14]:14s} {s['num_demos']:>5d} {s['success_rate']:>8.1%} {cells}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2))
    for ax, c in zip(axes, cols):
        ax.bar(range(len(rows)), [r[2][c]["mean"] for r in rows], yerr=[r[2][c]["std"] for r in rows], capsize=3,
               color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)), [f"{r[1]}\n{r[0][:18]}" for r in rows], fontsize=6)
        ax.set_title(c, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def check_out_path(path, overwrite):
    """Before any rollout: an existing file is refused without --overwrite, and the directory must take a new file."""
    if os.path.isdir(path):
        raise UserError(f"--out-path '{path}' is a directory: pass a file name")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"'{path}' exists: pass --overwrite to replace it, or another --out-path")
    out_dir = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output directory '{out_dir}': {e.strerror}")
    try:
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise UserError(f"the output directory '{out_dir}' does not take new files ({e.strerror}): pass another --out-path")


def make_pool(n, init, initargs):
    # spawn, not fork: each worker builds its own MuJoCo/EGL context (they do not survive fork)
    return mp.get_context("spawn").Pool(n, initializer=init, initargs=initargs)


def write_demos_file(args, out_path, task, source, generator, episodes, attempts, num_workers):
    """The one write path of collection and --replay: header, then the episodes in order as demo_<i>
    (with the images a replay already rendered, rendered now from the saved states, or state-only
    with --no-images), then totals and metrics, atomically; the MP4s of the first --video demos."""
    metrics = summarize_metrics([demo_metrics(ep["actions"], ep["ee_pos"]) for ep in episodes], attempts)
    render_now = args.images and not all(k in episodes[0] for k in CAMERAS)
    videos, t0, n_frames = [], time.time(), 0
    renderers = make_pool(num_workers, _render_init, (task["name"], args.image_size, args.reflections)) if render_now else None
    with renderers or contextlib.nullcontext(), atomic_h5(out_path) as f:
        data = write_header(f, task, source, generator, args.image_size if args.images else None, args.reflections)
        if render_now:  # kept steps only, in parallel workers, in order
            rendered = renderers.imap(replay_episode, [(ep["states"], ep["actions"]) for ep in episodes])
        for i, ep in enumerate(episodes):
            images = {k: ep.pop(k) for k in CAMERAS if k in ep} or None
            if render_now:
                out = next(rendered)
                images = {k: out[k] for k in CAMERAS}
                n_frames += len(ep["states"]) * len(CAMERAS)
                if not args.quiet:
                    print(f"rendered demo {i + 1}/{len(episodes)}: {len(ep['states'])} steps, "
                          f"{(time.time() - t0) / n_frames:.3f} s/frame over {num_workers} workers", flush=True)
            write_demo(data, i, ep, images)
            if images and i < args.video:
                videos.append((i, images))
        data.attrs["num_demos"] = len(episodes)
        data.attrs["total"] = int(sum(len(ep["actions"]) for ep in episodes))
        data.attrs["metrics"] = json.dumps(metrics)
    print(f"wrote {out_path}: {len(episodes)} demos, {sum(len(ep['actions']) for ep in episodes)} steps, "
          f"episode length {metrics['episode_length']['mean']:.0f} ± {metrics['episode_length']['std']:.0f}")
    write_videos(out_path, task["name"], videos)


def collect(args, num_workers):
    policy = load_policy(args.policy)
    if policy is not None and args.task is None:
        args.task = policy[0].get("task")
    if args.task is None:
        raise UserError("give --task (e.g. --task libero_spatial_0), --replay FILE or --report FILES")
    task = resolve_task(args.task)
    if policy is not None and policy[0].get("task") != task["name"]:
        raise UserError(f"the checkpoint was trained on {policy[0].get('task')}, not on {task['name']}")
    if args.policy == "scripted":
        with contextlib.redirect_stdout(None):  # fail fast on goals the expert cannot do
            env = make_env(task["bddl"])
        try:
            ScriptedExpert(env)
        except UnsupportedGoal as e:
            raise UserError(f"{e}; task '{task['name']}' cannot be scripted")
        finally:
            env.close()
    source = "scripted" if policy is None else policy[0]["kind"]
    out_path = args.out_path or os.path.join("data", f"{task['name']}_{source}.hdf5")
    check_out_path(out_path, args.overwrite)
    max_attempts = args.max_attempts or 4 * args.num_demos + 10
    seeds = [args.seed * 1_000_003 + i for i in range(max_attempts)]

    # ROLLOUT: no renderer, parallel workers; keep the first num_demos successes in seed order
    t0, results, kept, done_prefix = time.time(), {}, [], 0
    env_steps, env_seconds = 0, 0.0
    with make_pool(num_workers, _rollout_init, (task["name"], args.policy, args.expert_variety)) as pool:
        for ep in pool.imap_unordered(rollout_episode, seeds):
            results[ep["seed"]] = ep
            env_steps += len(ep["actions"]) + NUM_SETTLE_STEPS
            env_seconds += ep["seconds"]
            while done_prefix < len(seeds) and seeds[done_prefix] in results and len(kept) < args.num_demos:
                e = results.pop(seeds[done_prefix])
                done_prefix += 1
                if e["success"]:
                    kept.append(e)
            if not args.quiet:
                print(f"seed {ep['seed']}: {'success' if ep['success'] else 'failure'} in {len(ep['actions'])} steps | "
                      f"kept {len(kept)}/{args.num_demos} of {done_prefix} tried | "
                      f"{env_steps / env_seconds:.0f} env steps/s per worker", flush=True)
            if len(kept) >= args.num_demos:
                pool.terminate()
                break
    attempts = done_prefix
    rollout_time = time.time() - t0
    print(f"generator success {len(kept)}/{attempts} = {len(kept) / max(attempts, 1):.1%} | rollout {rollout_time:.0f} s "
          f"with {num_workers} workers (env build included), {env_steps / env_seconds:.0f} env steps/s per worker")
    if not kept:
        raise UserError(f"no episode succeeded in {attempts} attempts, so no file was written")
    if len(kept) < args.num_demos:
        print(f"warning: only {len(kept)} of {args.num_demos} demos after {attempts} attempts (--max-attempts)")

    # RENDER kept steps only, then write atomically
    generator = {"policy": args.policy, "seed": args.seed, "expert_variety": args.expert_variety, "attempts": attempts,
                 "image_size": args.image_size if args.images else None}
    if policy is not None:
        ckpt = policy[0]
        generator.update(checkpoint=os.path.abspath(args.policy), kind=ckpt["kind"], iteration=int(ckpt["iteration"]),
                         env_steps=int(ckpt["env_steps"]), eval_success=float(ckpt["eval_success"]), args=ckpt["args"])
    write_demos_file(args, out_path, task, source, generator, kept, attempts, num_workers)
    return out_path


def replay(args, num_workers):
    """Re-render a LIBERO-layout file: restore `states`, drop demos that no longer succeed."""
    f, demos = open_demos(args.replay)
    with f:
        attrs = dict(f["data"].attrs)
        name = attrs.get("task") or task_from_bddl_name(str(attrs["bddl_file_name"]))
        task = resolve_task(str(name))
        episodes = []
        for d in demos:
            g = f["data"][d]
            ep = {k: g[k][()] for k in ("actions", "states")}
            if "model_file" in g.attrs:
                ep["model_file"] = g.attrs["model_file"]
            ep["seed"] = int(g.attrs.get("seed", -1))
            episodes.append(ep)
    out_path = args.out_path or os.path.splitext(args.replay)[0] + "_replay.hdf5"
    check_out_path(out_path, args.overwrite)
    size = args.image_size if args.images else None
    # replay in a renderer-free env when no images are wanted: still restores every state
    init = _render_init if size else _rollout_init
    initargs = (task["name"], size, args.reflections) if size else (task["name"], "scripted")
    t0 = time.time()
    with make_pool(num_workers, init, initargs) as pool:
        outs = pool.map(replay_episode, [(ep["states"], ep["actions"]) for ep in episodes])
    kept = []
    for ep, out in zip(episodes, outs):
        if out.pop("success"):
            model_file = out.pop("model_file")
            ep.update(out)
            ep.setdefault("model_file", model_file)
            kept.append(ep)
    print(f"replayed {len(episodes)} demos in {time.time() - t0:.0f} s: {len(kept)} still succeed")
    if not kept:
        raise UserError(f"no demo of '{args.replay}' succeeds on replay, so no file was written")
    source = str(attrs.get("source", "human"))
    generator = json.loads(attrs["generator"]) if "generator" in attrs else {"replayed_from": os.path.abspath(args.replay)}
    write_demos_file(args, out_path, task, source, generator, kept, len(episodes), num_workers)


def replay_episode(states_actions):
    """Low-dim observations (and images, in a rendering worker) of each saved state; success is
    checked by restoring the last state and taking the last action, which ended the episode."""
    states, actions = states_actions
    env = _WORKER.get("render_env") or _WORKER["env"]
    buf = {k: [] for k in ("robot_states", "gripper_states", "joint_states", "ee_pos", "ee_ori", "object_states", "states")}
    frames = {k: [] for k in CAMERAS}
    if "render_env" in _WORKER:
        set_reflections(env, _WORKER["reflections"])
    for s in states:
        obs = env.regenerate_obs_from_state(s)
        record_step(buf, env, obs)
        if "render_env" in _WORKER:
            for key, cam in CAMERAS.items():
                frames[key].append(obs[cam])
    out = {k: np.asarray(v) for k, v in buf.items() if k != "states"}
    if "render_env" in _WORKER:
        out.update({k: np.asarray(v, dtype=np.uint8) for k, v in frames.items()})
    env.regenerate_obs_from_state(states[-1])
    restore_controller_state(env, actions[:-1])
    env.step(actions[-1])
    out["success"] = bool(env.check_success())
    out["model_file"] = env.env.sim.model.get_xml()  # for a file that had none: a model these states restore into
    return out


def restore_controller_state(env, past_actions):
    """Make stepping from a restored MuJoCo state match the original rollout: robosuite's arm
    controller caches the robot state it last read (refreshed only after it has run once), and its
    gripper integrates the command (+-0.01 per physics substep, clipped to [-1, 1]); neither is in
    the snapshot. Force the refresh and rebuild the gripper command from the actions taken so far."""
    raw = env.env
    robot = raw.robots[0]
    robot.controller.new_update = True
    substeps = int(round(raw.control_timestep / raw.model_timestep))
    command = np.zeros(2)
    for a in np.sign(np.asarray(past_actions)[:, -1]):
        command = np.clip(command + np.array([-1.0, 1.0]) * robot.gripper.speed * a * substeps, -1.0, 1.0)
    robot.gripper.current_action = command


def _table_episode(task_seed):
    """One scripted episode of (task, seed) for --scripted-table; a worker rebuilds its env when the task changes."""
    name, seed = task_seed
    if _WORKER.get("task", {}).get("name") != name:
        if "env" in _WORKER:
            _WORKER["env"].close()
        _rollout_init(name, "scripted")
    try:
        ep = rollout_episode(seed)
    except UnsupportedGoal as e:
        return dict(task=name, seed=seed, success=False, steps=0, error=str(e))
    return dict(task=name, seed=seed, success=bool(ep["success"]), steps=len(ep["actions"]), seconds=ep["seconds"])


def scripted_table(args, num_workers):
    """Success rate and episode lengths of the scripted expert per task, merged into a JSON file
    ({"tasks": {task: {...}}}) as each task finishes."""
    names = expand_tasks(args.table_tasks)
    path = args.scripted_table
    if os.path.isfile(path):
        try:
            with open(path) as f:
                table = json.load(f)
        except ValueError:
            table = None
        if not isinstance(table, dict) or not isinstance(table.get("tasks"), dict):
            raise UserError(f"--scripted-table '{path}' exists but is not a JSON object with a 'tasks' object")
    else:
        check_out_path(path, False)
        table = {"tasks": {}}
    todo = [n for n in names if args.overwrite or n not in table["tasks"]]
    print(f"{len(names) - len(todo)} of {len(names)} tasks already in {path}; {len(todo)} to roll out, "
          f"{args.num_demos} placements each, {num_workers} workers", flush=True)
    table["command"] = "python collect_demos.py " + " ".join(sys.argv[1:])
    table["placements"] = f"seeds {args.seed} * 1000003 + 0..{args.num_demos - 1}: fresh placements, never the evaluation init states"
    jobs = [(n, args.seed * 1_000_003 + i) for n in todo for i in range(args.num_demos)]
    pending, t0 = {n: [] for n in todo}, time.time()
    with make_pool(num_workers, None, ()) as pool:
        for ep in pool.imap(_table_episode, jobs):
            pending[ep["task"]].append(ep)
            if len(pending[ep["task"]]) < args.num_demos:
                continue
            eps = pending.pop(ep["task"])
            wins = [e for e in eps if e["success"]]
            row = dict(success=len(wins) / len(eps), successes=len(wins), episodes=len(eps),
                       mean_steps=float(np.mean([e["steps"] for e in wins])) if wins else None,
                       max_steps=max(e["steps"] for e in wins) if wins else None,
                       step_limit=STEP_LIMITS[ep["task"].rpartition("_")[0]], command=table["command"])
            if any("error" in e for e in eps):
                row["error"] = eps[0].get("error")
            table["tasks"][ep["task"]] = row
            table["tasks"] = dict(sorted(table["tasks"].items(), key=lambda kv: (list(STEP_LIMITS).index(kv[0].rpartition("_")[0]), int(kv[0].rpartition("_")[2]))))
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(table, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)  # the file is whole after every task
            steps = f", {row['mean_steps']:.0f} steps (limit {row['step_limit']})" if wins else ""
            print(f"{ep['task']}: {len(wins)}/{len(eps)}{steps} | {len(table['tasks'])} tasks in {path} | "
                  f"{(time.time() - t0) / 60:.1f} min", flush=True)
    return path


def main(args):
    num_workers = args.num_workers or os.cpu_count() or 1
    if args.report:
        return report(args.report, args.report_png)
    if args.num_demos < 1:
        raise UserError(f"--num-demos must be at least 1 (got {args.num_demos})")
    if args.scripted_table:
        return scripted_table(args, num_workers)
    if args.max_attempts is not None and args.max_attempts < 1:
        raise UserError(f"--max-attempts must be at least 1 (got {args.max_attempts})")
    for flag in ("num_workers", "seed", "video"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    if args.image_size < 8:
        raise UserError(f"--image-size must be at least 8 pixels (got {args.image_size})")
    if args.expert_variety < 0 or (args.expert_variety and args.policy != "scripted"):
        raise UserError(f"--expert-variety must be 0 or more and is for --policy scripted only (got {args.expert_variety})")
    if args.video and not args.images:
        raise UserError("--video needs images: drop --no-images")
    if args.replay:
        return replay(args, num_workers)
    return collect(args, num_workers)


if __name__ == "__main__":
    args = tyro.cli(Args)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no output file was written", file=sys.stderr)
        sys.exit(130)
