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


# ---- bad input: one line `gpt: error: ...`, exit status 2 -------------------------------------
def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("gpt: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err, err
    return err


@pytest.fixture(scope="module")
def bad_files(ckpt, tmp_path_factory):
    """Checkpoints and a tokenizer a user might point `gpt` at by mistake."""
    import argparse

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.ckpt").write_bytes(b"")
    (d / "random.ckpt").write_bytes(bytes(range(256)) * 40)
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "hparams": argparse.Namespace(lr=1.0)}, d / "pickled.ckpt")  # old Lightning did this
    small = GPT(GPTConfig.from_preset("tiny", vocab_size=100, block_size=64)).eval()
    save_model(small, d / "vocab100")
    _tokenizer().save(d / "tokenizer300.json")
    zero = d / "zero.ckpt"  # a DeepSpeed directory whose shard files came out empty
    (zero / "checkpoint").mkdir(parents=True)
    (zero / "latest").write_text("checkpoint")
    (zero / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    return d


BAD_SAMPLE = {
    # name: (extra argv, a fragment of the one error line)
    "negative max_new_tokens": (["--max-new-tokens", "-5"], "max_new_tokens must be an integer >= 0, got -5"),
    "negative temperature": (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
    "top_p 0": (["--top-p", "0"], "top_p must be in (0, 1]"),
    "top_p 1.5": (["--top_p", "1.5"], "top_p must be in (0, 1]"),
    "negative top_k": (["--top-k", "-1"], "top_k must be an integer >= 0"),
    "seed overflow": (["--seed", str(2**64)], "seed must be an integer in [0, 2**64)"),
    "negative seed": (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
    "prompt not UTF-8": (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8: byte 0xe9 at character 3"),
    "not an int": (["--max_new_tokens", "abc"], "--max_new_tokens: expected int, got 'abc' (see gpt sample --help)"),
    "not int or None": (["--top_k", "1.5"], "--top_k: expected int or None, got '1.5'"),
    "unknown option": (["--bogus", "3"], "unrecognized arguments: --bogus 3"),
    "bad device": (["--device", "gpu0"], "--device 'gpu0': not a device"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLE))
def test_bad_sampling_options_are_one_line(ckpt, capsys, case):
    extra, fragment = BAD_SAMPLE[case]
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(ckpt), "--max-new-tokens", "3", *extra])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == "", out  # refused before anything was printed
    assert fragment in _one_error_line(out.err), out.err


BAD_FILES = {
    "empty checkpoint": (["sample", "--checkpoint", "{d}/empty.ckpt"], "{d}/empty.ckpt: empty file (0 bytes)"),
    "random bytes": (["sample", "--checkpoint", "{d}/random.ckpt"],
                     "{d}/random.ckpt: not a readable PyTorch checkpoint, truncated or another format (10,240 bytes"),
    "pickled object": (["export", "--checkpoint", "{d}/pickled.ckpt", "--out", "{d}/x"],
                       "{d}/pickled.ckpt: holds a pickled argparse.Namespace, which the weights-only loader refuses"),
    "empty DeepSpeed shard": (["sample", "--checkpoint", "{d}/zero.ckpt"], "{d}/zero.ckpt: "),
    "tokenizer bigger than the model": (
        ["sample", "--checkpoint", "{d}/vocab100", "--tokenizer", "{d}/tokenizer300.json"],
        "--tokenizer {d}/tokenizer300.json has 300 token ids but the model's vocabulary has 100"),
    "missing checkpoint option": (["sample", "--prompt", "x"], "missing --checkpoint (see gpt sample --help)"),
    "export onto a file": (["export", "--checkpoint", "{d}/vocab100", "--out", "{d}/empty.ckpt"],
                           "{d}/empty.ckpt: exists and is not a directory"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_one_line(bad_files, capsys, case):
    argv, fragment = BAD_FILES[case]
    with pytest.raises(SystemExit) as e:
        main([a.format(d=bad_files) for a in argv])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == "", out
    assert fragment.format(d=bad_files) in _one_error_line(out.err), out.err


def test_device_without_a_gpu_is_one_line(ckpt, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(ckpt), "--device", "cuda", "--prompt", "x"])
    assert e.value.code == 2
    assert "--device cuda: no CUDA GPU is available" in _one_error_line(capsys.readouterr().err)


def test_bad_input_through_the_real_command(ckpt, bad_files):
    """The installed entry point, in a subprocess: argv bytes that are not UTF-8, a missing GPU, an empty file."""
    cases = [(["sample", "--checkpoint", str(ckpt), "--prompt", os.fsdecode(b"caf\xe9")], "byte 0xe9"),
             (["sample", "--checkpoint", str(bad_files / "empty.ckpt")], "empty file (0 bytes)")]
    if not torch.cuda.is_available():
        cases.append((["sample", "--checkpoint", str(ckpt), "--device", "cuda"], "no CUDA GPU is available"))
    for argv, fragment in cases:
        r = _gpt(*argv)
        assert r.returncode == 2 and r.stdout == "", (argv, r.stdout, r.stderr)
        assert fragment in _one_error_line(r.stderr), r.stderr


def test_an_unexpected_error_is_one_line_with_status_1(ckpt, capsys, monkeypatch):
    import gpt.cli

    def broken(**kwargs):
        raise AssertionError("a bug\nwith a second line")

    broken.__name__ = "sample"
    monkeypatch.setattr(gpt.cli, "COMMANDS", [broken])
    with pytest.raises(SystemExit) as e:
        main(["sample"])
    assert e.value.code == 1
    assert _one_error_line(capsys.readouterr().err) == \
        "gpt: error: AssertionError: a bug (an unexpected error; GPT_TRACEBACK=1 shows where)\n"
    monkeypatch.setenv("GPT_TRACEBACK", "1")
    with pytest.raises(AssertionError):
        main(["sample"])


# ---- options: dashes or underscores, every one documented -------------------------------------
def test_every_option_of_every_subcommand_takes_dashes_and_is_documented():
    from gpt.cli import COMMANDS, build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a.choices, dict)).choices
    assert sorted(subs) == sorted(f.__name__.rstrip("_") for f in COMMANDS)
    for name, sub in subs.items():
        options = [a for a in sub._actions if a.option_strings and a.dest not in ("help", "config", "print_config")]
        assert options, name
        for a in options:
            flag = a.option_strings[0]
            assert a.help and not a.help.startswith("("), f"gpt {name} {flag} has no help text"
            dashed = flag.replace("_", "-")
            assert _underscore_options([name, dashed, "1"]) == [name, flag, "1"]
            assert _underscore_options([name, dashed + "=1"]) == [name, flag + "=1"]
    top = build_parser().format_help()
    assert "dashes" in top and all(n in top for n in subs)


def test_help_lists_every_parameter(capsys):
    import inspect

    from gpt.cli import COMMANDS

    for f in COMMANDS:
        name = f.__name__.rstrip("_")
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        text = capsys.readouterr().out
        assert e.value.code == 0
        for p in inspect.signature(f).parameters:
            assert f"--{p} " in text or f"--{p}\n" in text, (name, p)


# ---- exports are readable by the group when the umask says so ---------------------------------
@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_export_follows_the_umask(ckpt, tmp_path, capsys, mask, dir_mode, file_mode, fmt):
    old = os.umask(mask)
    try:
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--format", fmt])
        main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--format", fmt])  # replace
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == dir_mode
    files = sorted(out.iterdir())
    assert len(files) >= 3 and {f.stat().st_mode & 0o777 for f in files} == {file_mode}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left
