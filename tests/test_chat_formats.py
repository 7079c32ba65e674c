"""data_prep/chat_formats.py: every format -> exact messages/pairs, detection, every bad-row text."""
import pytest

from data_prep.chat_formats import (Conversation, Pair, RowError, SkipRow, convert, detect_format, to_conversation,
                                    to_pair)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


# ---- SFT formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("row, fmt, want", [
    ({"messages": [U("Hi"), A("Hello")]}, "messages", Conversation([U("Hi"), A("Hello")])),
    ({"messages": [S("Be brief."), U("2+3?"), A("5"), U("and 4+4?"), A("8")], "id": 7}, "messages",
     Conversation([S("Be brief."), U("2+3?"), A("5"), U("and 4+4?"), A("8")])),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y"}]}, "messages",
     Conversation([U("x"), A("y")])),  # extra keys dropped
    ({"prompt": "What is 2+3?", "completion": "5"}, "prompt_completion", Conversation([U("What is 2+3?"), A("5")], 1)),
    ({"prompt": [S("sys"), U("a"), A("b"), U("c")], "completion": [A("d")]}, "prompt_completion",
     Conversation([S("sys"), U("a"), A("b"), U("c"), A("d")], 4)),
    ({"instruction": "Sort the words.", "input": "b a", "output": "a b"}, "alpaca",
     Conversation([U("Sort the words.\n\nb a"), A("a b")])),
    ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", Conversation([U("Say hi."), A("hi")])),
    ({"instruction": "Say hi.", "output": "hi"}, "alpaca", Conversation([U("Say hi."), A("hi")])),
    ({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "r"}]}, "sharegpt", Conversation([S("sys"), U("q"), A("r")])),
])
def test_sft_rows(row, fmt, want):
    assert detect_format(row, "sft") == fmt
    assert to_conversation(row, fmt) == want
    assert convert(row, "sft", None) == want


# ---- preference formats -------------------------------------------------------------------------
HH_CHOSEN = "\n\nHuman: What is 2+3?\n\nAssistant: 5\n\nHuman: And 4+4?\n\nAssistant: 8"
HH_REJECTED = "\n\nHuman: What is 2+3?\n\nAssistant: 5\n\nHuman: And 4+4?\n\nAssistant: I think it is 9."


@pytest.mark.parametrize("row, fmt, want", [
    ({"prompt": "2+3?", "chosen": "5", "rejected": "6"}, "explicit", Pair([U("2+3?")], "5", "6")),
    ({"prompt": [S("s"), U("2+3?")], "chosen": [A("5")], "rejected": [A("6")]}, "explicit",
     Pair([S("s"), U("2+3?")], "5", "6")),
    ({"prompt": [U("2+3?")], "chosen": [U("2+3?"), A("5")], "rejected": [U("2+3?"), A("6")]}, "explicit",
     Pair([U("2+3?")], "5", "6")),  # full conversations after an explicit prompt
    ({"chosen": [U("q"), A("a"), U("q2"), A("good")], "rejected": [U("q"), A("a"), U("q2"), A("bad")]}, "implicit",
     Pair([U("q"), A("a"), U("q2")], "good", "bad")),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "hh",
     Pair([U("What is 2+3?"), A("5"), U("And 4+4?")], "8", "I think it is 9.")),
    ({"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: go away"}, "hh",
     Pair([U("hi")], "hello", "go away")),  # a transcript without the leading blank line
    ({"prompt": "2+3?", "prompt_id": "x", "chosen": [U("2+3?"), A("5")], "rejected": [U("2+3?"), A("7")],
      "messages": [U("2+3?"), A("5")], "score_chosen": 9.0, "score_rejected": 2}, "ultrafeedback",
     Pair([U("2+3?")], "5", "7")),
])
def test_pair_rows(row, fmt, want):
    assert detect_format(row, "pairs") == fmt
    assert to_pair(row, fmt) == want


# ---- bad rows: exact one-line text and the reason counted when skipped ---------------------------
@pytest.mark.parametrize("row, fmt, reason, text", [
    ({"messages": [U("a"), {"role": "bot", "content": "b"}]}, "messages", "unknown_role",
     "field 'messages': message 1: role 'bot' is not one of system, user, assistant"),
    ({"messages": [U("a"), A("")]}, "messages", "empty_assistant", "field 'messages': message 1: empty assistant turn"),
    ({"messages": [U("a"), A("  \n")]}, "messages", "empty_assistant",
     "field 'messages': message 1: empty assistant turn"),
    ({"messages": [U("a")]}, "messages", "no_final_assistant",
     "field 'messages': message 0: the conversation must end with an assistant turn, not 'user'"),
    ({"messages": [U("a"), A("b"), U("c")]}, "messages", "no_final_assistant",
     "field 'messages': message 2: the conversation must end with an assistant turn, not 'user'"),
    ({"messages": "hello"}, "messages", "wrong_type", "field 'messages' is str, not a list of messages"),
    ({"messages": [U("a"), {"role": "assistant", "content": 5}]}, "messages", "wrong_type",
     "field 'messages': message 1: content must be a string, got int"),
    ({"messages": [U("a"), {"role": "assistant"}]}, "messages", "wrong_type",
     "field 'messages': message 1: expected 'role' and 'content', got role"),
    ({"messages": [A("a"), U("b")]}, "messages", "bad_turn_order",
     "field 'messages': message 0: role 'assistant' where 'user' was expected (user and assistant turns "
     "alternate, starting with user)"),
    ({"messages": []}, "messages", "empty_conversation", "field 'messages': messages: empty conversation"),
    ({"messages": None}, "messages", "missing_field", "missing field 'messages' (fields: messages)"),
    ({"instruction": "x"}, "alpaca", "missing_field", "missing field 'output' (fields: instruction)"),
    ({"instruction": "x", "input": 3, "output": "y"}, "alpaca", "wrong_type", "field 'input' is int, not a string"),
    ({"instruction": " ", "output": "y"}, "alpaca", "empty_prompt", "field 'instruction': empty instruction"),
    ({"prompt": 1, "completion": "y"}, "prompt_completion", "wrong_type",
     "field 'prompt' is int, not a string or a list of messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "r"}]}, "sharegpt", "unknown_role",
     "field 'conversations': message 1: 'from' 'bot' is not one of system, human, gpt"),
    ({"conversations": [{"role": "user", "content": "q"}]}, "sharegpt", "wrong_type",
     "field 'conversations': message 0: expected 'from' and 'value' (ShareGPT), got role, content"),
])
def test_bad_sft_rows(row, fmt, reason, text):
    with pytest.raises(RowError) as e:
        to_conversation(row, fmt)
    assert (e.value.reason, str(e.value)) == (reason, text)
    assert not isinstance(e.value, SkipRow)


@pytest.mark.parametrize("row, fmt, reason, text", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "explicit", "identical_responses",
     "fields 'chosen' and 'rejected': identical replies"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "explicit", "empty_assistant",
     "field 'chosen': message 1: empty assistant turn"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "explicit", "empty_assistant",
     "field 'rejected': message 1: empty assistant turn"),
    ({"prompt": [U("q")], "chosen": [U("other"), A("a")], "rejected": [A("b")]}, "explicit", "prompt_mismatch",
     "field 'chosen': does not start with the prompt"),
    ({"prompt": [U("q")], "chosen": [A("a"), U("x"), A("b")], "rejected": [A("b")]}, "explicit", "not_one_reply",
     "field 'chosen': expected one assistant turn after the prompt, got 3 message(s)"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "explicit", "wrong_type",
     "field 'chosen' is int, not a string or a list of messages"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("other q"), A("b")]}, "implicit", "prompt_mismatch",
     "fields 'chosen' and 'rejected' differ before their final assistant turn (at message 0 of 'chosen'): "
     "no shared prompt"),
    ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]}, "implicit", "identical_responses",
     "fields 'chosen' and 'rejected': identical conversations"),
    ({"chosen": [A("a")], "rejected": [A("b")]}, "implicit", "empty_prompt",
     "fields 'chosen' and 'rejected': no prompt before the replies"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"}, "hh", "empty_assistant",
     "field 'rejected': message 1: empty assistant turn"),
    ({"chosen": "just text", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh", "wrong_type",
     "field 'chosen': not an Anthropic HH transcript (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"}, "hh", "prompt_mismatch",
     "fields 'chosen' and 'rejected' differ before their final assistant turn (at message 0 of 'chosen'): "
     "no shared prompt"),
    ({"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": 2, "score_rejected": 5},
     "ultrafeedback", "inverted_scores", "fields 'score_chosen' 2 < 'score_rejected' 5: chosen must be preferred"),
    ({"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": "9",
      "score_rejected": 5}, "ultrafeedback", "wrong_type", "field 'score_chosen' is str, not a number"),
    ({"prompt": "other", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": 9,
      "score_rejected": 5}, "ultrafeedback", "prompt_mismatch",
     "field 'prompt' is not the last user turn of chosen and rejected"),
])
def test_bad_pair_rows(row, fmt, reason, text):
    with pytest.raises(RowError) as e:
        to_pair(row, fmt)
    assert (e.value.reason, str(e.value)) == (reason, text)
    assert not isinstance(e.value, SkipRow)


@pytest.mark.parametrize("row, kind, reason", [
    ({"messages": [U("say <|end|>"), A("no")]}, "sft", "reserved_token"),
    ({"prompt": "q", "chosen": "a<|endoftext|>", "rejected": "b"}, "pairs", "reserved_token"),
    ({"messages": [U("a"), A("\udc80")]}, "sft", "invalid_utf8"),
    ({"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "score_chosen": 5,
      "score_rejected": 5.0}, "pairs", "tied_scores"),
])
def test_skipped_rows(row, kind, reason):
    with pytest.raises(SkipRow) as e:
        convert(row, kind, None)
    assert e.value.reason == reason


def test_detection_failure_names_the_columns():
    with pytest.raises(RowError, match=r"^cannot tell the sft format from the columns \(a, text\): expected messages, "
                                       r"conversations, prompt \+ completion, or instruction \(\+ input\) \+ output; "
                                       r"or pass --format$"):
        detect_format({"text": "x", "a": 1}, "sft")
    with pytest.raises(RowError, match="cannot tell the pairs format"):
        detect_format({"prompt": "x", "chosen": "y"}, "pairs")
    with pytest.raises(RowError, match="expected a JSON object, got list"):
        convert([1], "sft", None)
