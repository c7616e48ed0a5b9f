"""Prompt templates: a name in `PROMPT_TEMPLATES`, a format string holding ``{question}``, or a
`ChatPrompt` rendered through the tokenizer's chat format (`polopt.prompts.chat`)."""

from __future__ import annotations

from dataclasses import dataclass

from polopt.errors import DataError


@dataclass(frozen=True)
class ChatPrompt:
    """A template rendered through the tokenizer's chat format: `user` (with {question}) as the user turn."""

    user: str = "{question}"


QWEN_BOXED_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{question}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

DEFAULT_TEMPLATE = "{question}"  # the question as it is: what every template setting defaults to

PROMPT_TEMPLATES: dict[str, str | ChatPrompt] = {
    # plain-text continuation prompts (base models, the tiny arithmetic model)
    "plain": DEFAULT_TEMPLATE,
    "qwen_boxed": "{question}\n" + QWEN_BOXED_SUFFIX,
    "dapo": DAPO_TEMPLATE,  # score with MathVerifier(answer_format="answer_line")
    # through the tokenizer's chat template: user turn, then an open assistant turn
    "chat": ChatPrompt("{question}"),
    "qwen_boxed_chat": ChatPrompt("{question}\n" + QWEN_BOXED_SUFFIX),
    "dapo_chat": ChatPrompt(DAPO_TEMPLATE),
}


def resolve_template(template: str | ChatPrompt, key: str = "template") -> str | ChatPrompt:
    """A name in PROMPT_TEMPLATES, a ChatPrompt, or a format string holding ``{question}``."""
    if isinstance(template, ChatPrompt):
        resolved: str | ChatPrompt = template
    elif template in PROMPT_TEMPLATES:
        resolved = PROMPT_TEMPLATES[template]
    else:
        resolved = template
    text = resolved.user if isinstance(resolved, ChatPrompt) else resolved
    if not isinstance(text, str) or "{question}" not in text:
        raise DataError(
            f"prompt template {key}={template!r} is neither a known name ({', '.join(PROMPT_TEMPLATES)}) "
            "nor a format string containing '{question}'"
        )
    return resolved


def _fill(template: str, question: str) -> str:
    # Literal substitution, not str.format: templates and questions hold LaTeX braces (\boxed{}).
    return template.replace("{question}", question)
