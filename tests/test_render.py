"""data_prep/render.py: template rendering of conversations and pairs, and the truncation policy."""
import pytest

from data_prep.chat_formats import Conversation, Pair
from data_prep.render import Drop, render_conversation, render_pair
from gpt.chat import ChatTemplate
from tests.chat_fixtures import shakespeare_tokenizer


@pytest.fixture(scope="module")
def chat():
    return ChatTemplate(shakespeare_tokenizer())


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


SYS = {"role": "system", "content": "Answer briefly."}
LONG = [SYS, U("First question about the king?"), A("The king is dead."), U("Second question, on the queen?"),
        A("She lives."), U("And the third one: who is the fool?"), A("The fool is Lear's friend, loyal to the end.")]


def test_fitting_conversation_is_the_template(chat):
    r = render_conversation(chat, Conversation(LONG), 10_000)
    assert (r.ids, r.mask, r.truncated) == (*chat.render(LONG), False)


def test_prompt_completion_trains_on_the_completion_only(chat):
    r = render_conversation(chat, Conversation(LONG, first_target=6), 10_000)
    ids, mask = chat.render(LONG)
    n_prompt = len(chat.render_prompt(LONG[:6])) - 1  # up to the final "<|assistant|>" (mask 0 anyway)
    assert r.ids == ids and r.mask == [0] * n_prompt + mask[n_prompt:]
    assert sum(r.mask) == len(chat.render_reply(LONG[6]["content"]))


def test_drops_the_fewest_oldest_exchanges(chat):
    one_dropped = chat.render([SYS] + LONG[3:])
    r = render_conversation(chat, Conversation(LONG), len(one_dropped[0]))
    assert (r.ids, r.mask, r.truncated) == (*one_dropped, True)
    two_dropped = chat.render([SYS] + LONG[5:])
    r = render_conversation(chat, Conversation(LONG), len(one_dropped[0]) - 1)
    assert (r.ids, r.mask) == two_dropped


def test_then_cuts_the_last_reply_without_its_end(chat):
    last = chat.render([SYS] + LONG[5:])
    r = render_conversation(chat, Conversation(LONG), len(last[0]) - 3)
    assert r.ids == last[0][:-3] and r.mask == last[1][:-3] and r.truncated
    assert r.ids[-1] != chat.end_id and sum(r.mask) == len(chat.render_reply(LONG[6]["content"])) - 3


def test_never_zero_supervised_tokens(chat):
    conv = Conversation(LONG)
    prompt = len(chat.render_prompt([SYS, LONG[5]]))
    full = len(chat.render(LONG)[0])
    for budget in range(1, full + 2):
        try:
            r = render_conversation(chat, conv, budget)
        except Drop as e:
            assert e.reason == "prompt_too_long" and budget <= prompt
            continue
        assert len(r.ids) <= budget and sum(r.mask) >= 1 and budget > prompt
        assert r.ids[0] == chat.bos_id and r.mask[-1] == 1
        assert r.truncated == (budget < full)


def test_drop_policy(chat):
    with pytest.raises(Drop) as e:
        render_conversation(chat, Conversation(LONG), 20, truncation="drop")
    assert e.value.reason == "too_long"


PAIR = Pair([SYS, U("Tell me of the king."), A("Which one?"), U("The old one, Lear.")],
            "Lear divided his kingdom among his daughters.", "No idea.")


def test_pair_layout(chat):
    r = render_pair(chat, PAIR, 10_000)
    prompt = chat.render_prompt(PAIR.prompt)
    c, j = chat.render_reply(PAIR.chosen), chat.render_reply(PAIR.rejected)
    assert r.ids == prompt + c + j and r.bounds == (len(prompt), len(prompt) + len(c)) and not r.truncated
    assert r.mask == [0] * len(prompt) + [1] * (len(c) + len(j))
    # each of prompt + reply is exactly the template's rendering of the whole conversation
    assert prompt + c == chat.render(PAIR.prompt + [A(PAIR.chosen)])[0]


def test_pair_truncation(chat):
    c, j = chat.render_reply(PAIR.chosen), chat.render_reply(PAIR.rejected)
    short_prompt = chat.render_prompt([SYS, PAIR.prompt[3]])
    r = render_pair(chat, PAIR, len(short_prompt) + len(c))  # one exchange dropped, replies whole
    assert r.ids == short_prompt + c + j and r.truncated
    r = render_pair(chat, PAIR, len(short_prompt) + 2)  # then both replies cut to 2 tokens, no <|end|>
    assert r.ids == short_prompt + c[:2] + j[:2] and r.bounds == (len(short_prompt), len(short_prompt) + 2)
    with pytest.raises(Drop, match="prompt_too_long"):
        render_pair(chat, PAIR, len(short_prompt))
    same_start = Pair([U("q")], "The answer is five.", "The answer is six.")
    p = chat.render_prompt(same_start.prompt)
    with pytest.raises(Drop, match="identical_after_truncation"):
        render_pair(chat, same_start, len(p) + 2)
    with pytest.raises(Drop, match="too_long"):
        render_pair(chat, PAIR, 30, truncation="drop")
