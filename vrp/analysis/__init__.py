"""Analyses of the activation lake (numpy, scipy, scikit-learn; never torch or a model).

- ``stats``: R_pb with p, Fisher and vectorised bootstrap CIs, AUROC, Benjamini-Hochberg, McNemar.
- ``probes``: held-out probes per layer (image-grouped stratified K-fold), last-5, MLP, neuron rankings.
- ``margins``: logit-lens margin curves by correctness, lock-in layers, spatial-entropy deltas.
- ``data``: what the analyses read from the lake, aligned by sample (named queries in ``vrp/queries``).
- ``compute``: the study's analyses composed on a lake; ``report``: Markdown + HTML; ``commands``: CLI.
- ``synthetic``: small lakes with planted signals, for tests and trying the commands.
"""
