"""run_suite.py --compare: the VLA-success-by-source table from finished suites' files (no Ray, no
LIBERO: the suites here are written the way run_suite.py writes them, with chosen figures, so the
pooling, the averages and the protocol checks can be checked by hand). The same reader on a suite
run for real is in test_run_suite.py."""

import json
import shlex

import pytest
from conftest import assert_ok, assert_one_sentence_error, run

TASKS = ["libero_spatial_0", "libero_spatial_1"]


def write_suite(path, source, evals, jerks, demos_kept=(2, 2), vla_args="--num-steps 10", expert_success=(0.9, 0.7)):
    """A finished suite of `source` over TASKS: evals = [(successes, episodes)] per task, jerks = action
    jerk (mean, std) per task; every other smoothness figure is the jerk times 10."""
    command = shlex.join(["python", "run_suite.py", "--tasks", *TASKS, "--source", source, "--num-demos", "2", "--vla",
                          f"--vla-args={vla_args}", "--out-dir", str(path)])
    rows = {}
    for t, kept, (m, s), best in zip(TASKS, demos_kept, jerks, expert_success):
        metrics = {k: dict(mean=m * (1 if k == "action_jerk" else 10), std=s * (1 if k == "action_jerk" else 10))
                   for k in ("action_jerk", "ee_jerk", "path_length", "episode_length")}
        rows[t] = dict(status="done", minutes={"demos": 3.0, "report": 0.5}, demos_kept=kept, demos_tried=kept * 2,
                       metrics=metrics, **({} if source == "scripted" else dict(expert_success=best, bc_success=0.5)))
    (path / "vla").mkdir(parents=True)
    summary = dict(source=source, out_dir=str(path), command=command, tasks=rows,
                   vla=dict(status="done", tasks=TASKS, average_success=None, eval_minutes=4.0))
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "vla" / "stages.json").write_text(json.dumps(dict(checkpoint="vla.pt", tasks=TASKS, train_minutes=20.0)))
    tasks = {t: dict(success_rate=s / n, successes=s, episodes=n, ci95=[0, 1]) for t, (s, n) in zip(TASKS, evals)}
    (path / "vla" / "eval.json").write_text(json.dumps(dict(tasks=tasks)))
    return path


def test_the_table_pools_episodes_and_averages_tasks(tmp_path):
    dirs = [write_suite(tmp_path / "s", "scripted", [(7, 10), (3, 10)], [(0.04, 0.01), (0.06, 0.03)]),
            write_suite(tmp_path / "d", "diffusion_ppo", [(10, 10), (9, 10)], [(0.02, 0.01), (0.02, 0.01)]),
            write_suite(tmp_path / "g", "gaussian_ppo", [(0, 10), (1, 10)], [(0.3, 0.1), (0.5, 0.1)], expert_success=(0.5, 0.3))]
    out = tmp_path / "docs" / "table.json"
    r = run("run_suite.py", ["--compare", *dirs, "--results-path", out], tmp_path, timeout=120)
    assert_ok(r)
    table = json.loads(out.read_text())
    assert table["tasks"] == TASKS and table["demos_per_task"] == 2 and list(table["sources"]) == ["scripted", "diffusion_ppo", "gaussian_ppo"]
    scripted, dppo, gauss = (table["sources"][s] for s in ("scripted", "diffusion_ppo", "gaussian_ppo"))
    assert scripted["successes"] == 10 and scripted["episodes"] == 20 and scripted["vla_success"] == 0.5
    # Wilson 95% for 10/20, by hand: (0.5 + 1.96^2/40 -+ 1.96 sqrt(0.25/20 + 1.96^2/1600)) / (1 + 1.96^2/20)
    assert scripted["vla_ci95"] == pytest.approx([0.2993, 0.7007], abs=1e-4)
    assert dppo["vla_success"] == 0.95 and gauss["vla_success"] == 0.05 and gauss["vla_ci95"][0] < 0.05 < gauss["vla_ci95"][1]
    assert scripted["per_task_vla_success"] == {"libero_spatial_0": 0.7, "libero_spatial_1": 0.3}
    assert scripted["smoothness"]["action_jerk"] == pytest.approx(dict(mean=0.05, spread=0.02))
    assert scripted["smoothness"]["path_length"] == pytest.approx(dict(mean=0.5, spread=0.2))
    assert scripted["expert_success"] == scripted["demos_success"] == 0.5  # kept 2 of 4 on both tasks
    assert dppo["expert_success"] == pytest.approx(0.8) and gauss["expert_success"] == pytest.approx(0.4)
    minutes = {"demos": 3.0, "report": 0.5}
    assert dppo["per_task_expert"]["libero_spatial_1"] == dict(demos_success=0.5, bc_success=0.5, expert_success=0.7, minutes=minutes)
    assert scripted["per_task_expert"]["libero_spatial_0"] == dict(demos_success=0.5, minutes=minutes)
    assert dppo["minutes"] == dict(stages=7.0, vla_train=20.0, vla_eval=4.0)
    assert table["command"].startswith("python run_suite.py --compare")
    assert (tmp_path / "docs" / "table.png").stat().st_size > 10_000
    assert "| diffusion_ppo | 0.950 [" in r.stdout


@pytest.mark.parametrize("case, words", [
    ("other tasks", ["covers libero_spatial_1 where", "same tasks"]),
    ("other recipe", ["--vla-args '--num-steps 99'", "one protocol"]),
    ("fewer demos", ["other demo counts", "libero_spatial_1"]),
    ("no vla", ["has no evaluated VLA", "--vla"]),
    ("same source", ["both --source scripted"]),
    ("no summary", ["has no summary.json"]),
])
def test_suites_of_different_protocols_are_refused_in_one_sentence(tmp_path, case, words):
    first = write_suite(tmp_path / "a", "scripted", [(1, 2), (1, 2)], [(0.1, 0.1)] * 2)
    second = tmp_path / "b"
    if case != "no summary":
        write_suite(second, "scripted" if case == "same source" else "diffusion_ppo", [(1, 2), (1, 2)], [(0.1, 0.1)] * 2,
                    demos_kept=(2, 1) if case == "fewer demos" else (2, 2),
                    vla_args="--num-steps 99" if case == "other recipe" else "--num-steps 10")
    summary = json.loads((second / "summary.json").read_text()) if case in ("other tasks", "no vla") else None
    if case == "other tasks":
        summary["vla"]["tasks"] = TASKS[1:]
    if case == "no vla":
        summary["vla"] = None
    if summary:
        (second / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "table.json"
    assert_one_sentence_error(run("run_suite.py", ["--compare", first, second, "--results-path", out], tmp_path, timeout=120),
                              *words, status=2)
    assert not out.exists()


def test_compare_needs_its_table_path_and_no_tasks(tmp_path):
    suite = write_suite(tmp_path / "a", "scripted", [(1, 2), (1, 2)], [(0.1, 0.1)] * 2)
    assert_one_sentence_error(run("run_suite.py", ["--compare", suite], tmp_path, timeout=120), "--results-path", status=2)
    assert_one_sentence_error(run("run_suite.py", ["--compare", suite, "--tasks", "libero_spatial_0", "--results-path", "t.json"],
                                  tmp_path, timeout=120), "--tasks", status=2)
