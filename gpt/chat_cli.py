"""`gpt chat`: a multi-turn conversation with a chat checkpoint, through the one chat template.

    gpt chat --checkpoint runs/demo/sft/checkpoints/last.ckpt --system "Be brief."
    > What is 12 + 7?
    19
    > /reset          forget the conversation (the system turn stays)
    > /exit           or Ctrl-D; Ctrl-C during a reply cancels that reply

Not on a terminal, stdin is read as a conversation, in one of two forms (scripts and tests):
- lines: each non-empty line is the next user message (or /reset, /exit); the output is the
  transcript, `> message` then the streamed reply, one exchange after another;

      printf 'Remember the word king.\\nWhat was the word?\\n' | gpt chat --checkpoint CKPT --temperature 0

- JSON: a messages list ([{"role": "system"|"user"|"assistant", "content": ...}, ...], TRL's
  `messages`) ending with a user turn; the output is the one assistant reply that follows.

      echo '[{"role": "user", "content": "Sort: rain ship"}]' | gpt chat --checkpoint CKPT --temperature 0

Each prompt is `ChatTemplate.render_prompt` of the conversation so far (gpt/chat.py); the reply
streams as it is generated (gpt.generate with the KV cache, IncrementalDecoder) and ends at
end-of-turn `<|end|>` or end-of-text. A reply that reaches max_new_tokens without ending gets a
note on stderr. A conversation longer than the model's context loses its oldest exchanges
(user turn + reply; the system turn is kept) until the prompt leaves room for a reply of
max_new_tokens (at most half the context), with a one-line note on stderr. Sampling options
are `gpt sample`'s; turn k samples with seed + k, so the same input gives the same transcript.
Any checkpoint `gpt sample` reads works, a LoRA run's included (gpt.checkpoint merges it).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from gpt.chat import ChatFormatError, ChatTemplate, validate_messages
from gpt.generate import IncrementalDecoder, generate
from gpt.tokenizer import SPECIAL_TOKENS

COMMANDS_HELP = "/reset forgets the conversation, /exit quits"


def note(text: str) -> None:
    print(f"gpt: note: {text}", file=sys.stderr, flush=True)


@dataclass
class Turn:
    text: str
    ended: bool  # False: the reply ran to its token limit without <|end|>


def _history_text(text: str) -> str:
    """A reply as it goes back into the prompt: reserved token strings removed (the template refuses them)."""
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    return text


class ChatSession:
    """A conversation with a model: the history, its truncation to the context, and the replies."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, max_new_tokens: int = 256,
                 temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None,
                 seed: Optional[int] = 1337, notify: Callable[[str], None] = note):
        self.model, self.tokenizer, self.template = model, tokenizer, ChatTemplate(tokenizer)
        self.system = system
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.seed, self.notify = seed, notify
        self.turns: list[dict] = []  # user and assistant turns, alternating
        self.count = 0  # replies so far: turn k samples with seed + k
        if system is not None:
            validate_messages([{"role": "system", "content": system}])

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + self.turns

    def reset(self) -> None:
        self.turns = []

    def load(self, messages: list[dict]) -> None:
        """Take a conversation (e.g. from JSON): a leading system turn replaces --system."""
        validate_messages(messages)
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if messages[0]["role"] == "system":
            self.system = messages.pop(0)["content"]
        self.turns = messages

    def _fit(self) -> tuple[list[int], int]:
        """The prompt after dropping the oldest exchanges that do not fit, and the reply's token budget."""
        block = self.model.config.block_size
        reserve = min(self.max_new_tokens, block // 2)
        dropped = 0
        prompt = self.template.render_prompt(self.messages())
        while len(prompt) + reserve > block and len(self.turns) > 1:
            self.turns = self.turns[2:]  # the oldest user turn and its reply
            dropped += 1
            prompt = self.template.render_prompt(self.messages())
        if dropped:
            self.notify(f"the conversation is longer than the context ({block} tokens): dropped the oldest "
                        f"{dropped} exchange{'s' if dropped > 1 else ''}, kept {len(self.turns) // 2} and the system turn")
        room = block - len(prompt)
        if room < 1:
            self.turns = self.turns[:-1]
            raise ValueError(f"the message is too long: the prompt is {len(prompt)} tokens, the model's context "
                             f"{block}")
        return prompt, min(self.max_new_tokens, room)

    def reply(self, user: str, write: Callable[[str], None]) -> Turn:
        """Add a user turn, stream the model's reply through `write`, and add the reply as a turn."""
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns = self.turns[:-1]  # a reply that never came (interrupted) leaves no dangling turn
        self.turns.append({"role": "user", "content": user})
        try:
            validate_messages(self.messages())
        except ChatFormatError:
            self.turns.pop()
            raise
        return self.respond(write)

    def respond(self, write: Callable[[str], None]) -> Turn:
        """Stream the reply to the conversation so far (which ends with a user turn)."""
        prompt, budget = self._fit()
        dec = IncrementalDecoder(self.tokenizer)
        ids: list[int] = []

        def on_token(row: int, token_id: int) -> None:
            ids.append(token_id)
            piece = dec.push(token_id)
            if piece:
                write(piece)

        seed = None if self.seed is None else self.seed + self.count
        self.count += 1
        generate(self.model, [prompt], budget, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                 seed=seed, stop_ids=self.template.stop_ids, on_token=on_token)
        rest = dec.flush()
        if rest:
            write(rest)
        text = self.tokenizer.decode(ids)
        turn = Turn(text, ended=len(ids) < budget)
        if not turn.ended:
            self.notify(f"the reply reached {budget} tokens without ending its turn (raise --max_new_tokens)")
        self.turns.append({"role": "assistant", "content": _history_text(text)})
        return turn


def _stdout(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _command(session: ChatSession, line: str) -> Optional[bool]:
    """Handle /reset and /exit: True = quit, False = handled, None = not a command."""
    word = line.strip()
    if word in ("/exit", "/quit"):
        return True
    if word == "/reset":
        session.reset()
        note("conversation reset")
        return False
    if word.startswith("/") and " " not in word:
        note(f"unknown command {word}: {COMMANDS_HELP}")
        return False
    return None


def run_lines(session: ChatSession, lines: Iterable[str], echo: bool) -> None:
    """One user message per line; `echo` prints `> message` before each reply (a transcript)."""
    for line in lines:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        done = _command(session, line)
        if done:
            return
        if done is False:
            continue
        if echo:
            _stdout(f"> {line}\n")
        session.reply(line, _stdout)
        _stdout("\n")


def run_json(session: ChatSession, text: str) -> None:
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"stdin: not a JSON messages list (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        if session.system is not None and isinstance(messages, list) and messages \
                and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            raise ChatFormatError("both --system and a system message: give one")
        session.load(messages)
        if session.turns[-1]["role"] != "user":
            raise ChatFormatError(f"message {len(messages) - 1}: the conversation must end with a user turn "
                                  "for the model to answer")
    except ChatFormatError as e:
        raise ValueError(f"stdin: {e}") from None
    session.respond(_stdout)
    _stdout("\n")


def run_terminal(session: ChatSession) -> None:
    """The interactive loop: a `> ` prompt, streamed replies, Ctrl-C cancels the reply in progress."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    note(f"{COMMANDS_HELP}; context {session.model.config.block_size} tokens")
    while True:
        try:
            line = input("> ")
        except EOFError:
            _stdout("\n")
            return
        if not line.strip():
            continue
        done = _command(session, line)
        if done:
            return
        if done is False:
            continue
        try:
            session.reply(line, _stdout)
        except KeyboardInterrupt:  # the unanswered user turn is dropped by the next reply()
            note("reply cancelled")
        except ValueError as e:  # a message the template refuses, or one longer than the context
            print(f"gpt: error: {e}", file=sys.stderr, flush=True)
            continue
        _stdout("\n")


def _stdin_conversation(stream) -> tuple[str, Iterator[str] | str]:
    """("json", text) or ("lines", iterator over the lines, the first one included)."""
    lines = iter(stream)
    first = ""
    for first in lines:
        if first.strip():
            break
    if first.lstrip().startswith("["):
        return "json", first + "".join(lines)

    def chained() -> Iterator[str]:
        yield first
        yield from lines
    return "lines", chained()


def chat(checkpoint: str, system: Optional[str] = None, max_new_tokens: int = 256, temperature: float = 0.8,
         top_k: Optional[int] = 200, top_p: Optional[float] = None, seed: Optional[int] = 1337,
         device: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
    """Chat with a checkpoint: interactive on a terminal, else a conversation read from stdin.

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint dir, a native export or an HF directory.
        system: a system turn that opens the conversation (kept when old turns are dropped).
        max_new_tokens: most tokens per reply; the context keeps room for min(this, half of it).
        temperature: 0 = greedy.
        top_k: sample among the k most likely tokens (None or 0 = all).
        top_p: nucleus sampling threshold (None = off).
        seed: random seed; reply k uses seed + k, so the same input gives the same replies.
        device: cpu, cuda, cuda:1, ...; default cuda when available.
        tokenizer: a tokenizer.json (or GPT-2 vocab/merges dir) overriding the checkpoint's.
    """
    from gpt.checkpoint import CheckpointError
    from gpt.cli import _model_and_tokenizer, _utf8
    from gpt.generate import check_sampling

    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)  # before a model is loaded
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 for a reply, got {max_new_tokens}")
    if system is not None:
        _utf8("system", system)
        try:
            validate_messages([{"role": "system", "content": system}])
        except ChatFormatError as e:
            raise ValueError(f"--system: {str(e).split(': ', 1)[-1]}") from None
    model, tok = _model_and_tokenizer(checkpoint, tokenizer, device)
    if tok is None:
        raise CheckpointError(f"{checkpoint}: holds no tokenizer; pass --tokenizer PATH")
    session = ChatSession(model, tok, system, max_new_tokens, temperature, top_k, top_p, seed)
    if sys.stdin.isatty():
        run_terminal(session)
        return
    kind, conversation = _stdin_conversation(sys.stdin)
    if kind == "json":
        run_json(session, conversation)  # type: ignore[arg-type]
    else:
        run_lines(session, conversation, echo=True)  # type: ignore[arg-type]
