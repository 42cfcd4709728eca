"""One user message ``context + "\n\n" + question`` rendered with the chat template, cut in two.

The context part (template head, the context) can be cached and compressed before the question
arrives; the question part (the question, the template's tail up to the answer) follows it::

    <|im_start|>user\n{context}\n\n | {question}<|im_end|>\n<|im_start|>assistant\n
    └──────────── context ids ─────┘ └────────────── prompt ids ───────────────────┘

Used by the engine's requests with a context (``baklava-run --context-file``) and by the quality
benchmark's prompts, so both cut where the benchmark measures.
"""

from __future__ import annotations


class ChatSplit:
    """The chat template of ``tokenizer`` cut around a body and a question (plain text when
    ``chat`` is off or the tokenizer has no template)."""

    _BODY, _CUT = "\u0000BODY\u0000", "\u0000QUESTION\u0000"

    def __init__(self, tokenizer, chat: bool = True):
        self.tokenizer = tokenizer
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        if self.chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{self._BODY}\n\n{self._CUT}"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        else:
            text = f"{self._BODY}\n\n{self._CUT}\n"
        head, self.tail = text.split(self._CUT)
        self.head_pre, self.head_post = head.split(self._BODY)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_ids(self, body: str) -> list[int]:
        """The template's head and ``body`` (what is cached before the question)."""
        return self.encode(f"{self.head_pre}{body}{self.head_post}")

    def question_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        """``question``, the template's tail, and the start of the answer."""
        return self.encode(f"{question}{self.tail}{answer_prefix}")
