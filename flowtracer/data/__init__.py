"""Data: task sources (local files, `datasets` hub ids, reasoning-gym), prompt formatting and the
step-addressed PromptDataModule. A row is ``{"question", "answer", "verifier", "meta"}``."""

from flowtracer.data.datamodule import DEFAULT_INSTRUCTION, PromptDataModule
from flowtracer.data.prompts import format_prompt, user_message
from flowtracer.data.sources import GRAMMAR, DataError, load_rows, reasoning_gym_rows

__all__ = [
    "DEFAULT_INSTRUCTION", "GRAMMAR", "DataError", "PromptDataModule", "format_prompt",
    "load_rows", "reasoning_gym_rows", "user_message",
]
