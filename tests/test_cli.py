"""gpt/cli.py: `gpt sample` streams the same text gpt.generate makes; `gpt export`; one-line errors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.checkpoint import load_model, save_model
from gpt.cli import _underscore_options, main
from gpt.config import GPTConfig
from gpt.generate import generate
from gpt.model import GPT
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "to be or"


def _tokenizer() -> Tokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["to be or not to be, that is the question", "héllo wörld → 世界"] * 20, trainer)
    return Tokenizer(tok)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A Lightning-style .ckpt of a tiny random model, as gpt.lm writes it."""
    torch.manual_seed(0)
    model, tok = GPT(GPTConfig.from_preset("tiny", vocab_size=300, block_size=64)).eval(), _tokenizer()
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "gpt": {"model_config": model.config.to_dict(), "tokenizer": tok.to_str()}}, path)
    return path


def _gpt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gpt", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def _expected(ckpt, **kw) -> str:
    model, tok = load_model(ckpt)
    ids = generate(model, [tok.encode(PROMPT)], stop_ids=[tok.eot_id], **kw)[0]
    return PROMPT + tok.decode(ids) + "\n"


def test_sample_streams_the_generated_text(ckpt):
    r = _gpt("sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "20",
             "--temperature", "0.9", "--top_k", "40", "--top-p", "0.95", "--seed", "7")
    assert r.returncode == 0, r.stderr
    expected = _expected(ckpt, max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    assert r.stdout == expected and len(expected) > len(PROMPT) + 1


def test_sample_greedy_in_process_prints_whole_text(ckpt, capsys):
    main(["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max_new_tokens", "30",
          "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out == _expected(ckpt, max_new_tokens=30, temperature=0)


def test_sample_caps_at_block_size(ckpt, capsys):
    main(["sample", "--checkpoint", str(ckpt), "--prompt", PROMPT, "--max_new_tokens", "500", "--temperature", "0"])
    out = capsys.readouterr()
    assert "capped" in out.err
    room = 64 - len(load_model(ckpt)[1].encode(PROMPT))
    assert out.out == _expected(ckpt, max_new_tokens=room, temperature=0)


def test_export_native_and_hf(ckpt, tmp_path, capsys):
    main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "n"), "--format", "native"])
    main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h")])
    ref, tok = load_model(ckpt)
    idx = torch.tensor([tok.encode(PROMPT)])
    for d in ("n", "h"):
        model, t = load_model(tmp_path / d)
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)
        assert t.encode(PROMPT) == idx[0].tolist()
    # A native export samples like the .ckpt it came from.
    capsys.readouterr()
    main(["sample", "--checkpoint", str(tmp_path / "n"), "--prompt", PROMPT, "--max_new_tokens", "10", "--temperature", "0"])
    assert capsys.readouterr().out == _expected(ckpt, max_new_tokens=10, temperature=0)


def test_tokenizer_override_and_missing_tokenizer(tmp_path, capsys):
    torch.manual_seed(0)
    model, tok = GPT(GPTConfig.from_preset("tiny", vocab_size=300)).eval(), _tokenizer()
    save_model(model, tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(tmp_path / "m"), "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--tokenizer" in err
    tok.save(tmp_path / "tokenizer.json")
    main(["sample", "--checkpoint", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tokenizer.json"),
          "--prompt", PROMPT, "--max_new_tokens", "5", "--temperature", "0"])
    assert capsys.readouterr().out.startswith(PROMPT)


def test_bad_checkpoints_give_one_line_and_exit_2(ckpt, tmp_path, capsys):
    data = ckpt.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) // 3])
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    # One real subprocess: no traceback, one line, status 2.
    r = _gpt("sample", "--checkpoint", str(tmp_path / "trunc.ckpt"), "--prompt", "x")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("gpt: error: ") and "trunc.ckpt" in r.stderr
    for bad in ("missing.ckpt", "trunc.ckpt", "random.bin"):
        with pytest.raises(SystemExit) as e:
            main(["sample", "--checkpoint", str(tmp_path / bad), "--prompt", "x"])
        out = capsys.readouterr()
        assert e.value.code == 2 and out.out == ""
        assert out.err.count("\n") == 1 and out.err.startswith("gpt: error: ") and bad in out.err, out.err


def test_dash_options_are_rewritten_only_for_known_names():
    assert _underscore_options(["sample", "--max-new-tokens", "5", "--top-p=0.9", "--prompt", "--not-an-option"]) == \
        ["sample", "--max_new_tokens", "5", "--top_p=0.9", "--prompt", "--not-an-option"]
