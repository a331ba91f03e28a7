"""Prompt text for one question, and where the question sits in it (the flow source span)."""

from __future__ import annotations

from flowtracer.data.rows import DataError


def user_message(question: str, instruction: str | None = None) -> str:
    """The user turn: the question, then the instruction on its own paragraph.

    An instruction containing ``{question}`` is a template instead (the question is put there).
    """
    if not instruction:
        return question
    if "{question}" in instruction:
        return instruction.replace("{question}", question)
    return f"{question}\n\n{instruction}"


def format_prompt(
    tokenizer,
    question: str,
    *,
    system_prompt: str | None = None,
    instruction: str | None = None,
    use_chat_template: bool = True,
) -> tuple[str, tuple[int, int] | None]:
    """The prompt text and the [start, end) character span of `question` inside it.

    With ``use_chat_template`` the tokenizer's chat template renders [system?, user] with the
    generation prompt (the assistant header) appended; without it the text is the system prompt
    (if any), a blank line, and the user message. The span is the last occurrence of the question
    (a system prompt may quote it); None if the template rewrote it beyond recognition.
    """
    content = user_message(question, instruction)
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template (a base model?); set data.use_chat_template: false "
                "to prompt with the plain question text"
            )
        messages = [{"role": "user", "content": content}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{system_prompt}\n\n{content}" if system_prompt else content
    start = text.rfind(question) if question else -1
    return text, (None if start < 0 else (start, start + len(question)))
