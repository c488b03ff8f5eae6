"""The contract and the math that coordinator and worker both need. Imports neither side."""

__version__ = "0.1.0"
# Bumped on any incompatible change of the wire protocol; workers and coordinator must agree.
# 2: tasks of stage 'eval' (the final evaluation: no training, no upload; complete with metrics).
# 3: a task's steps and loss (probe options). 4: training.alone_epochs (a model trained alone as a
# candidate of the client's validation choice): a protocol-3 worker would ignore it.
# 5: tasks of stage 'refine' (the losses of the root and of each cluster adapter in the task's
# candidates, reported as metrics; clustering.refine_rounds).
# 6: the federation's classes, preprocessing and training.precision.
# 7: a task's `evaluate` (schedule.evaluate_every: root and cluster tasks evaluate the adapters they
# receive only in some rounds).
# 8: training.leaf_bias_fit. 9: training.leaf_bias_fit_skewed (a wider prior for the bias fit of a
# client whose labels are not uniform): a protocol-8 worker would fit every client with one width.
# 10: training.leaf_mix (a client whose labels look uniform takes its leaf part of the way from
# root + cluster): a protocol-9 worker would evaluate the leaf as trained.
PROTOCOL_VERSION = 10
