"""Evaluation: perplexities, VQA accuracy, a judged LLaVA-Bench score, reports, and evaluation during training."""
