"""The copy rule (STYLE.md): every same-named `# --- begin copied block: <name> ---` block is identical
in every top-level script that has it, so a fix lands in all of them."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"# --- begin copied block: (.+?) ---\n(.*?)# --- end copied block: \1 ---\n", re.S)


def test_same_named_blocks_are_identical_in_every_script():
    blocks = {}  # name -> {script: text}
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as f:
            text = f.read()
        begins, ends = (len(re.findall(rf"^ *# --- {w} copied block:", text, re.M)) for w in ("begin", "end"))
        assert begins == ends == len(BLOCK.findall(text)), path  # every marker pairs up
        for name, body in BLOCK.findall(text):
            blocks.setdefault(name, {})[os.path.basename(path)] = body
    shared = {name: copies for name, copies in blocks.items() if len(copies) > 1}
    assert {"task names", "wilson interval", "rollout and ppo update", "training loop"} <= set(shared), sorted(shared)
    assert set(shared["task names"]) == {"collect_demos.py", "eval_libero.py", "run_suite.py"}
    assert set(shared["wilson interval"]) == {"diffusion_ppo.py", "gaussian_ppo.py", "eval_libero.py", "run_suite.py"}
    # the two PPO scripts share environments, critic, GAE, reward scaling, warm-start data, rollout and
    # PPO update, evaluation, checkpoint I/O and the training loop
    ppo = [{name for name, copies in blocks.items() if script in copies} for script in ("diffusion_ppo.py", "gaussian_ppo.py")]
    assert len(ppo[0]) >= 7 and ppo[0] == ppo[1], ppo
    assert "class LiberoStateEnv" in blocks["tasks and environments"]["gaussian_ppo.py"] and "def gae" in blocks["gae"]["gaussian_ppo.py"]
    assert "def ppo_update" in blocks["rollout and ppo update"]["gaussian_ppo.py"] and "rollout(" in blocks["training loop"]["gaussian_ppo.py"]
    for name, copies in shared.items():
        first = next(iter(copies.values()))
        for script, body in copies.items():
            assert body == first, f"copied block '{name}' in {script} differs from {next(iter(copies))}"


def test_the_ppo_main_bodies_are_copied_blocks_but_for_the_policy_lines():
    """Below `if __name__ == "__main__":` the two PPO scripts share every line in copied blocks, but for
    parsing the Args and the few lines that set up each policy's PPO clip and discount."""
    for script in ("diffusion_ppo.py", "gaussian_ppo.py"):
        with open(os.path.join(ROOT, script)) as f:
            main = f.read().split('if __name__ == "__main__":\n')[1]
        outside = [line for line in BLOCK.sub("", main).splitlines() if line.strip() and not line.strip().startswith("#")]
        assert outside[0] == "    args = tyro.cli(Args)" and len(outside) <= 4, (script, outside)
