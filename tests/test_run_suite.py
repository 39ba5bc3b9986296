"""Tests of run_suite.py under a local Ray instance: the scripted pipeline on two tasks with an
interrupt and a resume, a failing task beside one that finishes, the diffusion_ppo chain with tiny
stages, and the one-sentence errors."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest
from conftest import ROOT, assert_ok, assert_one_sentence_error, run

pytestmark = pytest.mark.slow  # every test starts run_suite.py, most of them a Ray instance and LIBERO stages
SCRIPT = "run_suite.py"
SMALL = ["--image-size", "32", "--no-reflections", "--cpus-per-stage", "1"]


def stage_processes(out_dir):
    """Processes still running a stage of this out-dir (their command lines name it)."""
    r = subprocess.run(["pgrep", "-f", str(out_dir)], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split() if int(p) != os.getpid()]


def assert_demos_file(path, num_demos, image_size):
    with h5py.File(path, "r") as f:
        data = f["data"]
        assert data.attrs["num_demos"] == num_demos and json.loads(data.attrs["metrics"])["action_jerk"]["mean"] > 0
        for i in range(num_demos):
            obs = data[f"demo_{i}/obs"]
            T = len(data[f"demo_{i}/actions"])
            if image_size is None:
                assert "agentview_rgb" not in obs and obs["ee_pos"].shape == (T, 3)
                continue
            assert obs["agentview_rgb"].shape == (T, image_size, image_size, 3)
            assert obs["eye_in_hand_rgb"].shape == (T, image_size, image_size, 3)
            assert obs["agentview_rgb"][()].std() > 0  # a rendered scene, not an empty frame


def test_scripted_suite_is_interrupted_then_resumed(tmp_path):
    """A stop once a stage has finished (SIGTERM, as a batch scheduler sends; Ctrl-C's SIGINT takes
    the same path) leaves no stage running; the same command again skips what finished and
    completes both tasks."""
    out = tmp_path / "suite"
    cmd = [sys.executable, os.path.join(ROOT, SCRIPT), "--tasks", "libero_spatial_0", "libero_spatial_1", "--source", "scripted",
           "--num-demos", "1", *SMALL, "--collect-args=--no-images", "--out-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # wait for the first finished stage
        lines.append(line)
        if ": done in " in line:
            break
    finished = line.split()[:2]  # [task, stage]
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + stdout + stderr
    assert "run the same command again" in stderr
    time.sleep(2)
    assert stage_processes(out) == []  # the cancelled stage took its workers with it

    r = run(SCRIPT, cmd[2:], tmp_path)
    assert_ok(r)
    assert f"{finished[0]} {finished[1].rstrip(':')}: done already" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == "scripted"
    for task in ("libero_spatial_0", "libero_spatial_1"):
        row = summary["tasks"][task]
        assert row["status"] == "done" and row["demos_kept"] == 1 and row["demos_tried"] >= 1
        assert set(row["minutes"]) == {"demos", "report"}
        assert_demos_file(out / task / f"{task}_scripted.hdf5", 1, None)  # state-only here: images cost 0.1 s a frame
        assert (out / task / "metrics.png").is_file() and (out / task / "logs" / "demos.log").is_file()
    assert "| libero_spatial_1 | done |" in (out / "summary.md").read_text()


def test_a_failing_task_does_not_stop_the_others(tmp_path):
    """A directory where libero_spatial_1's demos file must go makes its collection fail after the
    rollouts; libero_spatial_0 finishes, the failure is named with its log, the exit status is 1.
    --vla trains and scores the VLA on the task that made its demos, and --compare reads that suite."""
    out = tmp_path / "suite"
    (out / "libero_spatial_1" / "libero_spatial_1_scripted.hdf5").mkdir(parents=True)
    cmd = ["--tasks", "libero_spatial_0", "libero_spatial_1", "--source", "scripted", "--num-demos", "1", *SMALL,
           "--out-dir", str(out), "--results-path", str(tmp_path / "results" / "r.json"), "--vla",
           "--vla-args=--num-steps 1 --batch-size 4 --channels 8 --head-dim 32", "--eval-args=--num-episodes 1 --max-steps 8"]
    r = run(SCRIPT, cmd, tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "r.json").read_text())["tasks"]
    assert list(results) == ["libero_spatial_0"]  # the finished task's demos figures, merged as they came
    assert results["libero_spatial_0"]["demos_kept"] == 1 and results["libero_spatial_0"]["demos_tried"] >= 1
    assert results["libero_spatial_0"]["demos_metrics"]["episode_length"]["mean"] > 0
    assert "libero_spatial_1 demos: FAILED" in r.stdout and "failed: libero_spatial_1" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"]["libero_spatial_0"]["status"] == "done"
    assert_demos_file(out / "libero_spatial_0" / "libero_spatial_0_scripted.hdf5", 1, 32)  # with its images
    failed = summary["tasks"]["libero_spatial_1"]
    assert failed["status"] == "failed" and failed["failed_stage"] == "demos"
    assert failed["log"].endswith("libero_spatial_1/logs/demos.log") and os.path.isfile(failed["log"])
    assert summary["vla"]["status"] == "done" and summary["vla"]["tasks"] == ["libero_spatial_0"]
    evaluation = json.loads((out / "vla" / "eval.json").read_text())["tasks"]
    assert list(evaluation) == ["libero_spatial_0"] and evaluation["libero_spatial_0"]["episodes"] == 1

    r = run(SCRIPT, ["--compare", str(out), "--results-path", str(tmp_path / "table.json")], tmp_path, timeout=120)
    assert_ok(r)
    table = json.loads((tmp_path / "table.json").read_text())
    row = table["sources"]["scripted"]
    assert table["tasks"] == ["libero_spatial_0"] and table["demos_per_task"] == 1 and row["episodes"] == 1
    assert row["per_task_vla_success"] == {"libero_spatial_0": evaluation["libero_spatial_0"]["success_rate"]}
    assert row["smoothness"]["episode_length"]["mean"] == results["libero_spatial_0"]["demos_metrics"]["episode_length"]["mean"]
    assert row["minutes"]["vla_train"] > 0 and row["minutes"]["vla_eval"] > 0
    first_eval = json.loads((out / "vla" / "stages.json").read_text())["eval_minutes"]
    assert first_eval == pytest.approx(summary["vla"]["eval_minutes"])

    # The same command again: the VLA is kept and its evaluation has no episode left to run; the
    # evaluation's minutes add this run's to the first run's instead of replacing them.
    r = run(SCRIPT, cmd, tmp_path)
    assert r.returncode == 1 and "vla train: done already" in r.stdout
    assert json.loads((out / "vla" / "eval.json").read_text())["tasks"] == evaluation
    again = json.loads((out / "vla" / "stages.json").read_text())["eval_minutes"]
    assert again > first_eval and json.loads((out / "summary.json").read_text())["vla"]["eval_minutes"] == again


def test_diffusion_ppo_chain_hands_its_expert_on_and_resumes(tmp_path):
    """warm start -> DPPO expert (1 BC epoch, one PPO update) -> demos stage rolling out that run's
    expert.pt with images, every stage a real subprocess under Ray. The untrained expert succeeds
    nowhere, so the demos stage fails in its one sentence and the task is marked failed there; the
    same command again skips the warm start and the expert and runs the demos stage again. (The
    success path of an expert's rollout is the scripted tests' code; a trained expert's is measured
    in docs/results/dppo_libero_spatial.json.)"""
    out = tmp_path / "suite"
    expert = ("--bc-epochs 1 --total-iterations 1 --episodes-per-update 1 --max-episode-steps 4 --eval-episodes 1 "
              "--critic-warmup-max 0 --update-epochs 1 --signal-min-return-std 0")
    cmd = ["--tasks", "libero_spatial_0", "--source", "diffusion_ppo", "--warmstart-demos", "1", "--num-demos", "1",
           *SMALL, f"--expert-args={expert}", "--collect-args=--max-attempts 1", "--out-dir", str(out)]
    r = run(SCRIPT, cmd, tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "libero_spatial_0 expert: done in" in r.stdout and "libero_spatial_0 demos: FAILED" in r.stdout
    row = json.loads((out / "summary.json").read_text())["tasks"]["libero_spatial_0"]
    assert row["status"] == "failed" and row["failed_stage"] == "demos" and set(row["minutes"]) == {"warmstart", "expert"}
    assert row["warmstart_demos"] == 1 and 0 <= row["bc_success"] <= row["expert_success"] <= 1
    (run_dir,) = (out / "libero_spatial_0" / "expert").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["iteration"] == 1
    log = (out / "libero_spatial_0" / "logs" / "demos.log").read_text()
    assert f"--policy {run_dir / 'expert.pt'}" in log and "--image-size 32" in log  # the expert, with images
    assert "no episode succeeded in 1 attempts" in log
    assert not (out / "libero_spatial_0" / "libero_spatial_0_diffusion_ppo.hdf5").exists()

    r = run(SCRIPT, cmd, tmp_path)
    assert r.returncode == 1
    assert "libero_spatial_0 warmstart: done already" in r.stdout and "libero_spatial_0 expert: done already" in r.stdout
    assert "libero_spatial_0 demos: FAILED" in r.stdout
    assert list((out / "libero_spatial_0" / "expert").iterdir()) == [run_dir]


@pytest.mark.parametrize("args, words", [
    ([], ["--tasks"]),
    (["--tasks", "libero_spatial_10"], ["unknown task 'libero_spatial_10'"]),
    (["--tasks", "libero_spatial_0", "--source", "human"], ["--source 'human'", "scripted"]),
    (["--tasks", "libero_spatial_0", "--ray-address", "127.0.0.1:9"], ["cannot reach", "127.0.0.1:9"]),
    (["--tasks", "libero_spatial_0", "--expert-args=--time-limit-min '3"], ["--expert-args"]),
])
def test_bad_input_is_one_sentence_before_any_work(tmp_path, args, words):
    assert_one_sentence_error(run(SCRIPT, [*args, "--out-dir", str(tmp_path / "suite")], tmp_path, timeout=60), *words, status=2)
    assert not (tmp_path / "suite").exists()
