"""What every absl launcher in experiments/ and benchmarks/ shares."""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from absl import flags, logging


def config_module(directory: str, name: str) -> ModuleType:
    """The config file <directory>/<name>.py, loaded by path the way ml_collections' config flags load
    a config file (config files import their neighbours with it)."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(directory, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quiet_logs() -> None:
    """WARNING-level absl logging unless --verbosity was given: orbax logs every checkpoint read at INFO.
    Launchers call this from main(); library code never changes logging. Progress lines
    (writers.progress) go to stderr without logging, so they stay."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
