"""Packaging: setup.py declares exactly what the package imports; the version and the public API resolve."""
import ast
import importlib.metadata
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGE = os.path.join(ROOT, "moe_grok")
# Imported only inside a function that the named optional extra serves (the core runs without them).
OPTIONAL_IMPORTS = {"huggingface_hub": "hub", "torch": "hf", "transformers": "hf"}


def _setup_call() -> ast.Call:
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    calls = (node for node in ast.walk(tree) if isinstance(node, ast.Call))
    return next(call for call in calls if getattr(call.func, "attr", "") == "setup")


def _keyword(call: ast.Call, name: str):
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _top_level_imports() -> set[str]:
    names = set()
    for directory, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(directory, file)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(alias.name.split(".")[0] for alias in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"moe_grok"}


def test_install_requires_is_exactly_what_the_package_imports():
    providers = importlib.metadata.packages_distributions()
    imported = {}
    for module in _top_level_imports():
        assert module in providers, f"moe_grok imports {module!r}, which no installed distribution provides"
        imported[module] = _distribution(providers[module][0])
    call = _setup_call()
    required = {_distribution(r) for r in _keyword(call, "install_requires")}
    extras = {name: {_distribution(r) for r in reqs} for name, reqs in _keyword(call, "extras_require").items()}
    core = {dist for module, dist in imported.items() if module not in OPTIONAL_IMPORTS}
    assert sorted(core - required) == [], "imported but not declared in install_requires"
    assert sorted(required - core) == [], "declared in install_requires but never imported"
    for module, extra in OPTIONAL_IMPORTS.items():
        assert imported.get(module) in extras[extra], f"{module} belongs to the [{extra}] extra"


def test_the_package_says_its_version():
    import moe_grok

    assert moe_grok.__version__ == _keyword(_setup_call(), "version")


def test_every_public_name_resolves():
    import moe_grok

    for name in moe_grok.__all__:
        assert getattr(moe_grok, name) is not None, name
    assert {"analyze", "AnalysisOptions", "group_pathway_distance", "pathway_consistency"} <= set(moe_grok.__all__)
