"""Named answer checkers a dataset's YAML picks (`curation.answer_check`), so the pipeline
knows no dataset by name.

Answers are compared with math-verify: `#### $18`, `#### 18.00` and `#### 18` all mean 18.
Its signal-based timeouts work only in a process's main thread and Prefect runs tasks in worker
threads, so they are off, and a short line is no bound on its work (`#### 9^9^9^9` never
finishes): only a line written as a GSM8K number (`GSM8K_NUMBER`) reaches it; any other answer
is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from math_verify import parse, verify

FINAL_ANSWER_MARK = "####"
MAX_ANSWER_CHARS = 100
#: A plain number, as GSM8K writes its answers: `18`, `-3`, `$18`, `1,000`, `18.00`, `18.`, `50%`.
GSM8K_NUMBER = re.compile(r"[-+]?\$?\s*[\d,]*\.?\d+\s*%?\.?")


def gsm8k_final_answer_text(text: str | None) -> str | None:
    """What follows the first `####` of `text`, up to the end of that line; None without one."""
    head, mark, tail = (text or "").partition(FINAL_ANSWER_MARK)
    if not mark:
        return None
    line = tail.strip().split("\n", 1)[0].strip()
    return line[:MAX_ANSWER_CHARS] or None


def gsm8k_final_answer(completion: str | None, reference: str | None) -> bool:
    """Whether the completion's `#### <answer>` line is a number equal to the reference's
    final answer; anything but a plain number is wrong, and never parsed."""
    answer, expected = gsm8k_final_answer_text(completion), gsm8k_final_answer_text(reference)
    if answer is None or expected is None:
        return False
    if not (GSM8K_NUMBER.fullmatch(answer) and GSM8K_NUMBER.fullmatch(expected)):
        return False
    parsed_expected = parse(expected, parsing_timeout=None)
    parsed_answer = parse(answer, parsing_timeout=None)
    if not parsed_expected or not parsed_answer:
        return False
    return bool(verify(parsed_expected, parsed_answer, timeout_seconds=None))


ANSWER_CHECKS: dict[str, Callable[[str | None, str | None], bool]] = {
    "gsm8k_final_answer": gsm8k_final_answer,
}
