"""The self-improvement loop: sample answers from a run, score them, turn them into pairs, train again, measure."""
