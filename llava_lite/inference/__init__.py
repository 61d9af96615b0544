"""Inference: answers from a trained model folder, batched or streamed."""
