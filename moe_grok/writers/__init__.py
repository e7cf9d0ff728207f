"""Where a run's numbers and progress go: scalar writers (`JsonlWriter`, `TensorBoardWriter`: see
scalar_writer for the protocol) and `progress` (bars on a terminal, plain lines in a log). Layer 0:
imports nothing of moe_grok but the other layer-0 modules."""
from moe_grok.writers.jsonl import JsonlWriter
from moe_grok.writers.scalar_writer import ScalarWriter, checked_scalars
from moe_grok.writers.tensorboard import TensorBoardWriter

__all__ = ["JsonlWriter", "ScalarWriter", "TensorBoardWriter", "checked_scalars"]
