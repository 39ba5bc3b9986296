"""Tests of train_vla.py and eval_libero.py: one chained run (2 scripted demos at 32x32 ->
a few gradient steps -> one evaluation episode with a short step limit -> resume), evaluation of
a diffusion_ppo checkpoint, the on-demand rendering against collect_demos.py's images, and the
one-sentence errors."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_vla  # noqa: E402

TASK = "libero_spatial_0"
VLA_KEYS = {"kind", "tasks", "act_dim", "obs_horizon", "act_horizon", "act_exec", "proprio_dim", "proprio_keys",
            "cameras", "image_size", "crop_size", "render_size", "render_reflections", "flip", "normalizer", "instructions", "model", "ema", "args",
            "iteration", "flow_steps", "action_head"}


def run(script, args, cwd, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_sentence_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and all(w in message for w in words), message


@pytest.fixture(scope="module")
def vla_run(tmp_path_factory):
    """2 scripted demos at 32x32 and a VLA trained on them for 3 steps: returns (cwd, checkpoint path)."""
    cwd = tmp_path_factory.mktemp("vla")
    r = run("collect_demos.py", ["--task", TASK, "--num-demos", "2", "--image-size", "32", "--num-workers", "2",
                                 "--no-reflections", "--out-path", "demos.hdf5", "--quiet"], cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = run("train_vla.py", ["--demos-paths", "demos.hdf5", "--image-size", "32", "--num-steps", "3", "--batch-size", "4",
                             "--channels", "8", "--head-dim", "32", "--log-every", "1", "--torch-threads", "2"], cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "step 3/3" in r.stdout
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir / "vla.pt"


def test_checkpoint_holds_what_evaluation_needs(vla_run):
    cwd, path = vla_run
    ckpt = torch.load(path, weights_only=True)
    assert VLA_KEYS <= set(ckpt), VLA_KEYS - set(ckpt)
    assert ckpt["kind"] == "vla" and ckpt["tasks"] == [TASK] and ckpt["iteration"] == 3
    assert (ckpt["image_size"], ckpt["crop_size"], ckpt["act_horizon"], ckpt["act_exec"]) == (32, 29, 8, 4)
    assert ckpt["render_size"] == 32  # the demos' image size, which evaluation renders at
    assert ckpt["render_reflections"] is False  # the demos were rendered --no-reflections; so will evaluation be
    (instruction, embedding), = ckpt["instructions"].items()
    assert "black bowl" in instruction and embedding.shape == (384,)
    # the stored embedding is the frozen encoder's: evaluating a known task needs no encoder
    torch.testing.assert_close(train_vla.encode_instructions([instruction])[0], embedding)
    # the gradient steps moved the weights away from the EMA's start
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    summary = json.loads((path.parent / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"]) and summary["samples_per_s"] > 0

    policy = train_vla.VLAPolicy.from_checkpoint(ckpt)
    images = {cam: np.random.randint(0, 255, (2, 32, 32, 3), dtype=np.uint8) for cam in train_vla.CAMERAS}
    actions = policy.act(images, np.zeros((2, 8), np.float32), instruction)
    assert actions.shape == (2, 4, 7)
    assert np.all(actions >= policy.act_min.numpy() - 1e-6) and np.all(actions <= policy.act_max.numpy() + 1e-6)
    policy.act(images, np.zeros((2, 8), np.float32), "put the bowl in the drawer")  # a new instruction is encoded
    assert "put the bowl in the drawer" in policy.instructions


def test_runs_started_in_the_same_second_get_their_own_folders(vla_run):
    """Run folders are <exp>__<seed>__<unix second>: with that folder taken (by a run started in the
    same second) the new run takes <name>-2 and leaves the other's folder alone."""
    import time

    cwd, _ = vla_run
    now = int(time.time())
    taken = [cwd / "clash" / f"same__1__{t}" for t in range(now - 1, now + 180)]
    for d in taken:
        d.mkdir(parents=True)
    r = run("train_vla.py", ["--demos-paths", "demos.hdf5", "--image-size", "32", "--num-steps", "1", "--batch-size", "4",
                             "--channels", "8", "--head-dim", "32", "--exp-name", "same", "--out-dir", "clash"], cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (new,) = set((cwd / "clash").iterdir()) - set(taken)
    assert new.name.endswith("-2") and new.name[:-2] in {d.name for d in taken} and (new / "vla.pt").is_file()
    assert all(not any(d.iterdir()) for d in taken)


def test_eval_runs_the_protocol_and_resumes(vla_run):
    cwd, path = vla_run
    results = cwd / "results.json"
    common = ["--checkpoint-path", str(path), "--max-steps", "8", "--num-workers", "1", "--results-path", str(results)]
    r = run("eval_libero.py", [*common, "--num-episodes", "1", "--video", "1"], cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"[1/1] {TASK} episode 0: failure in 8 steps" in r.stdout and "2 renders" in r.stdout  # every Te = 4 steps
    out = json.loads(results.read_text())
    assert out["kind"] == "vla" and out["episodes"][TASK] == {"0": {"success": False, "steps": 8}}
    task = out["tasks"][TASK]
    assert task["success_rate"] == 0.0 and task["episodes"] == 1 and task["ci95"][0] == 0.0 and 0.5 < task["ci95"][1] < 1
    assert out["suites"]["libero_spatial"]["tasks"] == 1 and out["average"] == 0.0
    assert os.path.isfile(cwd / "videos" / f"{TASK}_ep0_failure.mp4")

    r = run("eval_libero.py", [*common, "--num-episodes", "2"], cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 done already, 1 to run" in r.stdout and "episode 0:" not in r.stdout
    assert set(json.loads(results.read_text())["episodes"][TASK]) == {"0", "1"}
    r = run("eval_libero.py", [*common, "--num-episodes", "2"], cwd)
    assert "2 done already, 0 to run" in r.stdout
    r = run("eval_libero.py", [*common, "--num-episodes", "2", "--seed", "5"], cwd)
    assert_one_sentence_error(r, "another protocol")


def test_eval_scores_a_diffusion_ppo_expert_without_rendering(tmp_path):
    import diffusion_ppo as dp

    policy = dp.DiffusionPolicy(109, 7, 4, 4, 20, 10, 32, 0.1, 3.0, np.zeros(109), np.ones(109), -np.ones(7), np.ones(7))
    ckpt = dict(kind="diffusion_ppo", task=TASK, **policy.config(), model=policy.state_dict(), iteration=0)
    torch.save(ckpt, tmp_path / "expert.pt")
    r = run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "expert.pt"), "--num-episodes", "2",
                               "--max-steps", "8", "--num-workers", "2"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "0 renders" in r.stdout
    out = json.loads((tmp_path / "eval_expert.json").read_text())
    assert out["kind"] == "diffusion_ppo" and out["tasks"][TASK]["episodes"] == 2
    # fewer episodes than the file holds: the summary covers the asked ones
    r = run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "expert.pt"), "--num-episodes", "1",
                               "--max-steps", "8"], tmp_path)
    assert r.returncode == 0 and "(0/1)" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    # training wrote over the checkpoint: its old results are not reported as the new one's
    torch.save(dict(ckpt, iteration=1), tmp_path / "expert.pt")
    r = run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "expert.pt"), "--num-episodes", "2",
                               "--max-steps", "8"], tmp_path)
    assert_one_sentence_error(r, "another checkpoint")
    r = run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "expert.pt"), "--tasks", "libero_object_0"], tmp_path)
    assert_one_sentence_error(r, "state expert of libero_spatial_0")


def test_on_demand_rendering_matches_the_training_images():
    """eval_libero.py draws the cameras with the sim.render call robosuite's camera observables
    make: in one env the images are identical to the observations collect_demos.py stores. (Two
    LIBERO envs built from the same BDDL already differ by ~1 grey level on average, so across
    envs the check is a bound on the mean difference.)"""
    import collect_demos
    import eval_libero

    task = eval_libero.resolve_task(TASK)
    state = task["init_states"][3]
    with_cams = collect_demos.make_env(task["bddl"], image_size=32)
    with_cams.reset()
    obs = with_cams.regenerate_obs_from_state(state)
    views = eval_libero.render_cameras(with_cams, 32, ("agentview", "robot0_eye_in_hand"))
    np.testing.assert_array_equal(views["agentview"], obs["agentview_image"])
    np.testing.assert_array_equal(views["robot0_eye_in_hand"], obs["robot0_eye_in_hand_image"])
    assert obs["agentview_image"].std() > 5
    # without the mirror pass (collect_demos.py --no-reflections): the same agreement, and the table's reflections are gone
    collect_demos.set_reflections(with_cams, False)
    plain = with_cams.regenerate_obs_from_state(state)
    views = eval_libero.render_cameras(with_cams, 32, ("agentview",), reflections=False)
    np.testing.assert_array_equal(views["agentview"], plain["agentview_image"])
    assert np.abs(plain["agentview_image"].astype(int) - obs["agentview_image"]).max() > 20
    eval_libero.render_cameras(with_cams, 32, ("agentview",))  # the default puts them back
    np.testing.assert_array_equal(with_cams.regenerate_obs_from_state(state)["agentview_image"], obs["agentview_image"])

    on_demand = eval_libero.make_env(task["bddl"], render=True)
    on_demand.reset()
    on_demand.regenerate_obs_from_state(state)
    views = eval_libero.render_cameras(on_demand, 32, ("agentview", "robot0_eye_in_hand"))
    for cam in ("agentview", "robot0_eye_in_hand"):
        diff = np.abs(views[cam].astype(int) - obs[f"{cam}_image"]).mean()
        assert diff < 5, (cam, diff)
    np.testing.assert_array_equal(train_vla.upright(train_vla.upright(obs["agentview_image"])), obs["agentview_image"])


def test_user_errors_are_one_sentence(tmp_path):
    assert_one_sentence_error(run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "none.pt")], tmp_path),
                              "none.pt", "does not exist")
    torch.save({"kind": "vla", "tasks": [TASK]}, tmp_path / "v.pt")
    assert_one_sentence_error(run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "v.pt"), "--tasks", "libero_spatial_12"],
                                  tmp_path), "unknown task 'libero_spatial_12'")
    torch.save({"kind": "bc"}, tmp_path / "bc.pt")
    assert_one_sentence_error(run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "bc.pt")], tmp_path), "kind 'bc'")
    # a state-only demos file: train_vla.py says how to re-render it
    with h5py.File(tmp_path / "state_only.hdf5", "w") as f:
        f.create_group("data").attrs["problem_info"] = json.dumps({"language_instruction": "pick up the bowl"})
        g = f["data"].create_group("demo_0")
        g["actions"] = np.zeros((5, 7))
        g["obs/ee_states"] = np.zeros((5, 6))
    r = run("train_vla.py", ["--demos-paths", str(tmp_path / "state_only.hdf5")], tmp_path)
    assert_one_sentence_error(r, "state-only", "collect_demos.py --replay")
    assert_one_sentence_error(run("train_vla.py", ["--demos-paths", str(tmp_path / "nope.hdf5")], tmp_path), "nope.hdf5")
    assert not (tmp_path / "runs").exists()
