"""Experiments on a real pretrained model (all-MiniLM-L6-v2, offline) with real text.

``python -m experiments.planted_rank``: does AdaLoRA put rank where a teacher needs
it, and does it beat LoRA at the same budget? ``python -m experiments.forgetting``:
does EWC++ keep MicroLoRA from forgetting a first task? ``python -m experiments``
runs both (and the demo) and redraws the figures in docs/img. Run from the
repository root; docs/experiments.md has the commands and the recorded numbers.
"""
