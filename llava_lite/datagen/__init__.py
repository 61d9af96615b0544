"""Instruction data from captions and boxes: the LLaVA data engine as a tool (`llava-lite datagen`).

Data flows one way: annotations (inputs) -> a text context per image -> one request per image and kind
(prompts) -> a backend's reply -> parsed turns, filtered (parse, filters) -> the journal and final files (writer).
`pipeline` runs it all with bounded concurrency, a progress bar and a summary.
"""
