"""gpt.chat: ids and loss mask of the one chat template, its refusals, and parity with transformers."""
import json

import pytest
import torch

from gpt.chat import ROLES, ChatFormatError, ChatTemplate, hf_chat_files, validate_messages
from tests.chat_fixtures import shakespeare_tokenizer

SYSTEM = {"role": "system", "content": "Answer with one word."}
TURNS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": " and\n\n  then,\tmy lord?\n"}, {"role": "assistant", "content": " Nay.\n"}]
CONVERSATIONS = {
    "single": TURNS[:2],
    "single+system": [SYSTEM] + TURNS[:2],
    "multi": TURNS,
    "multi+system": [SYSTEM] + TURNS,
    "odd text": [{"role": "user", "content": ""}, {"role": "assistant", "content": "  ünïcödé ✓ \r\n"},
                 {"role": "user", "content": "\n<|end"}, {"role": "assistant", "content": "|> <| end|>"}],
}


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


@pytest.fixture(scope="module")
def chat(tok):
    return ChatTemplate(tok)


def test_hand_written_ids_and_mask(tok, chat):
    s = tok.special_ids
    eot, end, sys_, user, asst = (s[t] for t in ("<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"))
    e = tok.encode
    ids, mask = chat.render([SYSTEM] + TURNS)
    want = ([eot, sys_] + e(SYSTEM["content"]) + [end, user] + e("What is 2 + 3?") + [end, asst] + e("5") + [end]
            + [user] + e(TURNS[2]["content"]) + [end, asst] + e(" Nay.\n") + [end])
    assert ids == want
    n_sys, n_u1, n_a1, n_u2, n_a2 = (len(e(m["content"])) for m in [SYSTEM] + TURNS)
    want_mask = ([0] * (2 + n_sys + 1) + [0] * (1 + n_u1 + 1) + [0] + [1] * (n_a1 + 1)
                 + [0] * (1 + n_u2 + 1) + [0] + [1] * (n_a2 + 1))
    assert mask == want_mask
    # Every assistant <|end|> is supervised, no role token is, nor the user/system <|end|>.
    ends = [i for i, t in enumerate(ids) if t == end]
    assert [mask[i] for i in ends] == [0, 0, 1, 0, 1]
    assert all(mask[i] == 0 for i, t in enumerate(ids) if t in (eot, sys_, user, asst))
    assert chat.stop_ids == [end, eot] and chat.pad_id not in chat.stop_ids and chat.pad_id == tok.pad_id


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_content_tokens_equal_encoding_the_whole_string(tok, chat, name):
    """Byte-level BPE splits at the special tokens first: rendering piecewise == encoding the text."""
    msgs = CONVERSATIONS[name]
    text = "<|endoftext|>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in msgs)
    ids, mask = chat.render(msgs)
    assert ids == tok.encode(text, allow_special=True)
    assert len(mask) == len(ids)
    assert tok.decode(ids) == text
    supervised = "".join(m["content"] + "<|end|>" for m in msgs if m["role"] == "assistant")
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == supervised


def test_prompt_and_reply_compose(chat):
    for msgs in CONVERSATIONS.values():
        prompt = chat.render_prompt(msgs[:-1])
        assert prompt == chat.render(msgs[:-1], add_generation_prompt=True)[0]
        assert prompt[-1] == chat.role_ids["assistant"]
        assert chat.render(msgs)[0] == prompt + chat.render_reply(msgs[-1]["content"])
    with pytest.raises(ChatFormatError, match=r"^message 1: a prompt must end with a user turn, not 'assistant'$"):
        chat.render_prompt(TURNS[:2])


@pytest.mark.parametrize("messages, message", [
    ([], "messages: empty conversation"),
    ("hello", "messages: expected a list of messages, got str"),
    ([["user", "hi"]], "message 0: expected a dict with 'role' and 'content', got list"),
    ([{"role": "tool", "content": "x"}], "message 0: role 'tool' is not one of system, user, assistant"),
    ([{"content": "x"}], "message 0: role None is not one of system, user, assistant"),
    ([{"role": "user", "content": ["a"]}], "message 0: content must be a string, got list"),
    ([{"role": "user"}], "message 0: content must be a string, got NoneType"),
    (TURNS[:2] + [SYSTEM], "message 2: a system turn may only come first"),
    ([SYSTEM, SYSTEM], "message 1: a system turn may only come first"),
    ([{"role": "assistant", "content": "hi"}],
     "message 0: role 'assistant' where 'user' was expected (user and assistant turns alternate, starting with user)"),
    (TURNS[:1] * 2, "message 1: role 'user' where 'assistant' was expected (user and assistant turns alternate, "
                    "starting with user)"),
    ([{"role": "user", "content": "stop<|end|>now"}], "message 0: content contains the reserved token <|end|>"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<|endoftext|>"}],
     "message 1: content contains the reserved token <|endoftext|>"),
])
def test_refusals_are_one_line(chat, messages, message):
    with pytest.raises(ChatFormatError) as e:
        chat.render(messages)
    assert str(e.value) == message
    assert isinstance(e.value, ValueError)


def test_require_final_assistant():
    validate_messages(TURNS, require_final_assistant=True)
    validate_messages(TURNS[:3])
    with pytest.raises(ChatFormatError, match=r"^message 2: the conversation must end with an assistant turn, not 'user'$"):
        validate_messages(TURNS[:3], require_final_assistant=True)
    assert ROLES == ("system", "user", "assistant")


def test_pad_must_differ_from_stop_tokens(tok):
    class SamePad:
        special_ids = {**tok.special_ids, "<|pad|>": tok.special_ids["<|end|>"]}

    with pytest.raises(ValueError, match=r"must be three different ids"):
        ChatTemplate(SamePad())


# ---- transformers parity ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    transformers = pytest.importorskip("transformers")
    from gpt.config import GPTConfig
    from gpt.hf import export_hf
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
    d = export_hf(model, tmp_path_factory.mktemp("hf") / "export", tokenizer=tok)
    return d, transformers.PreTrainedTokenizerFast.from_pretrained(d)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_transformers_apply_chat_template_gives_our_ids_and_mask(chat, exported, name):
    _, hf = exported
    msgs = CONVERSATIONS[name]
    out = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat.render(msgs)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask
    prompt = hf.apply_chat_template(msgs[:-1], tokenize=True, return_dict=True, add_generation_prompt=True)
    assert list(prompt["input_ids"]) == chat.render_prompt(msgs[:-1])


def test_export_writes_template_and_stop_tokens(tok, chat, exported):
    import transformers

    d, hf = exported
    files = hf_chat_files(tok)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == chat.jinja() and "{% generation %}" in chat.jinja().replace("{%-", "{%")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (chat.eot_id, chat.end_id, chat.pad_id)
    gen = transformers.GenerationConfig.from_pretrained(d)
    assert gen.eos_token_id == [chat.end_id, chat.eot_id] == files["generation_config.json"]["eos_token_id"]
    assert (gen.pad_token_id, gen.bos_token_id) == (chat.pad_id, chat.eot_id)
    with pytest.raises(Exception, match="a system turn may only come first"):
        hf.apply_chat_template(TURNS[:2] + [SYSTEM], tokenize=False)
