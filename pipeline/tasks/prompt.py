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


def render_prompts(tokenizer, questions: Sequence[str]) -> list[str]:
    return [chat_prompt(tokenizer, to_messages(q)) for q in questions]


def task_prompts(tokenizer, task: Task, problems: Sequence) -> list[str]:
    """Each problem's prompt as its task words it (`Task.messages`), in the chat template."""
    return chat_prompts(tokenizer, [task.messages(p) for p in problems])


def chat_prompts(tokenizer, conversations: Sequence[list[dict]]) -> list[str]:
    """Chat messages in the tokenizer's chat template, ready to continue."""
    return [chat_prompt(tokenizer, messages) for messages in conversations]
