"""The package's layout holds: the shipped model files stand alone, nothing edits `sys.path`, every benchmark runs
both as a module and as a script."""

import ast
import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, tiny_model
from transformers.dynamic_module_utils import get_relative_import_files


PACKAGE = ROOT / "modeling_llada_moe"
BENCHMARKS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")


def forbidden_imports(path, root=ROOT) -> list[str]:
    """`line: module` for each import in a flat model file (function-level ones included) that a Hub folder could
    not satisfy: the app layer, `trl_ext`, `quantization`, or `modeling_llada_moe` imported absolutely."""
    package = path.relative_to(root).parts[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            module = ".".join([package] + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
            if path.name != "__init__.py" and (node.module == package or node.module.startswith(package + ".")):
                found.append(f"{node.lineno}: {node.module} (absolute)")
        else:
            continue
        forbidden = (f"{package}.apps", "trl_ext", "quantization")
        found += [f"{node.lineno}: {n}" for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
    return found


def shipped_files() -> list:
    source = PACKAGE / "modeling_llada_moe.py"
    return [source, *map(type(source), get_relative_import_files(str(source)))]


def test_shipped_files_are_exactly_the_flat_model_files():
    # The remote-code loader copies sibling files only: every flat file is shipped, and nothing else is.
    shipped = {path.name for path in shipped_files()}
    flat = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py"}
    assert shipped == flat, f"flat files not shipped: {flat - shipped}; shipped but not flat: {shipped - flat}"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda path: path.name)
def test_shipped_model_files_import_nothing_from_the_app_layer_trl_ext_or_quantization(path):
    assert forbidden_imports(path) == []


def test_the_import_check_finds_each_kind_of_bad_import(tmp_path):
    (tmp_path / "modeling_llada_moe").mkdir()
    probe = tmp_path / "modeling_llada_moe" / "probe.py"
    probe.write_text(
        "from .configuration_llada_moe import LLaDAMoEConfig\n"
        "def f():\n    from .apps.cli import main\n    import trl_ext\n"
        "    from quantization.loading import load_quantized\n"
        "    from modeling_llada_moe.modeling_llada_moe import LLaDAMoEModel\n"
        "    from . import apps\n"
    )
    assert forbidden_imports(probe, tmp_path) == [
        "3: modeling_llada_moe.apps.cli",
        "4: trl_ext",
        "5: quantization.loading",
        "6: modeling_llada_moe.modeling_llada_moe (absolute)",
        "7: modeling_llada_moe.apps",
    ]


def test_no_file_edits_sys_path():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"insert", "append", "extend"}
                and ast.unparse(node.func.value) == "sys.path"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_every_benchmark_answers_help_as_a_module_and_as_a_script(tmp_path):
    # One process runs each benchmark's --help both ways: as `python -m benchmarks.X` (from the repository root) and
    # as `python benchmarks/X.py` (from elsewhere: the script's folder, not the root, is on the path).
    probe = textwrap.dedent(
        """
        import json, runpy, sys
        root, names = sys.argv[1], json.loads(sys.argv[2])
        codes = {}
        for name in names:
            for form in ("module", "script"):
                sys.argv = [name, "--help"]
                try:
                    if form == "module":
                        sys.path.insert(0, root)
                        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
                    else:
                        sys.path.insert(0, f"{root}/benchmarks")
                        runpy.run_path(f"{root}/benchmarks/{name}.py", run_name="__main__")
                    code = "no exit"
                except SystemExit as exit:
                    code = exit.code
                except Exception as error:
                    code = f"{type(error).__name__}: {error}"
                finally:
                    sys.path.pop(0)
                    for module in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
                        del sys.modules[module]
                codes[f"{form} {name}"] = code
        print(json.dumps(codes))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT), json.dumps(BENCHMARKS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == {f"{form} {name}": 0 for name in BENCHMARKS for form in ("module", "script")}


def test_a_saved_folder_holds_the_shipped_files_and_no_app_code(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    saved = {path.name for path in tmp_path.glob("*.py")}
    assert saved == {path.name for path in shipped_files()}


def test_no_test_skips_on_a_missing_dev_dependency():
    # Everything the suite imports comes with the `dev` extra: a broken install must fail the run, not skip tests.
    offenders = [
        f"{path.name}:{node.lineno}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) in {"pytest.importorskip", "importorskip"}
    ]
    assert offenders == []
