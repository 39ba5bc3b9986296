"""The scripted LIBERO expert: privileged simulator state and the task's BDDL goal -> OSC_POSE actions.

The policy behind `collect_demos.py --policy scripted` (which imports it, as it imports the RL
policy classes from the scripts that train them): no human demonstration and nothing written per
task. It reads the goal (`parsed_problem["goal_state"]`) and works through its predicates:
  On / In        pick and place: a grasp planned from the object's collision geometry (objects
                 narrower than the open gripper across their narrow axis, bowls by the rim, a tilted
                 bowl where its rim is highest, a tall object too wide as a whole (a pot with a handle
                 and a spout) across a strip of it the fingers can span), the candidate whose fingers and hand stay clearest
                 of the other bodies; then above (planned again there if the object has moved),
                 descend, close, lift, carry (closed loop on the object's own position), lower, open.
                 An object too wide for the fingers and too flat to pinch (a plate), bound for a
                 spot on the surface it stands on, is pushed there instead: closed fingers pressed
                 onto its floor push its front rim from inside. Objects bound `On` the same site are
                 spread over it.
  Open / Close   drawers and doors, and TurnOn / TurnOff for stove knobs: the joint behind the goal,
                 its axis and LIBERO's articulation ranges are read from the model; a handle (what
                 sticks out furthest along the part's travel) is pulled with a level hand that
                 follows the joint, or the moving part is pushed with closed fingers, until LIBERO's
                 own predicate holds (a drawer halfway into its goal range, so that it stays there).
                 A drawer near the table, whose handle leaves no room for the hand's width, is worked
                 with the hand pointing down and leaning in: pulled by closed fingers pressed on the
                 handle's top, pushed by their tips.
Closing what nothing is put into comes first, then opening and switching, then the placements,
then the remaining closing; an `In` into a closed drawer opens it first, and what is to go into a
drawer but stands where the drawer opens is first set aside. Success per task from
fresh placements: docs/results/scripted_expert.json (`python collect_demos.py --scripted-table ...`).

    expert = ScriptedExpert(env)          # a LIBERO ControlEnv after reset and the settle steps
    action = expert.act(obs)              # (7,) in [-1, 1], once per control step

Frames: world frame, metres; rotations as 3x3 matrices, robosuite's (x, y, z, w) quaternions in
observations. Action = (dx, dy, dz, axis-angle rotation, gripper), 1 = the OSC's largest step.
"""

import logging

import numpy as np

# robosuite warns about a missing private macro file at every import, in every worker
logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())
import robosuite.utils.transform_utils as T  # noqa: E402 (after the filter above)


def rotz(a):
    return T.euler2mat(np.array([0.0, 0.0, a]))


def axisangle(R):
    """The rotation R as axis * angle, angle in [0, pi]."""
    return T.quat2axisangle(T.mat2quat(R))


# ---------------------------------------------------------------------------------------
# THE EXPERT: privileged state + BDDL goal -> OSC_POSE actions
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
    TILTED = 0.01  # a bowl whose rim heights differ by more than this (metres) rests tilted
    LIP_INSET = 0.011  # grasp this far inside the highest points of a tilted bowl's rim
    POS_GAIN = 12.0  # action per metre of error (action 1 = 5 cm OSC step)
    LOW_TILT = 0.36  # a hand working a handle within 8 cm of the table points down by atan(0.36) = 20 degrees
    LOW_DRAWER = 0.08  # a handle this close above its object's foot is near the table: for a drawer, no room for the hand's width
    LEAN = 0.5  # a hand working such a drawer points down, leaning this far (radians) towards the cabinet
    PRESS_DZ = 0.012  # closed fingers pulling a handle by friction are driven this far into its top
    TALL = 0.06  # an object taller than this and too wide as a whole is grasped across a part of it (a pot's body)
    FINGER_HALF = 0.011  # half a finger's width across the closing direction
    ELONGATED = 1.5  # a footprint this many times longer than wide is turned to fit an 'in' region
    SLOT_CLEAR = 0.03  # an object whose footprint comes closer than this to filling an 'in' region is fitted into it
    HELD_RISE = 0.02  # an object this far above where it rested at the plan is held, however shut the fingers
    SHARE_INSET = 0.025  # objects sharing a target site are spread to this far inside its edges
    FLAT = 0.03  # an object lower than this (a plate) and too wide for the fingers is pushed, not lifted
    PUSH_DZ = -0.01  # pushing fingers aim below the pushed object's bottom: they press its floor down, so it does not ride up onto what it meets
    PUSH_INSET = 0.025  # and at this far inside its front rim
    PUSH_LEAD = 0.05  # plus this much further on, so they keep pressing
    STAGE_CLEAR = 0.06  # an object this close to where a drawer will be once open is first set aside this far from it
    GRASP_YAWS = np.radians([15, 25])  # a grasp across a side may also turn the hand this far either way ...
    YAW_COST = 0.01  # ... when that gains this much clearance (m) from the other bodies, or any where all else collides
    TURN_COST = 0.01  # preference per radian of hand turn, when a grasp is planned again on the way (a settling bowl)
    KNOB_ROOM = 0.02  # a knob is pushed where the closed fingers' start keeps this much room from the rest of the object
    KNOB_DZ = 0.008  # and this far below the top of the part pushed
    FINGERTIP_DZ = 0.01  # the fingertips reach this far below the hand's reference point
    PUSH_BACKOFF = 0.03  # closed fingers pushing a drawer, door or knob start this far behind the face they push
    PATH_CLEAR = 0.06  # the hand on its way to a grasp passes this far above what stands within this far of its path
    FLYING = 0.3  # an object moving faster than this (m/s) at the start (falling, not settling) is waited for, up to MAX_WAIT steps
    MAX_WAIT = 60
    OFF_CENTRE = 0.02  # a rim-grasped object whose origin lies this far from its footprint's middle has a handle
    SLOW_ABOVE = 0.06  # lowering to the release height slows down within this much of it
    ORDER = {"open": 0, "turnon": 0, "turnoff": 0, "on": 1, "in": 1, "close": 2}

    def __init__(self, env, variety=0.0, rng=None):
        """variety > 0 varies the motion per episode, drawn from `rng`: the speed (gain and top speed),
        the height above the grasp, the carrying height and a sideways bend of the carry; 1 draws
        gain x0.6-1.4, top speed x0.6-1, +-2-4 cm heights and a bend of std 4 cm."""
        self.env = env.env
        rng = rng if variety else np.random.default_rng(0)  # without variety every draw is scaled to 0
        self.gain = self.POS_GAIN * (1.0 + variety * rng.uniform(-0.4, 0.4))
        self.top_speed = 1.0 + variety * rng.uniform(-0.4, 0.0)
        self.above_dz = 0.08 + variety * rng.uniform(-0.02, 0.04)
        self.carry_dz = variety * rng.uniform(0.0, 0.04)
        self.bend = variety * rng.normal(0.0, 0.04)
        goals = [tuple(pred) for pred in self.env.parsed_problem["goal_state"]]
        for pred in goals:
            if pred[0] not in self.ORDER:
                raise UnsupportedGoal(f"the scripted expert cannot do the predicate '{pred[0]}' in goal {list(pred)}")
        filled = {g[-1] for g in goals if g[0] == "in"}  # a region, and the object it belongs to (microwave_1_heating_region: microwave_1)
        filled |= {getattr(self.env.object_sites_dict.get(t), "parent_name", t) for t in filled}
        # stable: BDDL order within a kind; a close with nothing to put inside goes first (an open drawer sticks out into the way)
        self.goals = sorted(goals, key=lambda g: -1 if g[0] == "close" and g[-1] not in filled else self.ORDER[g[0]])
        m = self.env.sim.model._model
        self.m, self.d = m, self.env.sim.data._data
        self.goal_idx, self.phase, self.t_phase = 0, "plan", 0
        self.art_tries = {}  # goal index -> articulated attempts so far
        self.t_wait = 0  # steps held still at the start, waiting for thrown objects to come down
        self.staged = set()  # drawers whose contents-to-be were checked for being in the drawer's way
        self.spread_axis = {}  # target site -> the axis along which the objects sharing it are spread

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

    def _others_points(self, obj):
        """Collision-geometry points of every object but `obj`."""
        return np.concatenate([self._points(n) for n in self.env.obj_body_id if n != obj])

    def _drawer_sweep(self, region):
        """xy box (lo, hi) that a drawer's moving part covers from where it is to fully open, or None
        for a door or a knob."""
        joint, parent = articulated_joint(self.env, region)
        jid = self.m.joint(joint).id
        if self.m.jnt_type[jid] != 2:
            return None
        ranges = self.env.get_object(parent).object_properties["articulation"]
        q_open = max(ranges["default_open_ranges"], key=lambda g: abs(g - np.mean(ranges["default_close_ranges"])))
        pts = self._body_points(int(self.m.jnt_bodyid[jid]))
        travel = self.d.xaxis[jid] * (q_open - self.d.qpos[self.m.jnt_qposadr[jid]])
        xy = np.concatenate([pts, pts + travel])[:, :2]
        return xy.min(0), xy.max(0)

    @staticmethod
    def _box_gap(lo, hi, box):
        """Horizontal distance between the xy box (lo, hi) and box = (lo, hi); 0 where they overlap."""
        return float(np.linalg.norm(np.maximum(np.maximum(box[0] - hi, lo - box[1]), 0.0)))

    def _stage_spot(self, obj, box):
        """Where to set `obj` down on its own surface so that its footprint keeps STAGE_CLEAR from the
        drawer's sweep `box` and 3 cm from every other object: the nearest such spot (of 16 directions
        and 8-20 cm), the clearest of equals; None if there is none."""
        pts = self._points(obj)
        lo, hi = pts[:, :2].min(0), pts[:, :2].max(0)
        others = self._others_points(obj)
        others = others[others[:, 2] > pts[:, 2].min() + 0.005][:, :2]  # what stands on the table, not the table
        for dist in (0.08, 0.12, 0.16, 0.20):
            best, best_gap = None, 0.03
            for ang in np.linspace(0, 2 * np.pi, 16, endpoint=False):
                off = dist * np.array([np.cos(ang), np.sin(ang)])
                if self._box_gap(lo + off, hi + off, box) < self.STAGE_CLEAR:
                    continue
                gap = np.linalg.norm(np.maximum(np.maximum(lo + off - others, others - hi - off), 0.0), axis=1).min()
                if gap >= best_gap:
                    best, best_gap = off, gap
            if best is not None:
                return self.d.xpos[self.env.obj_body_id[obj]][:2] + best
        return None

    def _set_aside_first(self, region):
        """Before drawer `region` is opened: what is to go into it but stands where the open drawer will be
        (under or against it, where the hand cannot get down to it past the drawer) is first set aside."""
        box = self._drawer_sweep(region)
        inside = [g[1] for g in self.goals[self.goal_idx + 1:] if g[0] == "in" and g[2] == region]
        if box is None or not inside:
            return
        pts = self._points(inside[0])
        if self._box_gap(pts[:, :2].min(0), pts[:, :2].max(0), box) < self.STAGE_CLEAR:
            spot = self._stage_spot(inside[0], box)
            if spot is not None:
                self.stage_xy = spot
                self.goals.insert(self.goal_idx, ("stage", inside[0], region))

    def _site(self, name):
        site = self.env.object_sites_dict[name]
        pos = self.env.sim.data.get_site_xpos(name).copy()
        size = np.asarray(getattr(site, "size", [0.02, 0.02, 0.01]), dtype=np.float64)
        return pos, size

    def _plan_goal(self, obs, keep_R=None):
        """Grasp pose for the object and place pose over the target, from the current state. When planning
        again on the way (keep_R: the hand's planned orientation), a grasp that turns the hand less wins ties."""
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
        side_z = max(hi_z - 0.035, lo_z + 0.5 * (hi_z - lo_z))  # fingertips for a grasp across the sides
        for k in range(2):
            if widths[k] < self.GRIPPER_SPAN:  # fingers close across axis k; slide along the other
                reach = max(widths[1 - k] / 2 - 0.01, 0.0)
                # the hand turned a little about the vertical, where the object still fits between the fingers:
                # its ends swing clear of tall neighbours at both of a small box's sides (libero_10_1's cream cheese)
                for yaw in (0.0, *self.GRASP_YAWS, *-self.GRASP_YAWS):
                    axis, other = (rotz(yaw)[:2, :2] @ vecs[:, [k, 1 - k]]).T  # the two axes, turned
                    if yaw and np.ptp(xy @ axis) >= self.GRIPPER_SPAN:
                        continue
                    for s in np.linspace(-1, 1, 9) * reach:
                        pen = 0.2 * abs(s) + 0.002 * k + (self.YAW_COST if yaw else 0.0)
                        cands.append((np.array([*(center_xy + s * other), side_z]), axis, pen))
        if not cands and hi_z - lo_z > self.TALL:  # tall, and too wide as a whole (a pot with a handle and a spout)
            cands = self._strip_grasps(obj, center_xy, vecs, side_z)
        # too wide to span and too flat to pinch (a plate), with a spot on the table as the target: push it there
        stage = self._pred() == "stage"
        spot = None if cands or stage or target in self.env.obj_body_id else self._site(target)[0]
        self.push = spot is not None and hi_z - lo_z < self.FLAT and abs(spot[2] - lo_z) < self.FLAT  # on its own surface
        if self.push:
            self._plan_push(pts, center_xy, spot[:2])
            return
        if not cands:  # too wide to span (a bowl): pinch the rim, preferably on the robot's side
            # the rim's middle: a pan's handle pulls its footprint's middle off the pan's own, and a pinch
            # aimed from there crosses the wall aslant, where two of its segments meet (libero_90_45)
            origin = self.d.xpos[self.env.obj_body_id[obj]][:2]
            mid = origin if np.linalg.norm(origin - center_xy) > self.OFF_CENTRE else center_xy
            rxy = pts[:, :2] - mid
            rims = []
            for ang in np.linspace(0, 2 * np.pi, 16, endpoint=False):
                u = np.array([np.cos(ang), np.sin(ang)])
                rim_xy = mid + u * (np.max(rxy @ u) - 0.012)  # the rim may be tilted: measure it
                near = pts[np.linalg.norm(pts[:, :2] - rim_xy, axis=1) < 0.02]
                rims.append((u, rim_xy, near[:, 2].max() if len(near) else hi_z))
            if np.ptp([r[2] for r in rims]) > self.TILTED:
                # resting tilted (a bowl on a ramekin): seen from above, the low side's wall sticks out past
                # its rim, so take each direction's rim where the bowl is highest along it
                radius = np.linalg.norm(rxy, axis=1)
                for i, (u, _, _) in enumerate(rims):
                    sector = pts[(rxy @ u > np.cos(0.25) * radius) & (radius > 0.5 * radius.max())]
                    if not len(sector):  # nothing of it out that way (a pan, whose handle sets the radius)
                        continue
                    lip = sector[sector[:, 2] > sector[:, 2].max() - 0.004]
                    rims[i] = (u, mid + u * (((lip[:, :2] - mid) @ u).mean() - self.LIP_INSET), sector[:, 2].max())
            for u, rim_xy, rim_top in rims:
                pen = 0.005 * (1 + u[0])  # u = (-1, 0) points at the robot base
                cands.append((np.array([*rim_xy, rim_top - 0.02]), u, pen))
        # keep the open fingers (and the hand above them) clear of every other body
        others = self._others_points(obj)

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

        def turn(u):  # radians between a candidate's hand orientation and keep_R
            return 0.0 if keep_R is None else float(np.linalg.norm(axisangle(self._finger_axis_R(u) @ keep_R.T)))

        def preference(c):  # a grasp the hand reaches without touching another body first, then clearance against cost
            clear = clearance(c[0], c[1])
            return clear > 0, min(clear, 0.03) - c[2] - self.TURN_COST * turn(c[1])

        grasp, close_dir, _ = max(cands, key=preference)
        self.R_grasp = self.R_place = self._finger_axis_R(close_dir)
        self.grasp = grasp
        self.obj_at_plan = self.d.xpos[self.env.obj_body_id[obj]].copy()
        self.obj_bottom_below_grasp = grasp[2] - lo_z
        # target: a spot on the object's own surface (set aside), a body (plate, bowl) or a region site (basket_1_contain_region, stove...)
        if stage:
            self.place_xy, surface, target_hi = self.stage_xy, lo_z, lo_z
        elif target in self.env.obj_body_id:
            tp = self._points(target)
            self.place_xy = self.env.sim.data.body_xpos[self.env.obj_body_id[target]][:2].copy()
            surface = tp[:, 2].max()
            target_hi = surface
        else:
            pos, size = self._site(target)
            self.place_xy = pos[:2] + self._share_offset(target, size)
            if self._pred() == "in":
                self._fit_slot(obj, target, pos, size, center_xy, vecs, widths)
            parent = target.split("_")[0] + "_" + target.split("_")[1]
            parent_hi = self._points(parent)[:, 2].max() if parent in self.env.obj_body_id else pos[2]
            target_hi = max(parent_hi, pos[2] + size[2])
            # 'in' a container: let go a little above its floor; 'on' a site: just above it
            surface = pos[2] - size[2] if self.goals and self._pred() == "in" else pos[2]
        self.release_z = surface + 0.015 + self.obj_bottom_below_grasp
        self.carry_z = max(target_hi, hi_z) + 0.06 + self.carry_dz + self.obj_bottom_below_grasp

    def _fit_slot(self, obj, target, pos, size, center_xy, vecs, widths):
        """An object that nearly fills or overfills an `in` region's footprint as it stands (a book across a
        caddy's slot, or aslant in its bin) is turned, while carried, to lie along one of the sides of the
        space the region's walls leave, with its footprint, not its origin, centred in that space (the
        origin, which LIBERO tests, stays inside the region)."""
        R = self.env.sim.data.get_site_xmat(target)
        flat = [i for i in range(3) if abs(R[2, i]) < 0.5]  # the site's horizontal axes
        if len(flat) != 2:
            return
        axes = R[:2, flat].T  # (2, 2): one horizontal axis of the site per row
        centre, room = self._walled_space(target, pos, R, size, flat)
        extent = np.abs(axes @ vecs) @ np.asarray(widths)  # the object's footprint along each of the site's axes
        if np.all(extent <= room - self.SLOT_CLEAR) or max(widths) < self.ELONGATED * min(widths):
            return  # it fits as it stands, or its footprint is round (a bowl), which turning does not change
        long_k = int(np.argmax(widths))
        obj_yaw = np.arctan2(vecs[1, long_k], vecs[0, long_k])
        grasp_yaw = axisangle(self.R_grasp @ self.R0.T)[2]
        turns = []
        for j in range(2):  # the object's long side along the site's axis j, its short side along the other
            if max(widths) <= room[j] and min(widths) <= room[1 - j]:
                t = (np.arctan2(axes[j, 1], axes[j, 0]) - obj_yaw + np.pi / 2) % np.pi - np.pi / 2  # the footprint is alike turned by pi
                turns += [t, t + np.pi, t - np.pi]
        if not turns:  # it never fits: place it as it is
            return
        turn = min(turns, key=lambda t: abs(t) + self._wrist_penalty(grasp_yaw + t))
        self.R_place = rotz(turn) @ self.R_grasp
        origin_from_centre = self.d.xpos[self.env.obj_body_id[obj]][:2] - center_xy
        offset = axes @ (centre + rotz(turn)[:2, :2] @ origin_from_centre - pos[:2])  # along the site's axes
        self.place_xy = pos[:2] + axes.T @ np.clip(offset, 0.01 - size[flat], size[flat] - 0.01)  # the origin inside the region

    def _walled_space(self, target, pos, R, size, flat):
        """World xy centre and widths (along the site's horizontal axes) of the space that the walls of
        the region's own object leave around the region's centre: a wall is a collision geom of that
        object rising above the region's floor and beside its middle; without one, the region's edge."""
        parent = getattr(self.env.object_sites_dict.get(target), "parent_name", None)
        lo, hi = np.full(2, -np.inf), np.full(2, np.inf)
        if parent in self.env.obj_body_id:
            up = 3 - sum(flat)  # the site's vertical axis
            floor = -size[up] + 0.02
            pts, owner = self._body_points(self.env.obj_body_id[parent], with_geoms=True)
            local = (pts - pos) @ R  # site frame
            sign = np.sign(R[2, up])  # the vertical axis may point down
            for g in np.unique(owner):
                q = local[owner == g]
                if (sign * q[:, up]).max() < floor:  # part of the floor
                    continue
                for a in range(2):
                    half, half_b = size[flat[a]], size[flat[1 - a]]
                    qa, qb = q[:, flat[a]], q[:, flat[1 - a]]
                    if qb.max() < -half_b / 2 or qb.min() > half_b / 2:  # not beside the middle
                        continue
                    if -2 * half < qa.max() <= 0:
                        lo[a] = max(lo[a], qa.max())
                    elif 0 <= qa.min() < 2 * half:
                        hi[a] = min(hi[a], qa.min())
        lo = np.where(np.isfinite(lo), lo, -size[flat])  # no wall on that side: the region's edge
        hi = np.where(np.isfinite(hi), hi, size[flat])
        mid = (lo + hi) / 2
        return pos[:2] + R[:2, flat] @ mid, hi - lo

    def _strip_grasps(self, obj, center_xy, vecs, z):
        """Grasps of an object too wide as a whole, across a strip of it the fingers can span: the open
        fingers (FINGER_HALF either side of the grasp, plus a margin) sweep a strip as they close, and
        every part of the object that reaches into the strip, at any height, must lie between them."""
        pts, owner = self._body_points(self.env.obj_body_id[obj], with_geoms=True)
        xy = pts[:, :2] - center_xy
        geoms = [xy[owner == g] for g in np.unique(owner)]
        cands = []
        for k in range(2):
            axis, other = vecs[:, k], vecs[:, 1 - k]
            spans = np.array([[(p @ axis).min(), (p @ axis).max(), (p @ other).min(), (p @ other).max()] for p in geoms])
            half = self.FINGER_HALF + 0.002
            for s in np.linspace(spans[:, 2].min() + half, spans[:, 3].max() - half, 17):
                swept = spans[(spans[:, 3] > s - half) & (spans[:, 2] < s + half)]
                lo, hi = swept[:, 0].min(), swept[:, 1].max()
                if hi - lo < self.GRIPPER_SPAN:
                    cands.append((np.array([*(center_xy + s * other + (lo + hi) / 2 * axis), z]), axis, 0.2 * abs(s) + 0.002 * k))
        return cands

    def _share_offset(self, target, size):
        """Offset from a site's centre for this goal's object when several objects go `On` the same site
        (two pots on one stove): spread along the world axis across which the objects are narrowest,
        SHARE_INSET inside the site's edges (LIBERO tests each object's origin against the site's box)."""
        sharing = [g for g in self.goals if g[0] == "on" and g[-1] == target]
        if len(sharing) < 2:
            return np.zeros(2)
        if target not in self.spread_axis:
            extent = sum(np.ptp(self._points(g[1])[:, :2], axis=0) for g in sharing)
            self.spread_axis[target] = int(np.argmin(extent))
        k = self.spread_axis[target]
        half = max(size[k] - self.SHARE_INSET, 0.0)
        offset = np.zeros(2)
        offset[k] = np.linspace(-half, half, len(sharing))[sharing.index(self.goals[self.goal_idx])]
        return offset

    def _finger_axis_R(self, direction):
        """Hand pointing down (R0) with the finger axis (gripper y) along the horizontal `direction`. The
        fingers are symmetric, so yaw and yaw +- pi are alike: take the smaller turn that keeps the wrist
        joint (which turns by about -yaw, limit +-2.9 rad) well inside its range."""
        yaw = np.arctan2(direction[1], direction[0]) - np.pi / 2
        yaw = (yaw + np.pi / 2) % np.pi - np.pi / 2
        yaw = min((yaw, yaw + np.pi, yaw - np.pi), key=lambda y: abs(y) + self._wrist_penalty(y))
        return rotz(yaw) @ self.R0

    def _wrist_penalty(self, yaw):
        """Cost of a hand turned by `yaw` from R0: the wrist joint ends near wrist0 - yaw, kept 0.9 rad
        inside its +-2.9 rad limit."""
        return 10 * max(abs(self.wrist0 - yaw) - 2.0, 0.0)

    def _plan_push(self, pts, center_xy, place_xy):
        """A flat object too wide to grasp (a plate) is pushed across the table: the closed fingers go
        down onto its middle (where the hand keeps clear of what stands around it), the hand lined up
        with the line from there to the target site (narrow across the way), and push its front rim
        from inside until it is there."""
        self.push_radius = np.linalg.norm(pts[:, :2] - center_xy, axis=1).max()
        self.place_xy = place_xy
        self.push_z = pts[:, 2].min() + self.PUSH_DZ
        self.R_grasp = self.R_place = self._finger_axis_R(place_xy - center_xy)  # the hand's long side along the push
        self.grasp = np.array([*center_xy, self.push_z])
        self.carry_z = pts[:, 2].max() + 0.06

    def _act_push(self, obs, stalled):
        obj = self.goals[self.goal_idx][1]
        obj_xy = self.d.xpos[self.env.obj_body_id[obj]][:2]
        to_go = self.place_xy - obj_xy
        u = to_go / max(np.linalg.norm(to_go), 1e-9)
        g, ph = self.grasp, self.phase
        if ph == "push_above":
            a, err = self._move(obs, np.array([g[0], g[1], g[2] + self.above_dz]), self.R_grasp, 1)
            if err < 0.01 or self.t_phase > 80:
                self.phase, self.t_phase = "push_down", 0
        elif ph == "push_down":
            a, err = self._move(obs, g, self.R_grasp, 1, max_speed=0.5)
            if err < 0.006 or stalled or self.t_phase > 40:
                self.phase, self.t_phase = "push", 0
        elif ph == "push":
            xy = obj_xy + u * (self.push_radius - self.PUSH_INSET + self.PUSH_LEAD)
            a, _ = self._move(obs, np.array([xy[0], xy[1], self.push_z]), self.R_grasp, 1, max_speed=0.6)
            if np.linalg.norm(to_go) < 0.01 or self.t_phase > 150:
                self.phase, self.t_phase = "retreat", 0
        return a

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
        the same way. A drawer near the table (its handle between the table and the drawer above, too
        little room for the hand's 20 cm across the fingers) is worked with the hand pointing down and
        leaning in, fingers closed: pulled by pressing on the handle's top, pushed by the fingertips;
        so is a drawer a level grasp failed to open. Doors and knobs are pushed from above with closed
        fingers: a door that the first pull left ajar (the arm cannot follow its handle all the way
        round) is pushed open from the inside."""
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
        whole, whole_owner = self._body_points(self.env.obj_body_id[parent], with_geoms=True)  # the part's whole object
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
        elif pred in ("turnon", "turnoff") and tries > 1:  # a knob the first push did not turn: where the fingers have room
            point = self._knob_point(pts, owner, vel, speed, whole, whole_owner)
            upright = False
        else:  # push the face that leads the travel, where the part moves fastest
            far = pts[fast]
            back = far[far[:, :2] @ u <= (far[:, :2] @ u).min() + 0.01]
            point = (back.min(0) + back.max(0)) / 2
            upright = False
        R, x = d.xmat[body].reshape(3, 3), d.xpos[body]
        # a drawer let go just past the goal range's edge slides back out of it: move it halfway into the range
        edge = goal_range[np.argmin([abs(g - np.mean(other_range)) for g in goal_range])]
        deep = edge + sign * 0.5 * abs(goal_range[1] - goal_range[0]) if slide else None
        self.art = dict(jid=jid, qadr=m.jnt_qposadr[jid], body=body, slide=slide, sign=sign, pull=pull, deep=deep,
                        local=R.T @ (point - x), q0=float(d.qpos[m.jnt_qposadr[jid]]))
        p, v = self._joint_point()
        near_table = p[2] - whole[:, 2].min() < self.LOW_DRAWER
        low = slide and near_table
        # a drawer's bar too low for the hand's width across it (between the table and the drawer above), or one a
        # level grasp failed to move far enough: the closed fingers press on the bar's top and pull by friction
        self.art["press"] = press = slide and pull and not upright and (low or tries > 1)
        if low or press:  # the hand points down, leaning into the part: against the pull, along the push
            w = (-v if pull else v) * np.sin(self.LEAN) + np.array([0.0, 0.0, -np.cos(self.LEAN)])
            # closed fingers push with either finger direction: take the one nearer the hand as it is (after a
            # placement the hand is turned; the start's put the wrist, joint 6, on its limit in libero_10_3)
            hand = None if pull else T.quat2mat(obs["robot0_eef_quat"])
            self.R_art = self._level_R(w, fingers_vertical=False, ref=hand)
            self.art["start"] = np.array([*p[:2], handle[:, 2].max() + 0.004]) if press else p - v * self.PUSH_BACKOFF
        elif slide or pull:  # the hand points into the part: against the pull, along the push
            w = -v if pull else v
            if near_table:  # a door's handle near the table: tilt the hand down so the palm clears it
                w = (w + np.array([0.0, 0.0, -self.LOW_TILT])) / np.sqrt(1 + self.LOW_TILT**2)
            self.R_art = self._level_R(w, fingers_vertical=pull and not upright)
            self.art["start"] = p if pull else p - w * self.PUSH_BACKOFF
        else:
            w = np.array([0.0, 0.0, -1.0])
            # closed fingers push alike either way round: again, the turn nearer the hand as it is (after a first
            # push, the start's yaw plus the part's can take the wrist, joint 6, to its limit)
            yaws = np.arctan2(v[1], v[0]) + np.array([0.0, np.pi if tries > 1 else 0.0])
            hand = T.quat2mat(obs["robot0_eef_quat"])
            self.R_art = min((rotz(y) @ self.R0 for y in yaws), key=lambda Rc: np.linalg.norm(axisangle(Rc @ hand.T)))
            self.art["start"] = p - v * self.PUSH_BACKOFF
        self.art["approach"] = self.art["start"] - w * 0.08
        # come in from above the whole object (an open drawer or door sticks out into the way)
        self.art["high"] = np.array([*self.art["approach"][:2], max(self.art["approach"][2], whole[:, 2].max() + 0.05)])

    def _knob_point(self, pts, owner, vel, speed, whole, whole_owner):
        """Where closed fingers push a knob round when a push at its fastest face did not turn it (the
        fingers landed on the fixed plate beside it): of the knob's geoms out near its rim (the arms of a
        star, a grip bar), the trailing face of the one whose push start, PUSH_BACKOFF behind it, keeps the
        most room (up to KNOB_ROOM) from every other geom of the whole object (points `whole` of geoms
        `whole_owner`) that reaches up to the fingertips; the fastest of equals. The fingers push just below
        that geom's top, clear of what is lower."""
        m, d = self.m, self.d

        def gap(xy, g):  # horizontal distance from the vertical line through xy to geom g's box
            R, c, h = d.geom_xmat[g].reshape(3, 3), m.geom_aabb[g, :3], m.geom_aabb[g, 3:]
            local = R.T @ (np.array([*xy, d.geom_xpos[g][2]]) - d.geom_xpos[g]) - c
            return float(np.linalg.norm(np.maximum(np.abs(local[:2]) - h[:2], 0.0)))

        tops = {g: whole[whole_owner == g, 2].max() for g in np.unique(whole_owner)}
        best, best_key = None, None
        for g in np.unique(owner[speed >= 0.5 * speed.max()]):
            sel = owner == g
            i = np.flatnonzero(sel)[np.argmax(speed[sel])]
            u = vel[i, :2] / max(speed[i], 1e-9)
            arm = pts[sel]
            back = arm[arm[:, :2] @ u <= (arm[:, :2] @ u).min() + 0.01]
            point = np.array([*(back[:, :2].min(0) + back[:, :2].max(0)) / 2, tops[g] - self.KNOB_DZ])
            start = point[:2] - u * self.PUSH_BACKOFF
            room = min([gap(start, h) for h in tops if h != g and tops[h] > point[2] - self.FINGERTIP_DZ], default=1.0)
            key = (min(room, self.KNOB_ROOM), speed[i])
            if best_key is None or key > best_key:
                best, best_key = point, key
        return best

    def _level_R(self, w, fingers_vertical, ref=None):
        """Hand orientation pointing along `w` (level, or tilted down), fingers closing in the vertical
        plane through `w` or level across it; of the two finger directions, the one nearer the start's
        (or nearer `ref`)."""
        z = w / np.linalg.norm(w)
        across = np.cross([0.0, 0.0, 1.0], z)
        across /= np.linalg.norm(across)
        y = np.cross(z, across) if fingers_vertical else across
        cands = [np.column_stack([np.cross(s * y, z), s * y, z]) for s in (1.0, -1.0)]
        ref = self.R0 if ref is None else ref
        return min(cands, key=lambda Rc: np.linalg.norm(axisangle(Rc @ ref.T)))

    def _art_done(self):
        return bool(self.env._eval_predicate(list(self.goals[self.goal_idx])))

    def _act_articulated(self, obs, stalled):
        a, ph = self.art, self.phase
        p, v = self._joint_point()
        turn = 0.0 if a["slide"] else float(self.d.qpos[a["qadr"]] - a["q0"])
        R = T.quat2mat(T.axisangle2quat(self.d.xaxis[a["jid"]] * turn)) @ self.R_art  # the hand turns with a door
        grip = 1
        if a["pull"] and not a["press"] and ph in ("art_high", "art_above", "art_descend"):  # open just wider than a handle bar
            gap = obs["robot0_gripper_qpos"][0] - 0.018  # each finger's travel from closed, metres
            grip = 0.0 if abs(gap) < 0.002 else float(np.sign(gap))
        if ph == "art_high":
            act, err = self._move(obs, a["high"], R, grip)
            if err < 0.02 or self.t_phase > 60:
                self.phase, self.t_phase = "art_above", 0
        elif ph == "art_above":
            act, err = self._move(obs, a["approach"], R, grip)
            if err < 0.01 or stalled or self.t_phase > 60:
                self.phase, self.t_phase = "art_descend", 0
        elif ph == "art_descend":
            act, err = self._move(obs, a["start"], R, grip, max_speed=0.5)
            if err < 0.006 or stalled or self.t_phase > 40:
                self.phase, self.t_phase = ("art_grasp" if a["pull"] else "art_move"), 0
        elif ph == "art_grasp":
            act, _ = self._move(obs, a["start"], R, 1)
            if self.t_phase > 10:
                self.phase, self.t_phase = "art_move", 0
                R_body = self.d.xmat[a["body"]].reshape(3, 3)
                self.art["offset"] = R_body.T @ (obs["robot0_eef_pos"] - p)  # where the hand holds the handle, in the part's frame
        elif ph == "art_move":
            held = p + self.d.xmat[a["body"]].reshape(3, 3) @ a["offset"] if a["pull"] else p - v * 0.005
            if a["press"]:
                held = held - np.array([0.0, 0.0, self.PRESS_DZ])
            act, _ = self._move(obs, held + v * 0.04, R, grip)
            q = float(self.d.qpos[a["qadr"]])
            stuck = self.t_phase % 10 == 0 and abs(q - a["q_mark"]) < 0.005  # no progress in 10 steps: let go, re-plan
            if self.t_phase == 1 or self.t_phase % 10 == 0:
                a["q_mark"] = q
            deep = a["deep"] is None or a["sign"] * (q - a["deep"]) >= 0
            if (self._art_done() and deep) or stuck or self.t_phase > 150:
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
            # off a door's handle, straight up first as it is: turning there swings the fingers into the door and shuts it again
            rising_off_door = not a["slide"] and a["pull"] and obs["robot0_eef_pos"][2] < a["high"][2] - 0.03
            act, err = self._move(obs, a["home"], R if rising_off_door else self.R0, -1, max_speed=0.5)
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
        a[:3] = np.clip(pos_err * self.gain, -max_speed * self.top_speed, max_speed * self.top_speed)
        rot_err = axisangle(R_target @ T.quat2mat(obs["robot0_eef_quat"]).T)
        a[3:6] = np.clip(rot_err * 3.0, -1.0, 1.0)
        a[6] = gripper
        # one error in metres and radians: a phase ends only once the yaw has turned as well
        return a, max(np.linalg.norm(pos_err), 0.1 * np.linalg.norm(rot_err))

    def _closed_on_nothing(self, obs):
        """The fingers shut with nothing between them while lifting or carrying: start a re-grasp. Nearly
        shut fingers can still hold a bowl's thin rim, so the object must also have stayed down."""
        if np.ptp(obs["robot0_gripper_qpos"]) >= 0.004 or self.t_phase <= 3:
            return False
        if self.d.xpos[self.env.obj_body_id[self.goals[self.goal_idx][1]]][2] > self.obj_at_plan[2] + self.HELD_RISE:
            return False
        self.phase, self.t_phase = "regrasp", 0
        self.obj_last = np.full(3, np.inf)
        return True

    def _place_eef_xy(self, obs):
        """Closed loop on the held object: move the gripper so the object's body is over the target."""
        obj = self.goals[self.goal_idx][1]
        obj_xy = self.env.sim.data.body_xpos[self.env.obj_body_id[obj]][:2]
        return obs["robot0_eef_pos"][:2] + (self.place_xy - obj_xy)

    def _pass_over_z(self, start, end):
        """Height for the hand to pass over every object within PATH_CLEAR of the straight path from xy
        `start` to xy `end` (not counting what stands within PATH_CLEAR of `end`: the grasp's own approach
        comes down there), PATH_CLEAR above the highest of them; 0 if none."""
        pts = np.concatenate([self._points(n) for n in self.env.obj_body_id])
        path = end - start
        f = np.clip((pts[:, :2] - start) @ path / max(path @ path, 1e-9), 0.0, 1.0)
        near = np.linalg.norm(pts[:, :2] - (start + f[:, None] * path), axis=1) < self.PATH_CLEAR
        near &= np.linalg.norm(pts[:, :2] - end, axis=1) > self.PATH_CLEAR
        return float(pts[near, 2].max() + self.PATH_CLEAR) if near.any() else 0.0

    def _flying(self):
        """Whether a free object still moves faster than FLYING (m/s): some placements start objects
        (libero_10_1's milk and ketchup) in contact with the table, which throws them up at the first step."""
        m, d = self.m, self.d
        free = np.flatnonzero(m.jnt_type == 0)
        return any(np.linalg.norm(d.qvel[m.jnt_dofadr[j]: m.jnt_dofadr[j] + 3]) > self.FLYING for j in free)

    def act(self, obs):
        if self.phase == "plan" and not hasattr(self, "R0") and self.t_wait < self.MAX_WAIT and self._flying():
            self.t_wait += 1  # plan once everything has come down
            return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
        if self.phase == "plan":
            if not hasattr(self, "R0"):
                self.R0 = T.quat2mat(obs["robot0_eef_quat"])
                self.wrist0 = obs["robot0_joint_pos"][6]
            target = self.goals[self.goal_idx][-1]
            site = self.env.object_sites_dict.get(target)
            if self._pred() == "in" and getattr(site, "joints", None) and not self.env._eval_predicate(["open", target]):
                self.goals.insert(self.goal_idx, ("open", target))  # a closed drawer is opened first
            if self._pred() == "open" and target not in self.staged:
                self.staged.add(target)
                self._set_aside_first(target)
            if self._pred() in self.ART_RANGES:
                self._plan_articulated(obs)
                self.phase, self.t_phase = "art_high", 0
            else:
                self._plan_goal(obs)
                self.phase, self.t_phase, self.replans = "push_above" if self.push else "above", 0, 0
        self.t_phase += 1
        self.trail = ([] if self.t_phase == 1 else self.trail[-5:]) + [obs["robot0_eef_pos"].copy()]
        # blocked by contact (a finger on a rim, the object on the target, the hand on a knob): stop waiting
        stalled = self.t_phase > 8 and np.linalg.norm(self.trail[-1] - self.trail[0]) < 0.002
        if self.phase.startswith("art_"):
            return self._act_articulated(obs, stalled)
        g, ph = self.grasp, self.phase
        if ph.startswith("push"):
            return np.clip(self._act_push(obs, stalled), -1, 1)
        if ph == "above":
            z = g[2] + self.above_dz
            if self.t_phase == 1:  # what stands between here and there (a basket just filled) is passed over
                self.pass_z = self._pass_over_z(obs["robot0_eef_pos"][:2], g[:2])
            if np.linalg.norm(obs["robot0_eef_pos"][:2] - g[:2]) > self.PATH_CLEAR:
                z = max(z, self.pass_z)
            a, err = self._move(obs, np.array([g[0], g[1], z]), self.R_grasp, -1)
            if err < 0.01 or self.t_phase > 80:
                self.phase, self.t_phase = "descend", 0
                obj = self.goals[self.goal_idx][1]
                if np.linalg.norm(self.d.xpos[self.env.obj_body_id[obj]] - self.obj_at_plan) > 0.003 and self.replans < 2:
                    # the object moved since the plan (one placed on another can still be settling): plan
                    # again from here and come above the new grasp first
                    self._plan_goal(obs, keep_R=self.R_grasp)
                    self.phase, self.replans = "above", self.replans + 1
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
            if not self._closed_on_nothing(obs) and (obs["robot0_eef_pos"][2] > self.carry_z - 0.03 or self.t_phase > 60):
                self.phase, self.t_phase = "carry", 0
        elif ph == "regrasp":  # open and back off until the dropped object is at rest, then re-plan
            a, _ = self._move(obs, np.array([g[0], g[1], g[2] + self.above_dz]), self.R_grasp, -1)
            obj_pos = self.d.xpos[self.env.obj_body_id[self.goals[self.goal_idx][1]]].copy()
            at_rest = self.t_phase > 2 and np.linalg.norm(obj_pos - self.obj_last) < 0.001
            self.obj_last = obj_pos
            if at_rest or self.t_phase > 10:
                self.phase, self.t_phase = "plan", 0
        elif ph == "carry":
            xy = self._place_eef_xy(obs)
            if self.bend and self.t_phase == 1:  # a via point beside the straight path, until near it
                mid = (obs["robot0_eef_pos"][:2] + xy) / 2
                path = xy - obs["robot0_eef_pos"][:2]
                self.via = mid + self.bend * np.array([-path[1], path[0]]) / max(np.linalg.norm(path), 1e-6)
            if self.bend and self.via is not None:
                if np.linalg.norm(obs["robot0_eef_pos"][:2] - self.via) < 0.02 or self.t_phase > 40:
                    self.via = None
                else:
                    xy = self.via
            a, err = self._move(obs, np.array([xy[0], xy[1], self.carry_z]), self.R_place, 1)
            if not self._closed_on_nothing(obs) and (err < 0.01 or self.t_phase > 100):  # (a lift can end on its height before its own check)
                self.phase, self.t_phase = "lower", 0
        elif ph == "lower":
            xy = self._place_eef_xy(obs)
            slow = obs["robot0_eef_pos"][2] < self.release_z + self.SLOW_ABOVE  # full speed down to there (off a cabinet)
            a, err = self._move(obs, np.array([xy[0], xy[1], self.release_z]), self.R_place, 1, max_speed=0.5 if slow else 1.0)
            landed = self.t_phase > 8 and self.trail[0][2] - self.trail[-1][2] < 0.002  # standing on something (the closed loop may still creep sideways)
            if err < 0.008 or landed or self.t_phase > 50:  # (landed includes stalled)
                self.phase, self.t_phase = "release", 0
        elif ph == "release":
            a, _ = self._move(obs, obs["robot0_eef_pos"], self.R_place, -1)
            a[:3] = 0
            if self.t_phase > 8:
                self.phase, self.t_phase = "retreat", 0
        else:  # retreat, then the next sub-goal
            up = obs["robot0_eef_pos"].copy()
            up[2] = self.carry_z + 0.05
            a, err = self._move(obs, up, self.R_place, -1)
            if (err < 0.02 or self.t_phase > 30) and self.goal_idx + 1 < len(self.goals):
                self.goal_idx, self.phase = self.goal_idx + 1, "plan"
        return np.clip(a, -1, 1)
