"""`gpt chat`: the real command on models whose greedy replies are known (tests.test_evaluate.chain_model).

A chain model's next token depends only on the current one, so after the prompt's final
<|assistant|> it says a fixed reply and then <|end|>, whatever came before: the replies are
known exactly, and the prompts the command renders are recorded and compared with the template.
"""
import io
import json
import subprocess
import sys

import pytest

import gpt.chat_cli as chat_cli
from gpt.chat import ChatTemplate
from gpt.checkpoint import save_model
from gpt.cli import main
from tests.chat_fixtures import ROOT, shakespeare_tokenizer
from tests.test_evaluate import chain_model

REPLY = "Hello there"


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


def chain(tok, reply: str = REPLY, end: bool = True) -> list[int]:
    t = ChatTemplate(tok)
    return [t.role_ids["assistant"], *tok.encode(reply)] + ([t.end_id] if end else [])


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A native export that replies "Hello there" and ends its turn."""
    return save_model(chain_model(tok, chain(tok)), tmp_path_factory.mktemp("chat") / "model", tokenizer=tok)


class Recorder:
    """Wraps gpt.generate.generate: records each prompt, then generates for real."""

    def __init__(self, monkeypatch):
        self.prompts = []
        real = chat_cli.generate

        def spy(model, prompts, *args, **kwargs):
            self.prompts.append(list(prompts[0]))
            return real(model, prompts, *args, **kwargs)
        monkeypatch.setattr(chat_cli, "generate", spy)


def run_chat(monkeypatch, capsys, stdin: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))  # StringIO.isatty() is False: the stdin modes
    code = 0
    try:
        main(["chat", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def test_lines_render_every_turn_with_the_template_and_stop_at_end(tok, ckpt, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    code, out, err = run_chat(monkeypatch, capsys, "hi\n\nhow are you?\n", "--checkpoint", str(ckpt),
                              "--system", "Be brief.", "--temperature", "0")
    assert code == 0, err
    assert out == f"> hi\n{REPLY}\n> how are you?\n{REPLY}\n"
    assert err == ""  # no "ran to the limit" note: both replies ended at <|end|>
    t = ChatTemplate(tok)
    sys_turn = {"role": "system", "content": "Be brief."}
    assert rec.prompts == [t.render_prompt([sys_turn, u("hi")]),
                           t.render_prompt([sys_turn, u("hi"), a(REPLY), u("how are you?")])]


def test_reset_forgets_the_conversation_but_keeps_the_system_turn(tok, ckpt, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    code, out, err = run_chat(monkeypatch, capsys, "one\n/reset\ntwo\n/exit\nthree\n", "--checkpoint", str(ckpt),
                              "--system", "S", "--temperature", "0")
    assert code == 0, err
    assert out == f"> one\n{REPLY}\n> two\n{REPLY}\n"  # nothing after /exit
    assert "conversation reset" in err
    t = ChatTemplate(tok)
    assert rec.prompts[1] == t.render_prompt([{"role": "system", "content": "S"}, u("two")])


def test_history_longer_than_the_context_drops_the_oldest_exchanges(tok, tmp_path, monkeypatch, capsys):
    model = chain_model(tok, chain(tok))
    model.config.block_size = 48  # the chain model's rope tables are longer: only the budget shrinks
    path = save_model(model, tmp_path / "short", tokenizer=tok)
    rec = Recorder(monkeypatch)
    lines = [f"message number {i} says rain" for i in range(5)]
    code, out, err = run_chat(monkeypatch, capsys, "\n".join(lines) + "\n", "--checkpoint", str(path),
                              "--system", "Sys.", "--temperature", "0", "--max_new_tokens", "8")
    assert code == 0, err
    assert out.count(REPLY) == 5
    notes = [line for line in err.splitlines() if "longer than the context" in line]
    assert notes and all(line.startswith("gpt: note: the conversation is longer than the context (48 tokens): "
                                         "dropped the oldest") for line in notes)
    t = ChatTemplate(tok)
    last = rec.prompts[-1]
    assert len(last) + 8 <= 48
    # The last prompt is the system turn + the most recent exchanges that fit, oldest dropped.
    kept = None
    for k in range(5):
        msgs = [{"role": "system", "content": "Sys."}]
        for line in lines[k:-1]:
            msgs += [u(line), a(REPLY)]
        if t.render_prompt(msgs + [u(lines[-1])]) == last:
            kept = k
    assert kept is not None and kept > 0


def test_json_messages_get_one_reply(tok, ckpt, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    msgs = [{"role": "system", "content": "Be brief."}, u("Remember king."), a("OK."), u("Which word?")]
    code, out, err = run_chat(monkeypatch, capsys, json.dumps(msgs, indent=1), "--checkpoint", str(ckpt),
                              "--temperature", "0")
    assert (code, out, err) == (0, REPLY + "\n", "")
    assert rec.prompts == [ChatTemplate(tok).render_prompt(msgs)]


def test_a_reply_that_never_ends_gets_a_note(tok, tmp_path, monkeypatch, capsys):
    one, nine = tok.encode("1"), tok.encode("9")
    t = ChatTemplate(tok)
    path = save_model(chain_model(tok, [t.role_ids["assistant"], *one, *nine, *one]), tmp_path / "loop", tokenizer=tok)
    code, out, err = run_chat(monkeypatch, capsys, "count\n", "--checkpoint", str(path), "--temperature", "0",
                              "--max_new_tokens", "5")
    assert code == 0 and out == "> count\n19191\n"
    assert err.strip() == "gpt: note: the reply reached 5 tokens without ending its turn (raise --max_new_tokens)"


@pytest.mark.parametrize("stdin, args, message", [
    ("[{\"role\": \"user\"", (), "gpt: error: stdin: not a JSON messages list (line 1, column 17: Expecting ',' delimiter)"),
    (json.dumps([u("x"), a("y")]), (), "gpt: error: stdin: message 1: the conversation must end with a user turn "
                                       "for the model to answer"),
    (json.dumps([{"role": "bot", "content": "x"}]), (), "gpt: error: stdin: message 0: role 'bot' is not one of "
                                                         "system, user, assistant"),
    (json.dumps([{"role": "system", "content": "x"}, u("y")]), ("--system", "z"),
     "gpt: error: stdin: both --system and a system message: give one"),
    ("say <|end|> now\n", (), "gpt: error: message 0: content contains the reserved token <|end|>"),
    ("hi\n", ("--system", "a <|user|> b"), "gpt: error: --system: content contains the reserved token <|user|>"),
])
def test_bad_input_is_one_line(ckpt, monkeypatch, capsys, stdin, args, message):
    code, out, err = run_chat(monkeypatch, capsys, stdin, "--checkpoint", str(ckpt), "--temperature", "0", *args)
    assert code == 2 and err.strip() == message


def test_the_real_command_with_piped_stdin(ckpt):
    p = subprocess.run([sys.executable, "-m", "gpt", "chat", "--checkpoint", str(ckpt), "--temperature", "0"],
                       input="What is 2 + 3?\nAnd 4 + 4?\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"> What is 2 + 3?\n{REPLY}\n> And 4 + 4?\n{REPLY}\n"
    missing = subprocess.run([sys.executable, "-m", "gpt", "chat", "--checkpoint", str(ckpt) + "-nope"],
                             input="hi\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == f"gpt: error: {ckpt}-nope: no such file or directory"
