"""The offline tagger: InsTag-like tags of an instruction from its words alone, deterministic, no model.

Each sentence of an instruction is read from its first real word (politeness such as "could you please" skipped):
- a question word gives the question type - `what question`, `where question`, `how many question` (and
  `counting`), `why question` (and `reasoning`), ... - and an auxiliary verb first (`is`, `are`, `does`, `can` ...)
  a `yes/no question`; the first content word after it is the question's topic (`color`, `man`, `truck`);
- any other first word is read as an imperative verb, and with the first content word after it makes a verb-object
  head: `describe image`, `count object`, `explain content`;
- phrases that ask for more add a tag of their own: `detailed` ("in detail"), `brief`, `step by step`.
The tags come as written; `llava_lite.curate.tags` normalises them (case, plurals, -ing and -ed, synonyms).
"""

from __future__ import annotations

import re

from llava_lite.data.conversation import IMAGE_PLACEHOLDER

QUESTION_WORDS = ("what", "where", "why", "who", "whom", "whose", "when", "which", "how")
AUXILIARIES = {
    "is", "are", "was", "were", "am", "do", "does", "did", "can", "could", "will", "would", "should", "shall",
    "has", "have", "had", "may", "might", "must", "isn't", "aren't", "doesn't", "don't", "didn't", "can't",
}  # fmt: skip
# Politeness and connectives before the instruction's real first word ("Could you please describe ...").
FILLERS = {"please", "kindly", "now", "also", "and", "so", "then", "next", "finally", "first", "lastly", "okay", "ok"}
# Verbs that wrap a question: "tell me what ...", "determine whether ...".
EMBEDDING_VERBS = {"tell", "let", "say", "determine", "know", "guess", "identify", "figure", "find", "see", "check"}
# "Can you / could you / would you ..." before a verb is a request, not a yes/no question.
REQUEST_OPENERS = {"can", "could", "would", "will"}
# Words that carry no topic: articles, pronouns, auxiliaries, and the adjectives instructions wrap around nouns.
NOT_TOPICS = {
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "it's", "they", "them", "their", "there", "here",
    "he", "she", "his", "her", "him", "you", "your", "i", "me", "my", "we", "us", "our", "one", "ones", "some", "any",
    "of", "in", "on", "at", "to", "for", "with", "by", "from", "about", "into", "as", "or", "and", "if", "whether",
    "be", "being",
    "been", "not", "no", "all", "each", "every", "both", "more", "most", "many", "much", "very", "so", "such",
    "kind", "type", "sort", "way", "ways", "thing", "things", "going", "doing", "happening", "like", "seen", "see",
    "following", "given", "provided", "shown", "above", "below", "main", "key", "overall", "visual", "brief",
    "briefly", "short", "concise", "detailed", "detail", "possible", "potential", "might", "may", "likely",
    "step", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", *AUXILIARIES, *QUESTION_WORDS,
}  # fmt: skip
# Phrases that ask for more (or less) than the question itself: tags of their own, which complexity counts.
MODIFIERS = {
    "detailed": ("in detail", "detailed", "thorough", "elaborate", "comprehensive"),
    "brief": ("briefly", "brief", "concise", "short", "in a few words", "one sentence", "single word"),
    "step by step": ("step by step", "step-by-step", "reasoning", "explain your", "justify"),
}
SENTENCE = re.compile(r"[^.?!\n;]+[.?!\n;]*")
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def heuristic_tags(instruction: str) -> list[str]:
    """The instruction's tags, in the order found, without repeats."""
    text = instruction.replace(IMAGE_PLACEHOLDER, " ").lower()
    tags: list[str] = []
    for sentence in SENTENCE.findall(text):
        tags += sentence_tags(WORD.findall(sentence), sentence.rstrip().endswith(("?", "？")))
    padded = f" {' '.join(WORD.findall(text))} "
    for tag, phrases in MODIFIERS.items():
        if any(f" {phrase} " in padded for phrase in phrases):
            tags.append(tag)
    return list(dict.fromkeys(tags))


def sentence_tags(words: list[str], asks: bool) -> list[str]:
    """Tags of one sentence's words; `asks` says whether it ended with a question mark."""
    words = _without_fillers(words)
    if not words:
        return ["question"] if asks else []
    head = words[0]
    if head in ("tell", "let") and len(words) > 2 and words[1] == "me":  # "tell me what ...", "let me know why ..."
        words = [head, *(words[2:] if head == "tell" else words[3:])]
    if head in EMBEDDING_VERBS and len(words) > 1:  # "tell if ...", "determine whether ...", "tell me why ..."
        if words[1] in ("if", "whether"):
            return ["yes/no question", *_topic(words[2:])]
        if words[1] in QUESTION_WORDS:
            return _question_tags(words[1:])
    if head in QUESTION_WORDS:
        return _question_tags(words)
    if head in AUXILIARIES:
        if head in REQUEST_OPENERS and len(words) > 2 and words[1] == "you":  # "can you describe ..."
            return sentence_tags(words[2:], asks)
        return ["yes/no question", *_topic(words[1:])]
    if head in NOT_TOPICS:  # a statement ("the image shows ..."): context, not an instruction
        return ["question"] if asks else []
    objects = _topic(words[1:])
    return [f"{head} {objects[0]}" if objects else head]


def _question_tags(words: list[str]) -> list[str]:
    head = words[0]
    if head == "how" and len(words) > 1 and words[1] in ("many", "much"):
        return [f"how {words[1]} question", "counting", *_topic(words[2:])]
    tags = [f"{head} question"]
    if head == "why":
        tags.append("reasoning")
    return tags + _topic(words[1:])


def _topic(words: list[str]) -> list[str]:
    """The first content word, as a one-tag list (empty when there is none)."""
    return next(([word] for word in words if word not in NOT_TOPICS and not word.isdigit()), [])


def _without_fillers(words: list[str]) -> list[str]:
    start = 0
    while start < len(words) and words[start] in FILLERS:
        start += 1
    return words[start:]
