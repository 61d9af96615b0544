"""Bad input, by kind: each error names the file and record, and carries a reason the skip counters use."""

from __future__ import annotations

# Every reason a record can be refused for; skip counters keep one small code per reason.
REASONS = (
    "malformed",
    "empty_answer",
    "image_outside_folder",
    "missing_image",
    "corrupt_image",
    "image_count_mismatch",
    "too_long",
    "no_trained_tokens",
    "image_too_large",
)


class BadRecordError(ValueError):
    """A record that cannot become a training sample; `reason` is one of `REASONS`, such as `missing_image`.

    `detail` is the message without the source, for reports that name the source themselves."""

    def __init__(self, source: str, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}; add it to REASONS")
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.reason = reason
        self.detail = detail
