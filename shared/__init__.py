"""The contract and the math that coordinator and worker both need. Imports neither side."""

__version__ = "0.1.0"
# Bumped on any incompatible change of the wire protocol; workers and coordinator must agree.
PROTOCOL_VERSION = 1
