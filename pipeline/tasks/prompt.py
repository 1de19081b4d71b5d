"""The prompt every task shares: a system message asking for one step per line and a final
`Answer:` line, rendered with the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.lm.generation import chat_prompt

SYSTEM_PROMPT = (
    "Solve the problem step by step. Write short steps, one step per line. "
    "End with a final line of the form:\nAnswer: <value>"
)


def to_messages(question: str) -> list[dict]:
    """Chat messages for the tokenizer's chat template."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def render_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    return [chat_prompt(tokenizer, to_messages(q)) for q in questions]


def task_prompts(tokenizer, task, problems: Sequence) -> list[str]:
    """Each problem's prompt as its task words it (`Task.messages`), in the chat template."""
    return [chat_prompt(tokenizer, task.messages(p)) for p in problems]
