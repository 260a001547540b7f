import ast
import importlib
import pkgutil
from pathlib import Path

import dadpo_offline


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(dadpo_offline.__path__, "dadpo_offline.")]
    assert "dadpo_offline.cli" in names and "dadpo_offline.cache.index" in names
    for name in names:
        if name != "dadpo_offline.__main__":
            importlib.import_module(name)


CORE = {"core", "cache", "errors", "files", "jsonl", "package_data", "manifest", "losses", "__init__"}
STAGES = {"precompute", "train", "eval", "prune"}
READERS = {"plan", "report"}  # describe a run from the manifest and its files: they stand on the core only
DRIVERS = {"pipeline", "sweep", "cli", "__main__"}  # run the stages


def package_imports() -> dict[str, set[str]]:
    """Top-level part of dadpo_offline each module imports (module-level and inside functions)."""
    root = Path(dadpo_offline.__file__).parent
    tops = {p.stem for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    found = {}
    for path in sorted(root.rglob("*.py")):
        module = path.relative_to(root).with_suffix("").parts
        parts = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = module[:len(module) - node.level]  # a package's __init__ counts as one of its modules
                target = base + tuple((node.module or "").split(".")) if node.module else base
                names = [target] if node.module else [base + (alias.name,) for alias in node.names]
                parts |= {t[0] for t in names if t}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                absolute = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                parts |= {n.split(".")[1] for n in absolute if n and n.startswith("dadpo_offline.")}
        found["/".join(module)] = {part if part in tops else "__init__" for part in parts} - {module[0]}
    return found


def layer(part: str) -> str:
    for name, members in (("core", CORE), ("stage", STAGES), ("reader", READERS), ("driver", DRIVERS)):
        if part in members:
            return name
    raise AssertionError(f"dadpo_offline/{part}: not placed in a layer of test_imports.py")


def test_stages_stand_side_by_side_on_the_core():
    """The core imports no stage; a stage, plan and report import only the core; only run/cli drive stages.

    Run `pytest tests/test_imports.py -q` to check the graph; a failure lists every offending import.
    """
    allowed = {"core": {"core"}, "stage": {"core"}, "reader": {"core"}, "driver": {"core", "stage", "reader", "driver"}}
    wrong = [f"{module} imports {part} ({layer(module.split('/')[0])} → {layer(part)})"
             for module, parts in package_imports().items() for part in sorted(parts)
             if layer(part) not in allowed[layer(module.split("/")[0])]]
    assert not wrong, "\n".join(wrong)
