"""The model: vision tower -> projector -> causal LM, with image features scattered into image-token slots."""
