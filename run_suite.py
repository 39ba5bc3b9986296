"""Run the pipeline over many LIBERO tasks as Ray tasks: one command turns a task suite into a VLA dataset.

The orchestration stage of DESIGN.md ("Running on larger machines"). For every task of --tasks it
runs, each as its own Ray task, the same commands a person would type by hand:
  1. warmstart  collect_demos.py --policy scripted --expert-variety 1  varied state-only warm-start demos
  2. expert     diffusion_ppo.py | gaussian_ppo.py                     BC, then PPO (--source)
  3. demos      collect_demos.py --policy <expert.pt> (or scripted)    --num-demos kept demos with images
  4. report     collect_demos.py --report                             smoothness / consistency metrics
and with --vla, once every task is through: train_vla.py over all the tasks' demos, then
eval_libero.py on those tasks. --source scripted skips 1 and 2. This script only schedules, skips
finished stages, isolates failures and summarises; every stage's full output is in its log.
--compare reads finished suites, one per --source, into the paper's table (VLA success by data source).

    python run_suite.py --tasks libero_spatial_0 libero_spatial_1 --source scripted --num-demos 2 --image-size 32

Writes, under --out-dir:
  <task>/warmstart.hdf5            scripted state-only demos (RL sources)
  <task>/expert/<run>/             the expert's run folder: expert.pt, last.pt, summary.json, success.png
  <task>/<task>_<source>.hdf5      the task's demos in the "demos.hdf5" layout, with images
  <task>/metrics.png               collect_demos.py --report's plot of that file
  <task>/logs/<stage>.log          each stage's output; <task>/stages.json: finished stages, minutes, figures
  vla/                             with --vla: vla/runs/<run>/vla.pt, vla/eval.json, logs
  summary.json, summary.md, summary.png    the table printed at the end; expert success per task and curves
With --compare: --results-path (the table's JSON) and a .png beside it.

Resuming: run the same command again. Finished stages are skipped (stages.json, and their outputs
still on disk); an interrupted expert continues from its last.pt, an interrupted VLA from its vla.pt
(when it trained on the same demos), the evaluation from its results file; the rest restart.

Scheduling: each stage asks Ray for the CPUs it uses (--cpus-per-stage env workers, capped at the
largest node's CPUs) and, where the cluster has GPUs, for --expert-gpu-fraction of one (experts) or
one (the VLA), so Ray never runs more at once than the machines hold. `ray.init()` starts a local
instance; --ray-address auto | <host>:<port> joins a running cluster, whose nodes must see this
directory and --out-dir at the same paths (a shared filesystem).

Task names: <suite>_<index>, index 0-based in the suite's standard order (DESIGN.md "Tasks").
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # the stages inherit it

import ctypes
import glob
import json
import math
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, List, Optional

import h5py
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("scripted", "diffusion_ppo", "gaussian_ppo")
TASK_STAGES = {"scripted": ("demos", "report"), "diffusion_ppo": ("warmstart", "expert", "demos", "report"),
               "gaussian_ppo": ("warmstart", "expert", "demos", "report")}
LOG_TAIL_LINES = 12  # lines of a failed stage's log printed with its failure


DEFAULT_IN_DOC = tyro.conf.arg(help_behavior_hint="")  # the field's docstring says what None means


@dataclass
class Args:
    tasks: List[str] = field(default_factory=list)
    """tasks (libero_spatial_3) and/or whole suites (libero_spatial, libero_object, libero_goal, libero_10, libero_90)"""
    source: str = "diffusion_ppo"
    """where each task's demos come from: diffusion_ppo or gaussian_ppo (an RL expert per task, warm-started from scripted demos) or scripted"""
    out_dir: str = "suite"
    """everything goes under <out_dir>/ (see the module docstring); on a cluster, a filesystem every node shares"""
    num_demos: int = 50
    """successful demos with images kept per task (the VLA's data)"""
    warmstart_demos: int = 20
    """scripted state-only demos per task for the experts' behaviour cloning (diffusion_ppo.py's --num-demos default)"""
    warmstart_variety: float = 1.0
    """collect_demos.py --expert-variety of the warm-start demos (varied motions clone better: docs/EXPERIMENTS.md); the demos stage of --source scripted keeps the expert's default, one motion per placement"""
    image_size: int = 128
    """side of the rendered agentview and eye-in-hand images"""
    reflections: bool = True
    """render the table's reflections (LIBERO's look); --no-reflections halves a software-rendered frame's cost"""
    seed: int = 1
    """seed of the experts' training and of the demo placements (collect_demos.py --seed)"""
    vla: bool = False
    """after the tasks: train one VLA on all their demos (train_vla.py) and evaluate it on them (eval_libero.py)"""
    ray_address: Annotated[Optional[str], DEFAULT_IN_DOC] = None
    """join a running Ray cluster (auto, or <host>:<port> of its head); default: start a local instance"""
    cpus_per_stage: int = 4
    """env workers of each per-task stage (--num-envs / --num-workers) and the CPUs it asks Ray for (capped at the largest node's)"""
    expert_gpu_fraction: float = 0.25
    """share of a GPU each expert asks for when the cluster has GPUs (the expert's networks are small; its envs run on CPUs)"""
    warmstart_args: str = ""
    """extra flags for the warm-start collect_demos.py, one string given with = (--warmstart-args="--max-attempts 40")"""
    expert_args: str = ""
    """extra flags for diffusion_ppo.py / gaussian_ppo.py, one string given with = (--expert-args="--time-limit-min 30")"""
    collect_args: str = ""
    """extra flags for the demos stage's collect_demos.py, one string given with = (--collect-args="--max-attempts 80")"""
    vla_args: str = ""
    """extra flags for train_vla.py, one string given with = (--vla-args="--num-steps 6000")"""
    eval_args: str = ""
    """extra flags for eval_libero.py, one string given with = (--eval-args="--num-episodes 20")"""
    results_path: Optional[str] = None
    """merge each expert's figures, then its demos' kept/tried count and metrics, into this JSON as each stage finishes ({"tasks": {"<task>": {...}}}, e.g. docs/results/dppo_libero_spatial.json); with --compare, the table's JSON"""
    compare: List[str] = field(default_factory=list)
    """instead of running stages: the --out-dir of finished suites, one per --source, each run with --vla on the same tasks; writes the VLA-success-by-source table (with each source's expert success and data smoothness) to --results-path and a figure beside it"""


class UserError(Exception):
    """A mistake the user can fix; main prints it as one sentence."""


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


# --- begin copied block: wilson interval ---
def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval of a success rate, clamped to [0, 1] (rounding can put an end a hair outside)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))
# --- end copied block: wilson interval ---


def run_stage(cmd, log_path):
    """Run one stage's command with its output in log_path; returns (exit status, seconds). Runs in a
    Ray worker. The stage gets a process group of its own, which a cancelled task (Ctrl-C in the
    driver) takes down whole, env workers included; a killed Ray worker takes the stage with it."""
    libc = ctypes.CDLL(None, use_errno=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: libc.prctl(1, signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        try:
            return proc.wait(), time.time() - t0
        except BaseException:  # cancelled: stop the whole stage before the worker goes
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise


def read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    """Atomic: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def demos_figures(path):
    """Kept demos, attempts and metrics of a collect_demos.py file (its data.attrs)."""
    with h5py.File(path, "r") as f:
        metrics = json.loads(f["data"].attrs.get("metrics", "{}"))
        kept = int(f["data"].attrs["num_demos"])
    rate = metrics.get("success_rate")
    return dict(kept=kept, tried=round(kept / rate) if rate else None, metrics=metrics)


def unfinished_vla(runs_dir, demos_paths):
    """The newest vla.pt under runs_dir that stopped short of its --num-steps and trained on exactly
    these demos files (as its summary.json, written with each checkpoint, says), or None."""
    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "vla.pt")), key=os.path.getmtime, reverse=True):
        summary = read_json(os.path.join(os.path.dirname(path), "summary.json"), {})
        if (summary.get("demos_paths") == [os.path.abspath(p) for p in demos_paths]
                and summary.get("steps", 0) < summary.get("num_steps", 0)):
            return path
    return None


def expert_run_dir(task_dir):
    """The expert's run folder (the one with a last.pt), or None."""
    found = sorted(glob.glob(os.path.join(task_dir, "expert", "*", "last.pt")))
    return os.path.dirname(found[-1]) if found else None


def stage_command(args, task, stage, task_dir):
    """The command line of one per-task stage, as a person would type it. A stage runs only when it is not
    recorded as done, so a file at its output path is a cut-off run's: the collections pass --overwrite."""
    python, collect = sys.executable, os.path.join(HERE, "collect_demos.py")
    workers = str(args.cpus_per_stage)
    if stage == "warmstart":
        return [python, collect, "--task", task, "--policy", "scripted", "--num-demos", str(args.warmstart_demos),
                "--expert-variety", str(args.warmstart_variety), "--no-images", "--num-workers", workers, "--quiet",
                "--overwrite", "--out-path",
                os.path.join(task_dir, "warmstart.hdf5"), *shlex.split(args.warmstart_args)]
    if stage == "expert":
        cmd = [python, os.path.join(HERE, f"{args.source}.py"), "--task", task, "--demos-path",
               os.path.join(task_dir, "warmstart.hdf5"), "--num-demos", str(args.warmstart_demos), "--seed",
               str(args.seed), "--num-envs", workers, "--exp-name", "expert", "--out-dir",
               os.path.join(task_dir, "expert"), *shlex.split(args.expert_args)]
        run_dir = expert_run_dir(task_dir)
        return cmd + (["--resume", os.path.join(run_dir, "last.pt")] if run_dir else [])
    if stage == "demos":
        policy = "scripted" if args.source == "scripted" else os.path.join(expert_run_dir(task_dir), "expert.pt")
        return [python, collect, "--task", task, "--policy", policy, "--num-demos", str(args.num_demos),
                "--image-size", str(args.image_size), "--seed", str(args.seed), "--num-workers", workers, "--quiet",
                *([] if args.reflections else ["--no-reflections"]), "--overwrite", "--out-path", demos_path(args, task),
                *shlex.split(args.collect_args)]
    return [python, collect, "--report", demos_path(args, task), "--report-png", os.path.join(task_dir, "metrics.png")]


def demos_path(args, task):
    return os.path.join(args.out_dir, task, f"{task}_{args.source}.hdf5")


def stage_output_exists(args, task, stage, task_dir):
    """The finished stage's output is still on disk (stages.json alone is not trusted)."""
    if stage == "warmstart":
        return os.path.isfile(os.path.join(task_dir, "warmstart.hdf5"))
    if stage == "expert":
        run_dir = expert_run_dir(task_dir)
        return run_dir is not None and os.path.isfile(os.path.join(run_dir, "expert.pt"))
    if stage == "demos":
        return os.path.isfile(demos_path(args, task))
    return os.path.isfile(os.path.join(task_dir, "metrics.png"))


def headline(args, task, stage, task_dir):
    """The figures a finished stage is summed up by (for its progress line and the summary)."""
    if stage == "warmstart":
        d = demos_figures(os.path.join(task_dir, "warmstart.hdf5"))
        return dict(warmstart_demos=d["kept"], text=f"{d['kept']} scripted demos ({d['kept']}/{d['tried']} tried)")
    if stage == "expert":
        s = read_json(os.path.join(expert_run_dir(task_dir), "summary.json"))
        return dict(bc_success=s["bc_success"], expert_success=s["best_success"], expert_ci95=s["best_ci"],
                    final_success=s["final_success"], expert_env_steps=s["env_steps"],
                    expert_minutes_to_best=s["best_wall_time"] / 60, expert_env_steps_to_best=s["best_env_steps"],
                    expert_eval_history=[[h[0], h[1], round(h[2] / 60, 1), h[3]] for h in s["eval_history"]],
                    text=f"BC {s['bc_success']:.2f} -> best {s['best_success']:.2f}, final {s['final_success']:.2f}, "
                         f"{s['env_steps']} env steps")
    if stage == "demos":
        d = demos_figures(demos_path(args, task))
        return dict(demos_kept=d["kept"], demos_tried=d["tried"],
                    text=f"{d['kept']} demos kept of {d['tried']} tried")
    m = demos_figures(demos_path(args, task))["metrics"]
    keys = ("action_jerk", "ee_jerk", "path_length", "episode_length")
    figures = {k: m[k] for k in keys if k in m}
    return dict(metrics=figures, text=", ".join(f"{k} {v['mean']:.4g}" for k, v in figures.items()))


def add_expert_result(args, task, figures, minutes):
    """One task's expert figures, merged into --results-path (the results schema of DESIGN.md)."""
    results = read_json(args.results_path, {"tasks": {}})
    results["tasks"][task] = dict(
        bc_success=figures["bc_success"], best_success=figures["expert_success"],
        final_success=figures["final_success"], best_ci95=figures["expert_ci95"],
        minutes_to_best=round(figures["expert_minutes_to_best"], 1), env_steps_to_best=figures["expert_env_steps_to_best"],
        env_steps=figures["expert_env_steps"], minutes=round(minutes, 1), num_demos=args.warmstart_demos,
        eval_history_columns=["update", "env_steps", "minutes", "success"], eval_history=figures["expert_eval_history"],
        source=args.source, command=shlex.join(["python", "run_suite.py", *sys.argv[1:]]),
        stage_command=shlex.join(["python", f"{args.source}.py", *stage_command(args, task, "expert", "<task_dir>")[2:]]))
    os.makedirs(os.path.dirname(os.path.abspath(args.results_path)), exist_ok=True)
    write_json(args.results_path, results)


def add_demos_result(args, task, stage, figures, minutes):
    """The demos stage's kept/tried count (the expert's success from fresh placements) and the
    report's smoothness metrics, merged into the task's entry of --results-path."""
    results = read_json(args.results_path, {"tasks": {}})
    entry = results["tasks"].setdefault(task, {})
    if stage == "demos":
        entry.update(demos_kept=figures["demos_kept"], demos_tried=figures["demos_tried"],
                     demos_minutes=round(minutes, 1), demos_image_size=args.image_size)
    else:
        entry["demos_metrics"] = figures["metrics"]
    os.makedirs(os.path.dirname(os.path.abspath(args.results_path)), exist_ok=True)
    write_json(args.results_path, results)


def log_tail(path):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-LOG_TAIL_LINES:])


def check_ray_address(address):
    """One sentence, before any work, when a <host>:<port> cannot be reached."""
    if address in (None, "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address '{address}' is not auto or <host>:<port> (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach a Ray head at --ray-address {address} ({e.strerror or e}): start one with "
                        "`ray start --head` there, or leave --ray-address out for a local instance")


def plot_summary(rows, path):
    """Expert success per task (best evaluation, Wilson interval) with the BC start, and each
    expert's evaluations against env steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(t, r) for t, r in rows.items() if r.get("expert_success") is not None]
    if not rows:
        return False
    fig, (ax, ax_curves) = plt.subplots(1, 2, figsize=(max(4, 0.6 * len(rows) + 2) + 5, 3.2),
                                        gridspec_kw=dict(width_ratios=[max(4, 0.6 * len(rows) + 2), 5]))
    x = range(len(rows))
    best = [r["expert_success"] for _, r in rows]
    ci = [r.get("expert_ci95") or [b, b] for (_, r), b in zip(rows, best)]
    ax.bar(x, best, color="tab:blue", alpha=0.7, label="expert (best eval)")
    ax.errorbar(x, best, yerr=[[b - c[0] for b, c in zip(best, ci)], [c[1] - b for b, c in zip(best, ci)]],
                fmt="none", ecolor="k", capsize=3)
    ax.plot(x, [r["bc_success"] for _, r in rows], "o", color="tab:orange", label="BC start")
    ax.set_xticks(list(x), [t.replace("libero_", "") for t, _ in rows], rotation=45, ha="right")
    ax.set_ylim(0, 1.02), ax.set_ylabel("success on the 50 init states"), ax.legend(fontsize=8), ax.grid(alpha=0.3)
    for task, r in rows:  # [update, env steps, minutes, success] per evaluation
        history = r.get("expert_eval_history") or []
        if history:
            ax_curves.plot([h[1] / 1000 for h in history], [h[3] for h in history], "o-", ms=3,
                           label=task.replace("libero_", ""))
    ax_curves.set_xlabel("env steps (thousands)"), ax_curves.set_ylim(0, 1.02), ax_curves.grid(alpha=0.3)
    ax_curves.set_title("deterministic evaluations", fontsize=9)
    if any(r.get("expert_eval_history") for _, r in rows):
        ax_curves.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary_markdown(summary):
    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    lines = ["| task | status | BC | expert [95% CI] | demos kept / tried | minutes per stage |", "|---|---|---|---|---|---|"]
    for task, r in summary["tasks"].items():
        ci = r.get("expert_ci95")
        expert = fmt(r.get("expert_success")) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        demos = f"{fmt(r.get('demos_kept'), 'd')} / {fmt(r.get('demos_tried'), 'd')}"
        minutes = ", ".join(f"{s} {m:.1f}" for s, m in r["minutes"].items())
        lines.append(f"| {task} | {r['status']} | {fmt(r.get('bc_success'))} | {expert} | {demos} | {minutes} |")
    if summary.get("vla"):
        v = summary["vla"]
        lines.append(f"\nVLA ({v['status']}): average success {fmt(v.get('average_success'))} on {len(v['tasks'])} tasks")
    return "\n".join(lines) + "\n"


def write_summary(args, state, vla):
    """summary.json, summary.md and summary.png in --out-dir, as things stand (rewritten after every stage)."""
    summary = dict(source=args.source, out_dir=args.out_dir, command=shlex.join(["python", "run_suite.py", *sys.argv[1:]]),
                   tasks=state, vla=vla)
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    table = summary_markdown(summary)
    with open(os.path.join(args.out_dir, "summary.md.tmp"), "w") as f:
        f.write(table)
    os.replace(os.path.join(args.out_dir, "summary.md.tmp"), os.path.join(args.out_dir, "summary.md"))
    return table, plot_summary(state, os.path.join(args.out_dir, "summary.png"))


# ---------------------------------------------------------------------------------------
# COMPARE: the VLA's success by data source, from finished suites (the paper's table)
# ---------------------------------------------------------------------------------------
SMOOTHNESS = ("action_jerk", "ee_jerk", "path_length", "episode_length")
PROTOCOL = ("num_demos", "image_size", "reflections", "seed", "vla_args", "eval_args")  # one for every source


def compare_suites(dirs):
    """One row per source: the VLA's success pooled over its evaluation episodes (Wilson interval) and per
    task, the experts' success, and the data's smoothness (per-task mean and spread across demos, averaged
    over tasks). The suites must share their tasks, demos per task, images, VLA recipe and evaluation (the
    experts' budgets, in --expert-args, are the caller's to match: each row keeps its suite's command)."""
    table, first = dict(tasks=None, demos_per_task=None, sources={}), None
    for d in dirs:
        summary = read_json(os.path.join(d, "summary.json"))
        if summary is None:
            raise UserError(f"'{d}' has no summary.json: pass the --out-dir of a run_suite.py run")
        source, vla = summary["source"], summary.get("vla") or {}
        evaluation = read_json(os.path.join(d, "vla", "eval.json"))
        if source in table["sources"]:
            raise UserError(f"'{d}' and another suite are both --source {source}: compare one suite per source")
        if vla.get("status") != "done" or evaluation is None:
            raise UserError(f"'{d}' has no evaluated VLA: run its command again with --vla")
        tasks, rows = vla["tasks"], summary["tasks"]
        try:
            run_args = tyro.cli(Args, args=shlex.split(summary["command"])[2:])  # the flags the suite ran with
        except SystemExit:
            raise UserError(f"'{d}' was run with flags this run_suite.py does not read ({summary['command']})") from None
        per_task = {t: evaluation["tasks"][t] for t in tasks}
        episodes_per_task = {t: r["episodes"] for t, r in per_task.items()}
        if first is None:
            first, first_args, first_episodes = d, run_args, episodes_per_task
            table.update(tasks=tasks, demos_per_task=rows[tasks[0]]["demos_kept"])
        if tasks != table["tasks"]:
            raise UserError(f"'{d}' covers {' '.join(tasks)} where '{first}' covers {' '.join(table['tasks'])}: "
                            "compare suites of the same tasks")
        for flag in PROTOCOL:
            if getattr(run_args, flag) != getattr(first_args, flag):
                raise UserError(f"'{d}' ran with --{flag.replace('_', '-')} {getattr(run_args, flag)!r} where '{first}' ran "
                                f"with {getattr(first_args, flag)!r}: compare suites run with one protocol")
        short = [t for t in tasks if rows[t]["demos_kept"] != table["demos_per_task"]]
        if short or episodes_per_task != first_episodes:
            raise UserError(f"'{d}' has {'other demo counts' if short else 'other evaluation episode counts'} than '{first}' "
                            f"({' '.join(short or tasks)}): every source needs the same demos and evaluation episodes per task")
        successes, episodes = sum(r["successes"] for r in per_task.values()), sum(episodes_per_task.values())
        vla_state = read_json(os.path.join(d, "vla", "stages.json"), {})
        vla_train, vla_eval = vla_state.get("train_minutes", 0), vla_state.get("eval_minutes", vla.get("eval_minutes", 0))
        per_task_expert = {t: dict(demos_success=rows[t]["demos_kept"] / rows[t]["demos_tried"],
                                   **{k: rows[t][k] for k in ("bc_success", "expert_success", "expert_env_steps") if k in rows[t]},
                                   minutes={k: round(m, 1) for k, m in rows[t]["minutes"].items()}) for t in tasks}
        demos_success = sum(e["demos_success"] for e in per_task_expert.values()) / len(tasks)
        table["sources"][source] = dict(
            vla_success=successes / episodes, vla_ci95=list(wilson_interval(successes, episodes)), episodes=episodes,
            successes=successes,
            per_task_vla_success={t: r["success_rate"] for t, r in per_task.items()},
            per_task_vla_ci95={t: r["ci95"] for t, r in per_task.items()},
            # RL experts: best deterministic evaluation on the 50 init states; the scripted expert: its demos' kept / tried
            expert_success=demos_success if source == "scripted" else sum(rows[t]["expert_success"] for t in tasks) / len(tasks),
            demos_success=demos_success,
            per_task_expert=per_task_expert,
            smoothness={k: dict(mean=sum(rows[t]["metrics"][k]["mean"] for t in tasks) / len(tasks),
                                spread=sum(rows[t]["metrics"][k]["std"] for t in tasks) / len(tasks)) for k in SMOOTHNESS},
            minutes=dict(stages=round(sum(sum(rows[t]["minutes"].values()) for t in tasks), 1), vla_train=round(vla_train, 1),
                         vla_eval=round(vla_eval, 1)),
            out_dir=d, command=summary["command"])
    return table


def plot_compare(table, path):
    """Left: the VLA's success by source with Wilson intervals, the experts' success as dots. Right: each
    smoothness figure by source relative to the largest, with the spread across demos."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(table["sources"])
    rows = [table["sources"][s] for s in sources]
    fig, (ax, ax_smooth) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(sources))
    ax.bar(x, [r["vla_success"] for r in rows], color="tab:blue", alpha=0.7, label="VLA")
    ax.errorbar(x, [r["vla_success"] for r in rows], fmt="none", ecolor="k", capsize=4,
                yerr=[[r["vla_success"] - r["vla_ci95"][0] for r in rows], [r["vla_ci95"][1] - r["vla_success"] for r in rows]])
    ax.plot(x, [r["expert_success"] for r in rows], "o", color="tab:orange", label="expert (the data's source)")
    ax.set_xticks(list(x), sources), ax.set_ylim(0, 1.02), ax.grid(alpha=0.3), ax.legend(fontsize=8)
    ax.set_ylabel(f"success, {len(table['tasks'])} tasks")
    width = 0.8 / len(sources)
    top = [max(r["smoothness"][k]["mean"] for r in rows) or 1 for k in SMOOTHNESS]  # each figure's largest source
    for i, (source, r) in enumerate(zip(sources, rows)):
        ax_smooth.bar([j + i * width for j in range(len(SMOOTHNESS))], [r["smoothness"][k]["mean"] / t for k, t in zip(SMOOTHNESS, top)],
                      width, yerr=[r["smoothness"][k]["spread"] / t for k, t in zip(SMOOTHNESS, top)], capsize=2, label=source)
    ax_smooth.set_xticks([j + 0.4 - width / 2 for j in range(len(SMOOTHNESS))], SMOOTHNESS, fontsize=8)
    ax_smooth.set_ylabel("/ the largest source (lower: smoother)", fontsize=9), ax_smooth.legend(fontsize=8), ax_smooth.grid(alpha=0.3)
    fig.suptitle(f"{table['demos_per_task']} demos per task: {' '.join(t.replace('libero_', '') for t in table['tasks'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare_markdown(table):
    lines = ["| source | VLA success [95% CI] (episodes) | expert success | action jerk | ee jerk | path length (m) | episode length |",
             "|---|---|---|---|---|---|---|"]
    for source, r in table["sources"].items():
        smooth = " | ".join(f"{r['smoothness'][k]['mean']:.4g} ({r['smoothness'][k]['spread']:.2g})" for k in SMOOTHNESS)
        lines.append(f"| {source} | {r['vla_success']:.3f} [{r['vla_ci95'][0]:.2f}, {r['vla_ci95'][1]:.2f}] ({r['episodes']}) "
                     f"| {r['expert_success']:.2f} | {smooth} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.compare:
        try:
            if args.tasks:
                raise UserError("--compare reads finished suites: leave --tasks out")
            if not args.results_path:
                raise UserError("--compare needs --results-path, the table's JSON (e.g. docs/results/paper_table_libero_spatial.json)")
            table = compare_suites(args.compare)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        table["command"] = shlex.join(["python", "run_suite.py", *sys.argv[1:]])
        os.makedirs(os.path.dirname(os.path.abspath(args.results_path)), exist_ok=True)
        write_json(args.results_path, table)
        figure = os.path.splitext(args.results_path)[0] + ".png"
        plot_compare(table, figure)
        print(compare_markdown(table) + f"\n{args.results_path}, {figure}")
        sys.exit(0)
    try:
        if not args.tasks:
            raise UserError("give --tasks, e.g. --tasks libero_spatial_0 libero_spatial_1 or --tasks libero_spatial")
        tasks = expand_tasks(args.tasks)
        if args.source not in SOURCES:
            raise UserError(f"--source '{args.source}' is not one of {', '.join(SOURCES)}")
        if args.warmstart_variety < 0:
            raise UserError(f"--warmstart-variety must be 0 or more (got {args.warmstart_variety})")
        for flag in ("num_demos", "warmstart_demos", "image_size", "cpus_per_stage"):
            if getattr(args, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
        for flag in ("warmstart_args", "expert_args", "collect_args", "vla_args", "eval_args"):
            try:
                shlex.split(getattr(args, flag))
            except ValueError as e:
                raise UserError(f"--{flag.replace('_', '-')} is not a command-line string ({e})")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise UserError(f"--out-dir '{args.out_dir}' is a file: pass a directory")
        check_ray_address(args.ray_address)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    args.out_dir = os.path.abspath(args.out_dir)
    for task in tasks:
        os.makedirs(os.path.join(args.out_dir, task, "logs"), exist_ok=True)

    import ray

    t_ray = time.time()
    try:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level="error", configure_logging=True)
    except ConnectionError as e:
        print(f"error: cannot join a Ray cluster at --ray-address {args.ray_address} ({e})", file=sys.stderr)
        sys.exit(2)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    node_cpus = max(int(n.get("CPU", 0)) for n in nodes)
    has_gpu = any(n.get("GPU", 0) > 0 for n in nodes)
    stage_cpus = min(args.cpus_per_stage, node_cpus)
    slots = max(1, sum(int(n.get("CPU", 0)) // stage_cpus for n in nodes))  # stages that can run at once
    print(f"Ray: {len(nodes)} node(s), {int(sum(n.get('CPU', 0) for n in nodes))} CPUs, "
          f"{int(sum(n.get('GPU', 0) for n in nodes))} GPUs ({time.time() - t_ray:.1f}s to start); "
          f"{len(tasks)} tasks x {len(TASK_STAGES[args.source])} stages, {stage_cpus} CPUs each; out {args.out_dir}",
          flush=True)
    remote_stage = ray.remote(max_retries=0)(run_stage)

    def stop(signum, frame):  # a scheduler's stop (SIGTERM) ends the run like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started with & from a script, which ignores SIGINT

    # the driver: a per-task chain of stages, the next one submitted when the previous ends
    state = {t: dict(status="queued", minutes={}, **read_json(os.path.join(args.out_dir, t, "stages.json"), {}).get("figures", {}))
             for t in tasks}
    done_stages = {t: read_json(os.path.join(args.out_dir, t, "stages.json"), {}).get("done", {}) for t in tasks}
    pending = {}  # ObjectRef -> (task, stage)

    def record(task, stage, minutes):
        task_dir = os.path.join(args.out_dir, task)
        figures = headline(args, task, stage, task_dir)
        text = figures.pop("text")
        state[task].update(figures)
        state[task]["minutes"][stage] = minutes
        done_stages[task][stage] = dict(minutes=minutes, headline=text)
        if stage == "expert" and args.results_path:
            add_expert_result(args, task, figures, minutes)
        elif stage in ("demos", "report") and args.results_path:
            add_demos_result(args, task, stage, figures, minutes)
        write_json(os.path.join(task_dir, "stages.json"),
                   dict(done=done_stages[task], figures={k: v for k, v in state[task].items() if k not in ("status", "minutes")}))
        return text

    def submit_next(task):
        """Skip the task's finished stages, submit its next one, or mark it done."""
        task_dir = os.path.join(args.out_dir, task)
        for stage in TASK_STAGES[args.source]:
            if stage in done_stages[task] and stage_output_exists(args, task, stage, task_dir):
                if stage not in state[task]["minutes"]:
                    state[task]["minutes"][stage] = done_stages[task][stage]["minutes"]
                    print(f"{task} {stage}: done already ({done_stages[task][stage]['headline']}), skipped", flush=True)
                continue
            if stage == "expert" and expert_run_dir(task_dir) is None:  # cut off before its first last.pt
                shutil.rmtree(os.path.join(task_dir, "expert"), ignore_errors=True)
            gpus = args.expert_gpu_fraction if stage == "expert" and has_gpu else 0
            cmd = stage_command(args, task, stage, task_dir)
            ref = remote_stage.options(num_cpus=stage_cpus, num_gpus=gpus).remote(cmd, os.path.join(task_dir, "logs", f"{stage}.log"))
            pending[ref] = (task, stage)
            state[task]["status"] = "running"
            resumed = " (resuming its last.pt)" if "--resume" in cmd else ""
            print(f"{task} {stage}: queued{resumed}", flush=True)
            return
        state[task]["status"] = "done"

    def run_until_drained(waiting):
        """Start tasks while the cluster has room for their stages (so tasks finish one by one, not
        all at the end); as each stage ends, record it and submit its task's next stage."""
        while waiting or pending:
            while waiting and len(pending) < slots:
                submit_next(waiting.pop(0))  # a task whose stages are all done already submits nothing
            if not pending:
                continue
            ready, _ = ray.wait(list(pending), num_returns=1)
            task, stage = pending.pop(ready[0])
            log_path = os.path.join(args.out_dir, task, "logs", f"{stage}.log")
            rc, seconds = ray.get(ready[0])
            if rc == 0:
                text = record(task, stage, seconds / 60)
                print(f"{task} {stage}: done in {seconds / 60:.1f} min: {text}", flush=True)
                submit_next(task)
                write_summary(args, state, None)
            else:
                state[task].update(status="failed", failed_stage=stage, log=log_path)
                print(f"{task} {stage}: FAILED (exit {rc}) after {seconds / 60:.1f} min; last lines of {log_path}:\n"
                      + "".join("    " + line for line in log_tail(log_path).splitlines(True)), flush=True)
            write_summary(args, state, None)

    vla = None
    try:
        run_until_drained(list(tasks))

        # the VLA over every task that made its demos
        if args.vla:
            vla_dir = os.path.join(args.out_dir, "vla")
            os.makedirs(os.path.join(vla_dir, "logs"), exist_ok=True)
            ok = [t for t in tasks if state[t]["status"] == "done"]
            vla = dict(status="failed" if not ok else "running", tasks=ok)
            vla_state = read_json(os.path.join(vla_dir, "stages.json"), {})
            checkpoint = vla_state.get("checkpoint")
            if ok and not (checkpoint and os.path.isfile(checkpoint) and vla_state.get("tasks") == ok):
                out = os.path.join(vla_dir, "runs")
                demos = [demos_path(args, t) for t in ok]
                cmd = [sys.executable, os.path.join(HERE, "train_vla.py"), "--demos-paths", *demos, "--image-size",
                       str(args.image_size), "--seed", str(args.seed), "--exp-name", "vla", "--out-dir", out,
                       *shlex.split(args.vla_args)]
                unfinished = unfinished_vla(out, demos)
                cmd += ["--resume", unfinished] if unfinished else []
                earlier = read_json(os.path.join(os.path.dirname(unfinished), "summary.json"))["wall_time"] if unfinished else 0
                print(f"vla train: queued on {len(ok)} tasks" + (f" (resuming {unfinished})" if unfinished else ""), flush=True)
                ref = remote_stage.options(num_cpus=node_cpus, num_gpus=1 if has_gpu else 0).remote(
                    cmd, os.path.join(vla_dir, "logs", "train.log"))
                rc, seconds = ray.get(ref)
                found = sorted(glob.glob(os.path.join(out, "*", "vla.pt")), key=os.path.getmtime)
                if rc != 0 or not found:
                    vla.update(status="failed", log=os.path.join(vla_dir, "logs", "train.log"))
                    print(f"vla train: FAILED (exit {rc}); last lines:\n{log_tail(vla['log'])}", flush=True)
                else:
                    checkpoint = found[-1]
                    if os.path.isfile(results := os.path.join(vla_dir, "eval.json")):  # an earlier VLA's scores
                        os.remove(results)
                    vla_state = dict(checkpoint=checkpoint, tasks=ok, train_minutes=(earlier + seconds) / 60)  # with the part before a resume
                    write_json(os.path.join(vla_dir, "stages.json"), vla_state)
                    print(f"vla train: done in {seconds / 60:.1f} min: {checkpoint}", flush=True)
            elif ok:
                print(f"vla train: done already ({checkpoint}), skipped", flush=True)
            if vla["status"] == "running":
                results = os.path.join(vla_dir, "eval.json")
                cmd = [sys.executable, os.path.join(HERE, "eval_libero.py"), "--checkpoint-path", checkpoint, "--tasks",
                       *ok, "--num-workers", str(node_cpus), "--results-path", results, *shlex.split(args.eval_args)]
                print("vla eval: queued", flush=True)
                # eval_libero.py resumes from the episodes already in its results file: the minutes add up across runs
                earlier = vla_state.get("eval_minutes", 0) if os.path.isfile(results) else 0
                ref = remote_stage.options(num_cpus=node_cpus).remote(cmd, os.path.join(vla_dir, "logs", "eval.log"))
                rc, seconds = ray.get(ref)
                vla_state["eval_minutes"] = earlier + seconds / 60
                write_json(os.path.join(vla_dir, "stages.json"), vla_state)
                if rc != 0:
                    vla.update(status="failed", log=os.path.join(vla_dir, "logs", "eval.log"))
                    print(f"vla eval: FAILED (exit {rc}); last lines:\n{log_tail(vla['log'])}", flush=True)
                else:
                    r = read_json(results)
                    vla.update(status="done", checkpoint=checkpoint, average_success=r["average"],
                               per_task={t: r["tasks"][t]["success_rate"] for t in ok}, eval_minutes=vla_state["eval_minutes"])
                    print(f"vla eval: done in {seconds / 60:.1f} min: average success {r['average']:.3f}", flush=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # the stage's process group is stopped in its worker (run_stage)
        ray.wait(list(pending), num_returns=len(pending), timeout=20)
        ray.shutdown()
        print("interrupted: finished stages are kept; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
    ray.shutdown()

    table, plotted = write_summary(args, state, vla)
    print("\n" + table, flush=True)
    failed = [t for t in tasks if state[t]["status"] != "done"] + (["vla"] if vla and vla["status"] != "done" else [])
    print(f"summary: {os.path.join(args.out_dir, 'summary.json')}, summary.md" + (", summary.png" if plotted else ""))
    if failed:
        print(f"failed: {', '.join(failed)} (their logs are named above)", file=sys.stderr)
        sys.exit(1)
