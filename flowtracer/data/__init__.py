"""Data: task sources (local files and hub ids through `datasets`, reasoning-gym, chains), the
declarative row step (filter, map, field mapping), prompt formatting and the step-addressed
PromptDataModule. A row is ``{"question", "answer", "verifier", "meta"}``."""

from flowtracer.data.datamodule import DEFAULT_INSTRUCTION, PromptDataModule
from flowtracer.data.prompts import format_prompt, user_message
from flowtracer.data.rows import DataError, RowFilter, Rows
from flowtracer.data.sources import GRAMMAR, load_rows, reasoning_gym_dataset

__all__ = [
    "DEFAULT_INSTRUCTION", "GRAMMAR", "DataError", "PromptDataModule", "RowFilter", "Rows", "format_prompt",
    "load_rows", "reasoning_gym_dataset", "user_message",
]
