"""Collect LIBERO demonstrations without a human: roll out a policy, keep successes, render.

Stage 1 of the pipeline (see README): writes demos in the LIBERO / robomimic HDF5 layout
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

The scripted expert reads the goal from the task's BDDL (`parsed_problem["goal_state"]`) and
the privileged simulator state: for each `On(obj, target)` / `In(obj, region)` it moves above
the object, descends, closes the gripper, lifts, carries over the target, lowers and opens.
Grasps come from the object's collision geometry: objects narrower than the gripper are
grasped across their narrow horizontal axis, wider ones (bowls) by the rim.

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
from typing import List, Optional

import h5py
import numpy as np
import tyro

# robosuite warns about a missing private macro file at every import, in every worker
logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())
import robosuite.utils.transform_utils as T  # noqa: E402 (after the filter above)


@dataclass
class Args:
    task: Optional[str] = None
    """task to collect, `<suite>_<index>`: suite in libero_spatial, libero_object, libero_goal, libero_10, libero_90 (default with a checkpoint: its task)"""
    policy: str = "scripted"
    """`scripted` (privileged-state expert) or an RL checkpoint (`runs/<run>/expert.pt` of diffusion_ppo.py or gaussian_ppo.py)"""
    num_demos: int = 50
    """successful demonstrations to keep"""
    max_attempts: Optional[int] = None
    """episodes to try at most before giving up (default: 4 x num_demos + 10)"""
    seed: int = 0
    """base seed: episode i starts from `env.seed(seed * 1_000_003 + i); env.reset()`"""
    num_workers: int = 0
    """rollout / rendering processes, each with its own env (0: one per CPU core)"""
    out_path: Optional[str] = None
    """output file (default: data/<task>_<source>.hdf5, or <input>_replay.hdf5 with --replay)"""
    overwrite: bool = False
    """replace an existing --out-path (without it, an existing file is refused before any rollout)"""
    image_size: int = 128
    """side of the square agentview and eye-in-hand images"""
    no_images: bool = False
    """write state-only demos (no rendering): enough for the state-based RL warm start"""
    no_reflections: bool = False
    """render without MuJoCo's mirror pass (the table's reflections): half the cost of a software-rendered frame; the file records it, and train_vla.py and eval_libero.py render the same way"""
    video: int = 0
    """write upright MP4s of the first N kept demos next to the output file"""
    replay: Optional[str] = None
    """re-render an existing LIBERO-layout file (ours or LIBERO's own): replays `states`, drops demos that no longer succeed, fills obs/object_states"""
    report: List[str] = field(default_factory=list)
    """print the metrics of these HDF5 files side by side and save a comparison PNG (no collection)"""
    report_png: str = "demo_metrics.png"
    """where `--report` writes its plot"""
    quiet: bool = False
    """print only the summary, not one line per episode"""
    scripted_table: Optional[str] = None
    """write no demos: roll the scripted expert out from --num-demos fresh placements of each of --table-tasks and merge its success and episode lengths per task into this JSON (a task already in it is skipped unless --overwrite, so an interrupted run goes on where it stopped)"""
    table_tasks: List[str] = field(default_factory=lambda: list(SUITES))
    """tasks (libero_goal_3) and/or whole suites (libero_90) for --scripted-table"""


SUITES = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
"""suite -> step limit (the protocol of OpenVLA and openpi, after the settle steps)"""
NUM_SETTLE_STEPS = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
CAMERAS = {"agentview_rgb": "agentview_image", "eye_in_hand_rgb": "robot0_eye_in_hand_image"}


class UserError(Exception):
    """A mistake the user can fix; main prints its message as one sentence and exits 2."""


def resolve_task(name):
    """`libero_spatial_0` -> dict with the suite, BDDL path, instruction, step limit and eval init states."""
    from libero.libero import benchmark, get_libero_path

    valid = ", ".join(f"{s}_0..{s}_{9 if s != 'libero_90' else 89}" for s in SUITES)
    suite_name, _, index = (name or "").rpartition("_")
    if suite_name not in SUITES or not index.isdigit():
        raise UserError(f"unknown task '{name}': valid tasks are {valid}")
    with contextlib.redirect_stdout(None):  # the benchmark prints a line about task order
        suite = benchmark.get_benchmark_dict()[suite_name]()
    if int(index) >= suite.n_tasks:
        raise UserError(f"unknown task '{name}': valid tasks are {valid}")
    task = suite.get_task(int(index))
    return dict(
        name=name,
        suite=suite_name,
        index=int(index),
        bddl=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
        language=task.language,
        max_steps=SUITES[suite_name],
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


def set_reflections(env, on):
    """Turn the mirror pass of the env's offscreen renderer on (LIBERO's look) or off (half the cost in software)."""
    import mujoco

    env.env.sim._render_context_offscreen.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = int(on)


def quat2axisangle(q):
    """robosuite (x, y, z, w) quaternion -> axis-angle 3-vector."""
    q = np.asarray(q, dtype=np.float64)
    w = np.clip(q[3], -1.0, 1.0)
    den = np.sqrt(1.0 - w * w)
    return np.zeros(3) if den < 1e-8 else q[:3] * 2.0 * np.arccos(w) / den


def quat2mat(q):
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def mat2axisangle(R):
    angle = np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    if angle > np.pi - 1e-4:  # axis from the diagonal near a half turn
        axis = np.sqrt(np.maximum((np.diag(R) + 1) / 2, 0))
        i = int(np.argmax(axis))
        axis = R[:, i] + np.eye(3)[i]
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def rotz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# ---------------------------------------------------------------------------------------
# SCRIPTED EXPERT: privileged state + BDDL goal -> OSC_POSE actions
# ---------------------------------------------------------------------------------------
class UnsupportedGoal(Exception):
    pass


def articulated_joint(env, name):
    """(joint name, parent object) behind an articulated goal's argument: a region of a drawer
    (`wooden_cabinet_1_top_region`) or an object with a joint (`microwave_1`, `flat_stove_1`)."""
    site = env.object_sites_dict.get(name)
    if getattr(site, "joints", None):
        return site.joints[0], site.parent_name
    return env.get_object(name).joints[0], name




class ScriptedExpert:
    """State machine over the BDDL goal: pick-and-place for every `On` / `In`, and for `Open`,
    `Close`, `TurnOn` and `TurnOff` a pull (grasp the handle, move it along its joint) or a push
    (closed fingers against the moving part). Joints, their axes and the handles come from the MuJoCo
    model and LIBERO's articulation ranges, not from per-task tables. Opening and switching come
    first, then the placements, then the closing (a drawer is closed after the bowl is in it)."""

    GRIPPER_SPAN = 0.075  # Panda fingers open to about 8 cm; keep a margin
    POS_GAIN = 12.0  # action per metre of error (action 1 = 5 cm OSC step)
    LOW_TILT = 0.36  # a hand working a handle within 8 cm of the table points down by atan(0.36) = 20 degrees
    ORDER = {"open": 0, "turnon": 0, "turnoff": 0, "on": 1, "in": 1, "close": 2}

    def __init__(self, env):
        self.env = env.env
        goals = [tuple(pred) for pred in self.env.parsed_problem["goal_state"]]
        for pred in goals:
            if pred[0] not in self.ORDER:
                raise UnsupportedGoal(f"the scripted expert cannot do the predicate '{pred[0]}' in goal {list(pred)}")
        self.goals = sorted(goals, key=lambda g: self.ORDER[g[0]])  # stable: BDDL order within a kind
        m = self.env.sim.model._model
        self.m, self.d = m, self.env.sim.data._data
        self.goal_idx, self.phase, self.t_phase = 0, "plan", 0
        self.art_tries = {}  # goal index -> articulated attempts so far

    # -- geometry of bodies and sites ----------------------------------------------------
    def _points(self, name):
        """World-frame points of the collision geometry of object `name` (body and children)."""
        return self._body_points(self.env.obj_body_id[name])

    def _body_points(self, root, with_geoms=False):
        """World-frame points of the collision geometry of MuJoCo body `root` and its children (and,
        with_geoms, the geom each point belongs to)."""
        m, d = self.m, self.d
        bodies = {root}
        for b in range(m.nbody):  # bodies are ordered parent-first
            if m.body_parentid[b] in bodies:
                bodies.add(b)
        pts, owner = [], []
        for g in range(m.ngeom):
            if m.geom_bodyid[g] not in bodies or (m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0):
                continue
            R, p = d.geom_xmat[g].reshape(3, 3), d.geom_xpos[g]
            if m.geom_type[g] == 7:  # mesh: its vertices, already in the geom frame
                mid = m.geom_dataid[g]
                v = m.mesh_vert[m.mesh_vertadr[mid]: m.mesh_vertadr[mid] + m.mesh_vertnum[mid]]
            else:  # primitive: corners of its local bounding box
                c, h = m.geom_aabb[g, :3], m.geom_aabb[g, 3:]
                v = c + h * np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
            pts.append(p + v @ R.T)
            owner.append(np.full(len(v), g))
        if not pts:
            return (d.xpos[root][None].copy(), np.array([-1])) if with_geoms else d.xpos[root][None].copy()
        return (np.concatenate(pts), np.concatenate(owner)) if with_geoms else np.concatenate(pts)

    def _site(self, name):
        site = self.env.object_sites_dict[name]
        pos = self.env.sim.data.get_site_xpos(name).copy()
        size = np.asarray(getattr(site, "size", [0.02, 0.02, 0.01]), dtype=np.float64)
        return pos, size

    def _plan_goal(self, obs):
        """Grasp pose for the object and place pose over the target, from the current state."""
        _, obj, target = self.goals[self.goal_idx]
        pts = self._points(obj)
        center_xy = (pts[:, :2].min(0) + pts[:, :2].max(0)) / 2
        lo_z, hi_z = pts[:, 2].min(), pts[:, 2].max()
        # horizontal principal axes of the object's footprint
        xy = pts[:, :2] - center_xy
        _, vecs = np.linalg.eigh(xy.T @ xy)
        widths = [np.ptp(xy @ vecs[:, k]) for k in range(2)]
        # candidate grasps: (point, finger closing direction, preference penalty)
        cands = []
        for k in range(2):
            if widths[k] < self.GRIPPER_SPAN:  # fingers close across axis k; slide along the other
                axis, other = vecs[:, k], vecs[:, 1 - k]
                reach = max(widths[1 - k] / 2 - 0.01, 0.0)
                for s in np.linspace(-1, 1, 9) * reach:
                    z = max(hi_z - 0.035, lo_z + 0.5 * (hi_z - lo_z))
                    cands.append((np.array([*(center_xy + s * other), z]), axis, 0.2 * abs(s) + 0.002 * k))
        if not cands:  # too wide to span (a bowl): pinch the rim, preferably on the robot's side
            for ang in np.linspace(0, 2 * np.pi, 16, endpoint=False):
                u = np.array([np.cos(ang), np.sin(ang)])
                rim_xy = center_xy + u * (np.max(xy @ u) - 0.012)  # the rim may be tilted: measure it
                near = pts[np.linalg.norm(pts[:, :2] - rim_xy, axis=1) < 0.02]
                rim_top = near[:, 2].max() if len(near) else hi_z
                pen = 0.005 * (1 + u[0])  # u = (-1, 0) points at the robot base
                cands.append((np.array([*rim_xy, rim_top - 0.02]), u, pen))
        # keep the open fingers (and the hand above them) clear of every other body
        others = np.concatenate([self._points(n) for n in self.env.obj_body_id if n != obj])

        def clearance(point, u):
            p = others[others[:, 2] > point[2] - 0.015]
            if not len(p):
                return 1.0
            rel = p[:, :2] - point[:2]
            along = rel @ u
            hand = p[:, 2] > point[2] + 0.04  # the hand above the fingers is longer and thicker
            half_along, half_across = np.where(hand, 0.11, 0.06), np.where(hand, 0.035, 0.012)
            across = np.abs(rel @ np.array([-u[1], u[0]]))
            out = np.maximum(np.abs(along) - half_along, 0.0)
            return float(np.sqrt(out**2 + np.maximum(across - half_across, 0.0) ** 2).min())

        grasp, close_dir, _ = max(cands, key=lambda c: min(clearance(c[0], c[1]), 0.03) - c[2])
        # yaw that lines the finger axis (gripper y) up with close_dir; the fingers are symmetric, so
        # yaw and yaw +- pi grasp alike: take the smaller turn that keeps the wrist joint (which turns
        # by about -yaw, limit +-2.9 rad) well inside its range
        yaw = np.arctan2(close_dir[1], close_dir[0]) - np.pi / 2
        yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
        yaw = min((yaw, yaw + np.pi, yaw - np.pi), key=lambda y: abs(y) + 10 * max(abs(self.wrist0 - y) - 2.0, 0.0))
        self.R_grasp = rotz(yaw) @ self.R0
        self.grasp = grasp
        self.obj_bottom_below_grasp = grasp[2] - lo_z
        # target: a body (plate, bowl) or a region site (basket_1_contain_region, stove...)
        if target in self.env.obj_body_id:
            tp = self._points(target)
            self.place_xy = self.env.sim.data.body_xpos[self.env.obj_body_id[target]][:2].copy()
            surface = tp[:, 2].max()
            target_hi = surface
        else:
            pos, size = self._site(target)
            self.place_xy = pos[:2]
            parent = target.split("_")[0] + "_" + target.split("_")[1]
            parent_hi = self._points(parent)[:, 2].max() if parent in self.env.obj_body_id else pos[2]
            target_hi = max(parent_hi, pos[2] + size[2])
            # 'in' a container: let go a little above its floor; 'on' a site: just above it
            surface = pos[2] - size[2] if self.goals and self._pred() == "in" else pos[2]
        self.release_z = surface + 0.015 + self.obj_bottom_below_grasp
        self.carry_z = max(target_hi, hi_z) + 0.06 + self.obj_bottom_below_grasp

    # -- articulated objects: drawers, doors, knobs ---------------------------------------
    ART_RANGES = {"open": ("default_open_ranges", "default_close_ranges"), "close": ("default_close_ranges", "default_open_ranges"),
                  "turnon": ("default_turnon_ranges", "default_turnoff_ranges"), "turnoff": ("default_turnoff_ranges", "default_turnon_ranges")}

    def _joint_point(self):
        """World position of the tracked point on the moving part, and its direction of travel
        (unit, horizontal) when the joint moves towards the goal."""
        a = self.art
        R, x = self.d.xmat[a["body"]].reshape(3, 3), self.d.xpos[a["body"]]
        p = x + R @ a["local"]
        axis = self.d.xaxis[a["jid"]]
        v = axis if a["slide"] else np.cross(axis, p - self.d.xanchor[a["jid"]])
        v = a["sign"] * np.array([v[0], v[1], 0.0])
        return p, v / max(np.linalg.norm(v), 1e-9)

    def _plan_articulated(self, obs):
        """Pull a handle (open a drawer or a door) or push the moving part (close it, turn a knob).

        Handles are grasped with the hand level, pointing at the part (from above, the palm would meet
        the cabinet or the door's top before the fingers reach the handle), and drawers are pushed
        the same way. Doors and knobs are pushed from above with closed fingers: a door that the
        first pull left ajar (the arm cannot follow its handle all the way round) is pushed open
        from the inside."""
        pred, name = self.goals[self.goal_idx]
        tries = self.art_tries[self.goal_idx] = self.art_tries.get(self.goal_idx, 0) + 1
        joint, parent = articulated_joint(self.env, name)
        ranges = self.env.get_object(parent).object_properties["articulation"]
        goal_range, other_range = (ranges[k] for k in self.ART_RANGES[pred])
        sign = 1.0 if np.mean(goal_range) > np.mean(other_range) else -1.0
        m, d = self.m, self.d
        jid = m.joint(joint).id
        body, slide = int(m.jnt_bodyid[jid]), m.jnt_type[jid] == 2
        pts, owner = self._body_points(body, with_geoms=True)
        axis, anchor = d.xaxis[jid], d.xanchor[jid]
        vel = sign * (np.tile(axis, (len(pts), 1)) if slide else np.cross(axis, pts - anchor))
        speed = np.linalg.norm(vel[:, :2], axis=1)
        fast = speed >= 0.8 * speed.max()  # on a door or a knob, the part far from the hinge
        u = vel[np.argmax(speed)][:2] / speed.max()
        pull = pred == "open" and (slide or tries == 1)
        if pull:  # the handle: what sticks out furthest along the way the part travels
            lead = np.where(fast, pts[:, :2] @ u, -np.inf)
            handle = pts[lead >= lead.max() - 0.012]
            point = d.geom_xpos[owner[np.argmax(lead)]].copy()  # the centre (axis) of the handle's bar
            upright = np.ptp(handle[:, 2]) > np.ptp(handle[:, :2] @ np.array([-u[1], u[0]]))
        else:  # push the face that leads the travel, where the part moves fastest
            far = pts[fast]
            back = far[far[:, :2] @ u <= (far[:, :2] @ u).min() + 0.01]
            point = (back.min(0) + back.max(0)) / 2
            upright = False
        R, x = d.xmat[body].reshape(3, 3), d.xpos[body]
        self.art = dict(jid=jid, qadr=m.jnt_qposadr[jid], body=body, slide=slide, sign=sign, pull=pull,
                        local=R.T @ (point - x), q0=float(d.qpos[m.jnt_qposadr[jid]]))
        p, v = self._joint_point()
        whole = self._points(parent)
        if slide or pull:  # the hand points into the part: against the pull, along the push
            w = -v if pull else v
            if p[2] - whole[:, 2].min() < 0.08:  # near the table: tilt the hand down so the palm clears it
                w = (w + np.array([0.0, 0.0, -self.LOW_TILT])) / np.sqrt(1 + self.LOW_TILT**2)
            self.R_art = self._level_R(w, fingers_vertical=pull and not upright)
            self.art["start"] = p if pull else p - w * 0.03
        else:
            w = np.array([0.0, 0.0, -1.0])
            self.R_art = rotz(np.arctan2(v[1], v[0])) @ self.R0
            self.art["start"] = p - v * 0.03
        self.art["approach"] = self.art["start"] - w * 0.08
        # come in from above the whole object (an open drawer or door sticks out into the way)
        self.art["high"] = np.array([*self.art["approach"][:2], max(self.art["approach"][2], whole[:, 2].max() + 0.05)])

    def _level_R(self, w, fingers_vertical):
        """Hand orientation pointing along `w` (level, or tilted down), fingers closing in the vertical
        plane through `w` or level across it; of the two finger directions, the one nearer the start's."""
        z = w / np.linalg.norm(w)
        across = np.cross([0.0, 0.0, 1.0], z)
        across /= np.linalg.norm(across)
        y = np.cross(z, across) if fingers_vertical else across
        cands = [np.column_stack([np.cross(s * y, z), s * y, z]) for s in (1.0, -1.0)]
        return min(cands, key=lambda Rc: np.linalg.norm(mat2axisangle(Rc @ self.R0.T)))

    def _art_done(self):
        return bool(self.env._eval_predicate(list(self.goals[self.goal_idx])))

    def _act_articulated(self, obs):
        a, ph = self.art, self.phase
        p, v = self._joint_point()
        turn = 0.0 if a["slide"] else float(self.d.qpos[a["qadr"]] - a["q0"])
        R = T.quat2mat(T.axisangle2quat(self.d.xaxis[a["jid"]] * turn)) @ self.R_art  # the hand turns with a door
        grip = 1
        if a["pull"] and ph in ("art_high", "art_above", "art_descend"):  # open just wider than a handle bar
            gap = obs["robot0_gripper_qpos"][0] - 0.018  # each finger's travel from closed, metres
            grip = 0.0 if abs(gap) < 0.002 else float(np.sign(gap))
        if ph == "art_high":
            act, err = self._move(obs, a["high"], R, grip)
            if err < 0.02 or self.t_phase > 60:
                self.phase, self.t_phase = "art_above", 0
        elif ph == "art_above":
            act, err = self._move(obs, a["approach"], R, grip)
            if err < 0.01 or self.t_phase > 60:
                self.phase, self.t_phase = "art_descend", 0
        elif ph == "art_descend":
            act, err = self._move(obs, a["start"], R, grip, max_speed=0.5)
            if err < 0.006 or self.t_phase > 40:
                self.phase, self.t_phase = ("art_grasp" if a["pull"] else "art_move"), 0
        elif ph == "art_grasp":
            act, _ = self._move(obs, a["start"], R, 1)
            if self.t_phase > 10:
                self.phase, self.t_phase = "art_move", 0
                R_body = self.d.xmat[a["body"]].reshape(3, 3)
                self.art["offset"] = R_body.T @ (obs["robot0_eef_pos"] - p)  # where the hand holds the handle, in the part's frame
        elif ph == "art_move":
            held = p + self.d.xmat[a["body"]].reshape(3, 3) @ a["offset"] if a["pull"] else p - v * 0.005
            act, _ = self._move(obs, held + v * 0.04, R, grip)
            q = float(self.d.qpos[a["qadr"]])
            stuck = self.t_phase % 10 == 0 and abs(q - a["q_mark"]) < 0.005  # no progress in 10 steps: let go, re-plan
            if self.t_phase == 1 or self.t_phase % 10 == 0:
                a["q_mark"] = q
            if self._art_done() or stuck or self.t_phase > 150:
                self.phase, self.t_phase = "art_release", 0
        elif ph == "art_release":
            act, _ = self._move(obs, obs["robot0_eef_pos"], R, -1)
            act[:3] = 0
            if self.t_phase > 6 or not a["pull"]:
                self.phase, self.t_phase = "art_retreat", 0
        elif ph == "art_retreat":  # back off the way the hand came in
            back = a["approach"] - a["start"]
            act, err = self._move(obs, obs["robot0_eef_pos"] + back / np.linalg.norm(back) * 0.03, R, -1)
            if self.t_phase > 8:
                self.phase, self.t_phase = "art_home", 0
                self.art["home"] = np.array([*obs["robot0_eef_pos"][:2], max(obs["robot0_eef_pos"][2], a["high"][2])])
        else:  # up and the hand back to pointing down, slowly (a fast turn from level can fold the wrist), then the next sub-goal
            act, err = self._move(obs, a["home"], self.R0, -1, max_speed=0.5)
            act[3:6] = np.clip(act[3:6], -0.5, 0.5)
            if err < 0.02 or self.t_phase > 40:
                if not self._art_done():
                    self.phase, self.t_phase = "plan", 0  # slipped: try again
                elif self.goal_idx + 1 < len(self.goals):
                    self.goal_idx, self.phase, self.t_phase = self.goal_idx + 1, "plan", 0
        return np.clip(act, -1, 1)

    def _pred(self):
        return self.goals[self.goal_idx][0]

    # -- control ------------------------------------------------------------------------
    def _move(self, obs, target_pos, R_target, gripper, max_speed=1.0):
        pos_err = target_pos - obs["robot0_eef_pos"]
        a = np.zeros(7)
        a[:3] = np.clip(pos_err * self.POS_GAIN, -max_speed, max_speed)
        R = quat2mat(obs["robot0_eef_quat"])
        a[3:6] = np.clip(mat2axisangle(R_target @ R.T) * 3.0, -1.0, 1.0)
        a[6] = gripper
        # one error in metres and radians: a phase ends only once the yaw has turned as well
        return a, max(np.linalg.norm(pos_err), 0.1 * np.linalg.norm(mat2axisangle(R_target @ R.T)))

    def _place_eef_xy(self, obs):
        """Closed loop on the held object: move the gripper so the object's body is over the target."""
        obj = self.goals[self.goal_idx][1]
        obj_xy = self.env.sim.data.body_xpos[self.env.obj_body_id[obj]][:2]
        return obs["robot0_eef_pos"][:2] + (self.place_xy - obj_xy)

    def act(self, obs):
        if self.phase == "plan":
            if not hasattr(self, "R0"):
                self.R0 = quat2mat(obs["robot0_eef_quat"])
                self.wrist0 = obs["robot0_joint_pos"][6]
            target = self.goals[self.goal_idx][-1]
            site = self.env.object_sites_dict.get(target)
            if self._pred() == "in" and getattr(site, "joints", None) and not self.env._eval_predicate(["open", target]):
                self.goals.insert(self.goal_idx, ("open", target))  # a closed drawer is opened first
            if self._pred() in self.ART_RANGES:
                self._plan_articulated(obs)
                self.phase, self.t_phase = "art_high", 0
            else:
                self._plan_goal(obs)
                self.phase, self.t_phase = "above", 0
        if self.phase.startswith("art_"):
            self.t_phase += 1
            return self._act_articulated(obs)
        self.t_phase += 1
        self.trail = ([] if self.t_phase == 1 else self.trail[-5:]) + [obs["robot0_eef_pos"].copy()]
        # blocked by contact (a finger on a rim, the object on the target): stop waiting
        stalled = self.t_phase > 8 and np.linalg.norm(self.trail[-1] - self.trail[0]) < 0.002
        g, ph = self.grasp, self.phase
        if ph == "above":
            a, err = self._move(obs, np.array([g[0], g[1], g[2] + 0.08]), self.R_grasp, -1)
            if err < 0.01 or self.t_phase > 80:
                self.phase, self.t_phase = "descend", 0
        elif ph == "descend":
            a, err = self._move(obs, g, self.R_grasp, -1, max_speed=0.5)
            if err < 0.006 or stalled or self.t_phase > 40:
                self.phase, self.t_phase = "grasp", 0
        elif ph == "grasp":
            a, _ = self._move(obs, g, self.R_grasp, 1)
            if self.t_phase > 12:
                self.phase, self.t_phase = "lift", 0
        elif ph == "lift":
            a, err = self._move(obs, np.array([g[0], g[1], self.carry_z]), self.R_grasp, 1)
            if np.ptp(obs["robot0_gripper_qpos"]) < 0.004 and self.t_phase > 3:  # closed on nothing: try again
                self.phase, self.t_phase = "regrasp", 0
                self.obj_last = np.full(3, np.inf)
            elif obs["robot0_eef_pos"][2] > self.carry_z - 0.03 or self.t_phase > 60:
                self.phase, self.t_phase = "carry", 0
        elif ph == "regrasp":  # open and back off until the dropped object is at rest, then re-plan
            a, _ = self._move(obs, np.array([g[0], g[1], g[2] + 0.08]), self.R_grasp, -1)
            obj_pos = self.d.xpos[self.env.obj_body_id[self.goals[self.goal_idx][1]]].copy()
            at_rest = self.t_phase > 2 and np.linalg.norm(obj_pos - self.obj_last) < 0.001
            self.obj_last = obj_pos
            if at_rest or self.t_phase > 10:
                self.phase, self.t_phase = "plan", 0
        elif ph == "carry":
            xy = self._place_eef_xy(obs)
            a, err = self._move(obs, np.array([xy[0], xy[1], self.carry_z]), self.R_grasp, 1)
            if err < 0.01 or self.t_phase > 100:
                self.phase, self.t_phase = "lower", 0
        elif ph == "lower":
            xy = self._place_eef_xy(obs)
            a, err = self._move(obs, np.array([xy[0], xy[1], self.release_z]), self.R_grasp, 1, max_speed=0.5)
            if err < 0.008 or stalled or self.t_phase > 50:
                self.phase, self.t_phase = "release", 0
        elif ph == "release":
            a, _ = self._move(obs, obs["robot0_eef_pos"], self.R_grasp, -1)
            a[:3] = 0
            if self.t_phase > 8:
                self.phase, self.t_phase = "retreat", 0
        else:  # retreat, then the next sub-goal
            up = obs["robot0_eef_pos"].copy()
            up[2] = self.carry_z + 0.05
            a, err = self._move(obs, up, self.R_grasp, -1)
            if (err < 0.02 or self.t_phase > 30) and self.goal_idx + 1 < len(self.goals):
                self.goal_idx, self.phase = self.goal_idx + 1, "plan"
        return np.clip(a, -1, 1)


# ---------------------------------------------------------------------------------------
# POLICIES: the scripted expert, or an RL checkpoint rebuilt from its dict alone
# ---------------------------------------------------------------------------------------
POLICY_SCRIPTS = {"diffusion_ppo": ("diffusion_ppo", "DiffusionPolicy"), "gaussian_ppo": ("gaussian_ppo", "GaussianPolicy")}
"""checkpoint kind -> (script, policy class with `from_checkpoint(dict)` and `act(obs (B, Do)) -> (B, Te, 7)`)"""


def load_policy(spec):
    """`scripted` -> None (an expert is built per episode); a path -> (checkpoint dict, policy)."""
    if spec == "scripted":
        return None
    if not os.path.isfile(spec):
        raise UserError(f"--policy '{spec}' is neither 'scripted' nor an existing checkpoint file")
    import importlib

    import torch

    try:
        ckpt = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"'{spec}' is not a checkpoint torch.load can read with weights_only=True")
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in POLICY_SCRIPTS:
        raise UserError(f"'{spec}' is a checkpoint of kind '{kind}', but --policy rolls out {' or '.join(POLICY_SCRIPTS)} experts")
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
    buf["ee_ori"].append(quat2axisangle(eef_quat))
    buf["object_states"].append(obs["object-state"])


_WORKER = {}


def _rollout_init(task_name, policy_spec):
    import warnings

    warnings.filterwarnings("ignore")
    task = resolve_task(task_name)
    _WORKER.update(task=task, env=make_env(task["bddl"]), policy=load_policy(policy_spec))


def rollout_episode(seed):
    """One episode from the fresh placement of `seed`; returns its arrays and whether it succeeded."""
    env, task = _WORKER["env"], _WORKER["task"]
    t0 = time.time()
    env.seed(seed)
    obs = env.reset()
    model_file = env.env.sim.model.get_xml()  # this placement's MuJoCo model, as LIBERO's files keep it
    for _ in range(NUM_SETTLE_STEPS):  # let objects settle; not recorded (LIBERO protocol)
        obs, _, _, _ = env.step(SETTLE_ACTION)
    policy = _WORKER["policy"]
    act = ScriptedExpert(env).act if policy is None else chunk_actor(*policy)
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


def render_and_write(args, data, task, episodes, num_workers):
    """Render kept episodes in parallel (or not at all) and write them in order as demo_<i>."""
    if args.no_images:
        for i, ep in enumerate(episodes):
            write_demo(data, i, ep)
        return []
    t0, n_frames, videos, kept = time.time(), 0, [], 0
    with make_pool(num_workers, _render_init, (task["name"], args.image_size, not args.no_reflections)) as pool:
        for ep, out in zip(episodes, pool.imap(replay_episode, [(ep["states"], ep["actions"]) for ep in episodes])):
            images = {k: out[k] for k in CAMERAS}
            write_demo(data, kept, ep, images)
            if kept < args.video:
                videos.append((kept, images))
            kept += 1
            n_frames += len(ep["states"]) * len(CAMERAS)
            if not args.quiet:
                print(f"rendered demo {kept}/{len(episodes)}: {len(ep['states'])} steps, "
                      f"{(time.time() - t0) / n_frames:.3f} s/frame over {num_workers} workers", flush=True)
    return videos


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
    with make_pool(num_workers, _rollout_init, (task["name"], args.policy)) as pool:
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
    generator = {"policy": args.policy, "seed": args.seed, "attempts": attempts, "image_size": None if args.no_images else args.image_size}
    if policy is not None:
        ckpt = policy[0]
        generator.update(checkpoint=os.path.abspath(args.policy), kind=ckpt["kind"], iteration=int(ckpt["iteration"]),
                         env_steps=int(ckpt["env_steps"]), eval_success=float(ckpt["eval_success"]), args=ckpt["args"])
    per_demo = [demo_metrics(ep["actions"], ep["ee_pos"]) for ep in kept]
    metrics = summarize_metrics(per_demo, attempts)
    with atomic_h5(out_path) as f:
        data = write_header(f, task, source, generator, None if args.no_images else args.image_size, not args.no_reflections)
        videos = render_and_write(args, data, task, kept, num_workers)
        data.attrs["num_demos"] = len(kept)
        data.attrs["total"] = int(sum(len(ep["actions"]) for ep in kept))
        data.attrs["metrics"] = json.dumps(metrics)
    print(f"wrote {out_path}: {len(kept)} demos, {sum(len(ep['actions']) for ep in kept)} steps, "
          f"episode length {metrics['episode_length']['mean']:.0f} ± {metrics['episode_length']['std']:.0f}")
    write_videos(out_path, task["name"], videos)
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
    size = None if args.no_images else args.image_size
    # replay in a renderer-free env when no images are wanted: still restores every state
    init = _render_init if size else _rollout_init
    initargs = (task["name"], size, not args.no_reflections) if size else (task["name"], "scripted")
    t0 = time.time()
    with make_pool(num_workers, init, initargs) as pool:
        outs = pool.map(replay_episode, [(ep["states"], ep["actions"]) for ep in episodes])
    kept, videos = [], []
    for ep, out in zip(episodes, outs):
        if out.pop("success"):
            model_file = out.pop("model_file")
            ep.update(out)
            ep.setdefault("model_file", model_file)
            kept.append(ep)
    print(f"replayed {len(episodes)} demos in {time.time() - t0:.0f} s: {len(kept)} still succeed")
    if not kept:
        raise UserError(f"no demo of '{args.replay}' succeeds on replay, so no file was written")
    per_demo = [demo_metrics(ep["actions"], ep["ee_pos"]) for ep in kept]
    source = str(attrs.get("source", "human"))
    generator = json.loads(attrs["generator"]) if "generator" in attrs else {"replayed_from": os.path.abspath(args.replay)}
    with atomic_h5(out_path) as f:
        data = write_header(f, task, source, generator, size, not args.no_reflections)
        for i, ep in enumerate(kept):
            images = {k: ep.pop(k) for k in CAMERAS if k in ep} or None
            write_demo(data, i, ep, images)
            if images and i < args.video:
                videos.append((i, images))
        data.attrs["num_demos"] = len(kept)
        data.attrs["total"] = int(sum(len(ep["actions"]) for ep in kept))
        data.attrs["metrics"] = json.dumps(summarize_metrics(per_demo, len(episodes)))
    print(f"wrote {out_path}")
    write_videos(out_path, task["name"], videos)


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
    names = []
    for name in args.table_tasks:
        if name in SUITES:
            names += [f"{name}_{i}" for i in range(90 if name == "libero_90" else 10)]
        else:
            names.append(resolve_task(name)["name"])
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
                       step_limit=SUITES[ep["task"].rpartition("_")[0]], command=table["command"])
            if any("error" in e for e in eps):
                row["error"] = eps[0].get("error")
            table["tasks"][ep["task"]] = row
            table["tasks"] = dict(sorted(table["tasks"].items(), key=lambda kv: (list(SUITES).index(kv[0].rpartition("_")[0]), int(kv[0].rpartition("_")[2]))))
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
    if args.video and args.no_images:
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
