"""Rendering a task's chat messages with the tokenizer's chat template. Each task owns its
prompt (`Task.messages`); tasks without their own use SYSTEM_PROMPT (one step per line, a final
`Answer:` line)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.lm.generation import chat_prompt
from pipeline.tasks.base import SYSTEM_PROMPT, Task


def to_messages(question: str) -> list[dict]:
    """Chat messages with the default system prompt (tasks without their own prompt)."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def render_prompts(tokenizer, questions: Sequence[str], task: Task | None = None) -> list[str]:
    """Chat-templated prompts; `task` supplies its own messages (system prompt, worked example)."""
    messages = task.messages if task is not None else to_messages
    return [chat_prompt(tokenizer, messages(q)) for q in questions]
