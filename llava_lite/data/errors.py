"""Bad input, by kind: each error names the file and record, and carries a reason the skip counters use."""

from __future__ import annotations


class BadRecordError(ValueError):
    """A record that cannot become a training sample; `reason` is a short key such as `missing_image`.

    `detail` is the message without the source, for reports that name the source themselves."""

    def __init__(self, source: str, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.reason = reason
        self.detail = detail
