"""Instruction data from captions and boxes: the LLaVA data engine as a tool (`llava-lite datagen`).

Data flows one way: annotations (`llava_lite.data.annotations`) -> a text context per image -> one request per
image and kind (prompts) -> an LLM backend's reply (`llava_lite.llm`, or the offline `template_backend`) -> parsed
turns, filtered (parse, filters) -> the journal (`llava_lite.llm.journal`) and the final files. `run`
(`run_datagen`) drives one run; `pipeline` runs its tasks with bounded concurrency, a progress bar and a summary.
"""
