"""The layout every script shares (CONVENTIONS.md §1, issue 23): the algorithm and main() above one banner, the
plumbing below it; the plumbing byte-identical wherever two scripts carry the same block; `--help` with underscores;
importing a script has no side effects."""

import ast
import subprocess
import sys

import pytest
from conftest import REPO

ALL_SCRIPTS = ["sft.py", "reward.py", "dpo.py", "kto.py", "orpo.py", "cpo.py", "ppo.py", "iterative_sft.py",
               "best_of_n.py", "ddpo.py", "grpo.py", "rloo.py", "distill.py"]
TRAINERS = [script for script in ALL_SCRIPTS if script not in ("best_of_n.py", "ddpo.py")]
BANNER = "# " + "=" * 118


def blocks_below_the_banner(script: str) -> dict[str, str]:
    """Top-level functions and classes after the banner, as source text (decorators included)."""
    text = (REPO / script).read_text()
    banner_line = text[: text.index(BANNER)].count("\n") + 1
    tree = ast.parse(text)
    lines = text.splitlines()
    return {node.name: "\n".join(lines[(node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1:
                                       node.end_lineno])
            for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno > banner_line}


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_algorithm_and_main_above_one_banner_plumbing_below(script):
    text = (REPO / script).read_text()
    assert text.count(BANNER) == 2, "one banner (two rule lines around its words)"
    tree = ast.parse(text)
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert "main" in names
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    assert main.lineno < text[: text.index(BANNER)].count("\n") + 1, "main() comes before the banner"
    last = tree.body[-1]
    assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test), "ends with the __main__ guard"
    call = ast.unparse(last.body[-1])
    assert call.startswith("main(tyro.cli(") and "use_underscores=True" in call, call


def test_every_shared_block_is_the_same_in_every_script_that_carries_it():
    sources = {script: blocks_below_the_banner(script) for script in ALL_SCRIPTS}
    names = {name for blocks in sources.values() for name in blocks}
    shared = 0
    for name in sorted(names):
        carriers = [script for script in ALL_SCRIPTS if name in sources[script]]
        if len(carriers) > 1:
            shared += 1
            versions = {sources[script][name] for script in carriers}
            assert len(versions) == 1, f"{name} differs among {carriers}"
    assert shared >= 15
    # the blocks sharded training needs are in every script that trains a language model
    for name in ["make_accelerator", "gathered_state_dict", "save_checkpoint", "load_optimizer_state", "fail"]:
        assert all(name in sources[script] for script in TRAINERS), name


def test_importing_a_script_has_no_side_effects():
    code = "; ".join(f"import {script[:-3]}" for script in ALL_SCRIPTS)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "", result.stdout[:500]



@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_the_readers_path_stays_short(script):
    """Issue 30's limits (CONVENTIONS.md §1): `main` at most 200 lines, no other function or method above the banner
    longer than 120, no function nested in `main` longer than 40 (benchmarks/reader_path.py prints the numbers)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from reader_path import measure

    numbers = measure(script)
    assert numbers["main"] <= 200, numbers
    assert numbers["longest_above_banner"] <= 120, numbers
    assert numbers["longest_nested_in_main"] <= 40, numbers
