"""gpt score (gpt/score_cli.py): one pair from the options and JSONL rows in TRL's shapes score exactly what
RewardModel.score_texts gives; bad input is one line with status 2 and writes nothing."""
import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gpt.checkpoint import load_model, save_model
from gpt.cli import main
from gpt.pair_data import PairDataModule
from gpt.reward import RewardModule, load_reward_model
from tests.chat_fixtures import shakespeare_tokenizer
from tests.pref_fixtures import demo_pair_rows, make_trainer, tiny_config, write_pairs_dir

Q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def rm_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    tok = shakespeare_tokenizer()
    tok_path = tok.save(tmp / "tokenizer.json")
    pairs = write_pairs_dir(tmp, tok_path, demo_pair_rows(24, "train"), demo_pair_rows(4, "val", seed=2))
    torch.manual_seed(0)
    module = RewardModule(model_config=tiny_config(tok.vocab_size), tokenizer=str(tok_path), lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=str(tmp / "checkpoints"), save_last=True)
    make_trainer(tmp / "run", max_steps=2, callbacks=[ckpt], limit_val_batches=0).fit(
        module, PairDataModule(str(pairs), str(tok_path), block_size=128, micro_batch_size=4))
    return tmp / "checkpoints" / "last.ckpt"


def _run(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["score", *args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_one_pair(rm_ckpt, capsys):
    rm, tok = load_reward_model(rm_ckpt)
    want = rm.score_texts(tok, [Q], ["5"])[0]
    code, out, _ = _run(capsys, "--checkpoint", str(rm_ckpt), "--system", "Be brief.", "--prompt", "What is 2 + 3?",
                        "--response", "5")
    assert code == 0 and float(out) == pytest.approx(want, rel=1e-5)


def test_jsonl_rows(rm_ckpt, tmp_path, capsys):
    rm, tok = load_reward_model(rm_ckpt)
    rows = [{"prompt": "What is 2 + 3?", "response": "5", "id": 1},
            {"prompt": Q, "completion": "6", "id": 2},
            {"messages": Q + [{"role": "assistant", "content": "I don't know."}], "id": 3}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    code, _, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                        "--batch-size", "2")
    assert code == 0 and "3 rows" in err
    got = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    want = rm.score_texts(tok, [[Q[1]], Q, Q], ["5", "6", "I don't know."])
    assert [{k: v for k, v in g.items() if k != "score"} for g in got] == rows
    assert [g["score"] for g in got] == pytest.approx(want, rel=1e-5)
    code, out, _ = _run(capsys, "--checkpoint", str(rm_ckpt), "--input", str(src))  # stdout
    assert [json.loads(line)["id"] for line in out.splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "q"}', "in.jsonl:2: expected 'prompt' and 'response' (or 'completion'), or 'messages'; got prompt"),
    ('{"prompt": "q", "response": 5}', "in.jsonl:2: field 'response' is int, not a string"),
    ('{"prompt": 5, "response": "a"}', "in.jsonl:2: field 'prompt' is int, not text or a list of messages"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "in.jsonl:2: message 0: the conversation must end with an "
                                                         "assistant turn"),
    ('{"prompt": [{"role": "bot", "content": "q"}], "response": "a"}', "in.jsonl:2: message 0: role 'bot' is not one"),
    ("not json", "in.jsonl:2: not JSON"),
])
def test_bad_rows_are_one_line(rm_ckpt, tmp_path, capsys, row, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "q", "response": "a"}\n' + row + "\n")
    code, out, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--input", str(src), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and err.startswith("gpt: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o.jsonl").exists() and list(tmp_path.iterdir()) == [src]


def test_bad_usage_is_one_line(rm_ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--prompt", "q")
    assert code == 2 and "--response is missing" in err
    code, _, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--prompt", "q", "--response", "a", "--input", "x.jsonl")
    assert code == 2 and "give --prompt and --response, or --input FILE (not both)" in err
    lm = save_model(load_model(rm_ckpt, reward_model_ok=True)[0], tmp_path / "lm", shakespeare_tokenizer())
    code, _, err = _run(capsys, "--checkpoint", str(lm), "--prompt", "q", "--response", "a")
    assert code == 2 and "not a reward model" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["sample", "chat", "export"])
def test_a_reward_model_is_refused_where_a_language_model_is_wanted(rm_ckpt, tmp_path, capsys, command):
    # load_model reads a reward model's GPT too, but its LM head did not follow the backbone: as an LM it is broken.
    extra = {"sample": ["--prompt", "q"], "chat": [], "export": ["--out", str(tmp_path / "out")]}[command]
    with pytest.raises(SystemExit) as e:
        main([command, "--checkpoint", str(rm_ckpt), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"gpt: error: {rm_ckpt}: holds a reward model (recipes/reward.py), not a language model" in err
    assert not (tmp_path / "out").exists()


def test_pair_accuracy_of_a_preference_file(rm_ckpt, tmp_path, capsys):
    """--pairs: the share of rows whose chosen reply scores above the rejected one, and the mean margin,
    exactly as score_texts ranks them; replies as strings or message lists (make_demo_pairs' files)."""
    rm, tok = load_reward_model(rm_ckpt)
    replies = ["5", "6", "4", "five", "I don't know.", "7"]
    rows = [{"prompt": Q, "chosen": [{"role": "assistant", "content": c}], "rejected": [{"role": "assistant", "content": r}]}
            for c, r in zip(replies, replies[1:] + replies[:1])] + [{"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = rm.score_texts(tok, [Q] * 6 + [[{"role": "user", "content": "Say hi."}]], replies + ["hi"])
    rejected = rm.score_texts(tok, [Q] * 6 + [[{"role": "user", "content": "Say hi."}]], replies[1:] + replies[:1] + ["no"])
    margins = [c - r for c, r in zip(chosen, rejected)]
    code, out, _ = _run(capsys, "--checkpoint", str(rm_ckpt), "--pairs", str(src), "--json", str(tmp_path / "a.json"))
    got = json.loads((tmp_path / "a.json").read_text())
    assert code == 0 and got["pairs"] == 7
    assert got["pair_accuracy"] == sum(m > 0 for m in margins) / 7
    assert got["margin_mean"] == pytest.approx(sum(margins) / 7, rel=1e-5)
    assert f"pair accuracy {100 * got['pair_accuracy']:.1f}% of 7 pairs" in out


def test_bad_pair_files_are_one_line(rm_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "q", "chosen": "a", "rejected": 3}) + "\n")
    code, _, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--pairs", str(bad), "--json", str(tmp_path / "a.json"))
    assert code == 2 and err.count("\n") == 1 and f"{bad}:2: field 'rejected' must be a string" in err
    assert not (tmp_path / "a.json").exists()
    code, _, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--pairs", str(bad), "--prompt", "q")
    assert code == 2 and "give --pairs FILE alone" in err
    code, _, err = _run(capsys, "--checkpoint", str(rm_ckpt), "--prompt", "q", "--response", "a", "--json", "x.json")
    assert code == 2 and "--json goes with --pairs" in err
