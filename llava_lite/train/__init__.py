"""Training: stage-1 and stage-2 recipes over transformers' Trainer."""
