"""The reader's path in numbers (issue 30): for each script, the lines of `main`, the longest other function or method
above the banner, and the longest function nested in `main`.

    python benchmarks/reader_path.py            # a markdown table
    python benchmarks/reader_path.py --json     # the same as JSON

Goals (CONVENTIONS.md §1): `main` <= 200 lines, no other function or method above the banner > 120 lines, no function
nested in `main` > 40 lines. tests/test_layout.py asserts them.
"""

import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["sft.py", "reward.py", "dpo.py", "kto.py", "orpo.py", "cpo.py", "ppo.py", "iterative_sft.py",
           "best_of_n.py", "ddpo.py", "grpo.py", "rloo.py", "distill.py"]
BANNER = "# " + "=" * 118


def span(node: ast.AST) -> int:
    """Lines of a function or class, decorators included."""
    first = node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else node.lineno
    return node.end_lineno - first + 1


def measure(script: str) -> dict:
    text = (REPO / script).read_text()
    banner_line = text[: text.index(BANNER)].count("\n") + 1
    tree = ast.parse(text)
    functions = []  # (lines, name) of every top-level function and method above the banner, main excluded
    main_node = None
    for node in tree.body:
        if node.lineno > banner_line:
            continue
        if isinstance(node, ast.FunctionDef):
            if node.name == "main":
                main_node = node
            else:
                functions.append((span(node), node.name))
        elif isinstance(node, ast.ClassDef):
            functions += [(span(item), f"{node.name}.{item.name}") for item in node.body
                          if isinstance(item, ast.FunctionDef)]
    nested = [(span(item), item.name) for item in ast.walk(main_node)
              if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item is not main_node]
    longest = max(functions, default=(0, "-"))
    longest_nested = max(nested, default=(0, "-"))
    return {"script": script, "main": span(main_node), "longest_above_banner": longest[0],
            "longest_name": longest[1], "longest_nested_in_main": longest_nested[0],
            "longest_nested_name": longest_nested[1], "lines": text.count("\n")}


def main() -> None:
    rows = [measure(script) for script in SCRIPTS]
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=1))
        return
    print("| script | lines | `main` | longest above the banner | longest nested in `main` |")
    print("|---|---:|---:|---|---|")
    for row in rows:
        print(f"| {row['script']} | {row['lines']} | {row['main']} | {row['longest_above_banner']} "
              f"(`{row['longest_name']}`) | {row['longest_nested_in_main']} (`{row['longest_nested_name']}`) |")


if __name__ == "__main__":
    main()
