"""What every absl launcher in experiments/ and benchmarks/ shares."""
from __future__ import annotations

from absl import flags, logging


def quiet_logs() -> None:
    """WARNING-level absl logging unless --verbosity was given: orbax logs every checkpoint read at INFO.
    Launchers call this from main(); library code never changes logging."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
