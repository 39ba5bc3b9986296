"""Every script's --help, in this process (no LIBERO start): every field is a flag, booleans read as
--flag/--no-flag, and a default the docstring spells out is not followed by tyro's own."""

import importlib
import re

import pytest
import tyro

SCRIPTS = ["collect_demos", "diffusion_ppo", "gaussian_ppo", "train_vla", "eval_libero", "run_suite"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_reads_naturally(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per flag where it fits, whatever the terminal
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exc:
        tyro.cli(module.Args, args=["--help"], prog=f"{script}.py")
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flat = re.sub(r"[\s│╭╮╰╯─]+", " ", text)  # the box drawing and line breaks of tyro's layout
    assert "--no-no-" not in flat
    assert not re.search(r"\(default[^()]*(\([^()]*\))?[^()]*\) \(default", flat), re.findall(r"\(default[^)]*\) \(default[^)]*\)", flat)
    for name in module.Args.__dataclass_fields__:  # every field is a flag
        assert "--" + name.replace("_", "-") in flat, (script, name)
