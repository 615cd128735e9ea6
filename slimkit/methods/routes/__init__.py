"""Routes to the same slim network (the KELS widths of a split rate): its architecture initialised
afresh for training from scratch (slim.py), pruning by an importance criterion (prune.py), and
knowledge distillation's loss (distill.py)."""
