"""The contract and the math that coordinator and worker both need. Imports neither side."""

__version__ = "0.1.0"
# Bumped on any incompatible change of the wire protocol; workers and coordinator must agree.
# 2: tasks of stage 'eval' (the final evaluation: no training, no upload; complete with metrics).
PROTOCOL_VERSION = 3
