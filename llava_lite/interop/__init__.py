"""Interop: export to transformers' Llava format (open_clip towers converted to CLIP), merged adapters."""
