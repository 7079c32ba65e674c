"""The chat template: conversations as token ids and a loss mask, defined once for every stage.

    from gpt.chat import ChatTemplate
    chat = ChatTemplate(tokenizer)                                   # a gpt.tokenizer.Tokenizer
    msgs = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}]
    ids, mask = chat.render(msgs)           # mask[i] = 1 where token i is a training target
    prompt = chat.render_prompt(msgs[:-1])  # ... + "<|assistant|>": what generation continues
    out = generate(model, [prompt], 32, stop_ids=chat.stop_ids)

A conversation renders as end-of-text (the document boundary the model saw between every
pretraining document) followed by one block per message, role token + content + end-of-turn:

    <|endoftext|><|system|>Answer briefly.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>5<|end|>

with no whitespace added, so a content's ids are exactly `tokenizer.encode(content)`: byte-level
BPE splits the text at the special tokens before anything else (tests check this for content
with leading spaces and newlines). The loss mask is 1 on each assistant turn's content AND its
`<|end|>` (a model that is never trained on end-of-turn never stops), 0 on everything else,
the `<|assistant|>` role token included (generation is given it). Generation stops at
`stop_ids` = [<|end|>, <|endoftext|>]; the pad token is a third, distinct token.

Rules (`validate_messages`, a one-line ChatFormatError naming the message index and field):
a non-empty list of {"role", "content"} dicts (other keys are ignored); roles from ROLES; string
content; an optional system turn, first only; then user and assistant turns alternating,
starting with user. Content that contains a reserved token string such as "<|end|>" is refused
rather than encoded as plain text: transformers' `apply_chat_template` tokenizes the rendered
string as a whole and would turn it into a control token, so the exported template and ours
would disagree (and a user could forge a turn). Data prep counts such rows as skipped.

`jinja()` is the same template for transformers (with `{% generation %}` markers so
`return_assistant_tokens_mask=True` gives our mask) and `hf_chat_files` the entries the HF
export writes into tokenizer_config.json and generation_config.json.
"""
from __future__ import annotations

from typing import Any, Sequence

from gpt.tokenizer import EOT, PAD, SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}


class ChatFormatError(ValueError):
    """A conversation the template cannot render; the message names the index and field."""


def validate_messages(messages: Any, *, require_final_assistant: bool = False) -> None:
    """Raise ChatFormatError (one line) unless `messages` is a conversation the template renders.

    require_final_assistant: training data must end with the assistant turn it teaches.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages: expected a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages: empty conversation")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i}: content must be a string, got {type(content).__name__}")
        for token in SPECIAL_TOKENS:
            if token in content:
                raise ChatFormatError(f"message {i}: content contains the reserved token {token}")
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"message {i}: a system turn may only come first")
            continue
        if role != expected:
            raise ChatFormatError(f"message {i}: role {role!r} where {expected!r} was expected "
                                  "(user and assistant turns alternate, starting with user)")
        expected = "assistant" if role == "user" else "user"
    if require_final_assistant and messages[-1]["role"] != "assistant":
        raise ChatFormatError(f"message {len(messages) - 1}: the conversation must end with an assistant turn, "
                              f"not {messages[-1]['role']!r}")


class ChatTemplate:
    """Renders conversations with a gpt.tokenizer.Tokenizer's reserved chat tokens."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        special = tokenizer.special_ids
        self.role_ids = {role: special[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id, self.eot_id, self.pad_id = special[END], special[EOT], special[PAD]
        if len({self.end_id, self.eot_id, self.pad_id}) != 3:
            raise ValueError(f"tokenizer: pad ({self.pad_id}), end-of-turn ({self.end_id}) and "
                             f"end-of-text ({self.eot_id}) must be three different ids")
        self.bos_id = self.eot_id  # a conversation starts at a document boundary
        self.stop_ids = [self.end_id, self.eot_id]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a conversation; mask 1 = assistant content and its <|end|>.

        add_generation_prompt: append "<|assistant|>" (mask 0) for the model to continue.
        """
        validate_messages(messages)
        ids, mask = [self.bos_id], [0]
        for m in messages:
            content = self.tokenizer.encode(m["content"])
            ids.append(self.role_ids[m["role"]])
            mask.append(0)
            ids += content + [self.end_id]
            mask += [int(m["role"] == "assistant")] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """The conversation so far (ending with a user turn) + "<|assistant|>"."""
        validate_messages(messages)
        if messages[-1]["role"] != "user":
            raise ChatFormatError(f"message {len(messages) - 1}: a prompt must end with a user turn, "
                                  f"not {messages[-1]['role']!r}")
        return self.render(messages, add_generation_prompt=True)[0]

    def render_reply(self, content: str) -> list[int]:
        """An assistant reply's ids as the template trains them: content + <|end|>.

        render(msgs + [reply])[0] == render_prompt(msgs) + render_reply(reply["content"]).
        """
        validate_messages([{"role": "user", "content": ""}, {"role": "assistant", "content": content}])
        return self.tokenizer.encode(content) + [self.end_id]

    def jinja(self) -> str:
        """This template as Jinja for transformers' apply_chat_template (same text, same mask)."""
        return jinja_template()


def jinja_template() -> str:
    """The Jinja source; `{% generation %}` wraps what our loss mask covers."""
    role_check = ("{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
                  "{{ raise_exception('message ' ~ loop.index0 ~ ': unknown role ' ~ message['role']) }}{%- endif %}"
                  "{%- if message['role'] == 'system' and not loop.first %}"
                  "{{ raise_exception('message ' ~ loop.index0 ~ ': a system turn may only come first') }}"
                  "{%- endif %}")
    return (f"{{{{- '{EOT}' }}}}"
            "{%- for message in messages %}" + role_check +
            "{%- if message['role'] == 'assistant' %}"
            "{{- '<|assistant|>' }}{%- generation %}{{- message['content'] + '" + END + "' }}{%- endgeneration %}"
            "{%- else %}"
            "{{- '<|' + message['role'] + '|>' + message['content'] + '" + END + "' }}"
            "{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}")


def hf_chat_files(tokenizer: Any) -> dict[str, dict]:
    """{file name: entries} for a Hugging Face export: the chat template and the stop tokens.

    tokenizer_config.json: the Jinja template, bos = end-of-text, eos = end-of-turn (what TRL
    appends to and cuts completions at), pad. generation_config.json: generation stops at
    end-of-turn or end-of-text, pads with pad.
    """
    t = ChatTemplate(tokenizer)
    return {
        "tokenizer_config.json": dict(chat_template=t.jinja(), bos_token=EOT, eos_token=END, pad_token=PAD),
        "generation_config.json": dict(bos_token_id=t.bos_id, eos_token_id=list(t.stop_ids),
                                       pad_token_id=t.pad_id),
    }
