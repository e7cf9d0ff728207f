"""The layout is the architecture (docs/architecture.md): imports point down the layers only."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGE = os.path.join(ROOT, "moe_grok")
LAYERS = {  # module prefix -> layer; a module may import only modules of its own or a lower layer
    "moe_grok.sharding": 0, "moe_grok.config": 0, "moe_grok.locking": 0, "moe_grok.strict_json": 0,
    "moe_grok.atomic_files": 0, "moe_grok.writers": 0, "moe_grok.npy_files": 0,
    "moe_grok.data": 1,
    "moe_grok.analysis": 2,
    "moe_grok.model": 3,
    "moe_grok.extraction": 4,
    "moe_grok.checkpoints": 5, "moe_grok.training": 5, "moe_grok.theory": 5,
    "moe_grok.report": 6,
    "moe_grok.pipeline": 7, "moe_grok.monitor": 7,
    "moe_grok.studies": 8, "moe_grok.integrations": 8,
    "moe_grok.configs": 8,  # config files build on studies.launch.config_module
    "moe_grok.cli": 9,
}
# torch and transformers are test-only, except in the optional integrations (moe_grok[hf]): torch in
# moe_grok.integrations, transformers in its Trainer callback only.
FRAMEWORK_IMPORTS = {"torch": ("moe_grok.integrations",), "transformers": ("moe_grok.integrations.hf_trainer",)}


def _layer(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} belongs to no layer of docs/architecture.md"
    return LAYERS[max(matches, key=len)]


def _modules():
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield module, path


def _imports(path: str):
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if any(isinstance(a, ast.alias) for a in node.names) and node.module in ("moe_grok",):
                yield from (f"moe_grok.{alias.name}" for alias in node.names)
            else:
                yield node.module


@pytest.mark.parametrize("module,path", sorted(_modules()))
def test_imports_point_down_the_layers(module, path):
    own = _layer(module)
    for imported in _imports(path):
        if imported.startswith("moe_grok"):
            assert _layer(imported) <= own, f"{module} (layer {own}) imports {imported} (layer {_layer(imported)})"
        framework = imported.split(".")[0]
        if framework in FRAMEWORK_IMPORTS:
            allowed = FRAMEWORK_IMPORTS[framework]
            assert module.startswith(allowed), f"{module} imports {imported}: only {allowed} may"
        assert imported != "matplotlib.pyplot", f"{module} uses pyplot: use matplotlib.figure.Figure"


ANALYSIS_MUST_NOT_IMPORT = ("moe_grok.model", "moe_grok.extraction", "moe_grok.checkpoints", "moe_grok.training",
                            "moe_grok.theory", "moe_grok.report")


def test_analysis_is_pure_array_math():
    """analysis/ reads per-checkpoint arrays only: no model, extraction, checkpoint loading or training."""
    modules = [(m, p) for m, p in _modules() if m.startswith("moe_grok.analysis.")]
    assert len(modules) > 5, modules
    offenders = [(m, imported) for m, p in modules for imported in _imports(p)
                 if imported.startswith(ANALYSIS_MUST_NOT_IMPORT)]
    assert offenders == []


def test_the_data_layer_loads_without_jax_or_flax():
    code = "import sys, moe_grok.data.corpus, moe_grok.data.tasks; print('jax' in sys.modules, 'flax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_repository_stands_on_its_own():
    offenders = []
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "build", "__pycache__")
                   and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith((".py", ".md", ".toml", ".cfg", ".txt")) or name == "run":
                with open(os.path.join(directory, name), errors="replace") as f:
                    text = f.read()
                if "SP" + "EC" in text or "../sha" + "red" in text:  # spelled apart so this file passes
                    offenders.append(os.path.relpath(os.path.join(directory, name), ROOT))
    assert offenders == [], offenders


def test_every_dispatch_kernel_is_named_in_the_config():
    from moe_grok.config import MOE_IMPLS
    from moe_grok.model.dispatch import EXPERT_IMPLS

    assert ("auto", *EXPERT_IMPLS) == MOE_IMPLS
