"""Rebuild the tokenizer shipped in llava_lite/assets/tiny_tokenizer (see llava_lite/model/tiny_tokenizer.py)."""

from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR, write_tiny_tokenizer

if __name__ == "__main__":
    write_tiny_tokenizer(TINY_TOKENIZER_DIR)
    print(f"wrote {TINY_TOKENIZER_DIR}")
