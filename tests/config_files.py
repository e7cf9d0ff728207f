"""The launchers' config files (configs/*.py), loaded the way ml_collections' config flags load them."""
import importlib.util
import os

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")


def load_config(name: str):
    """configs/<name>.py's get_config()."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(CONFIG_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
