"""The `gpt` command: one typed function per subcommand, parsed by jsonargparse.

    gpt sample --checkpoint runs/x/checkpoints/last.ckpt --prompt "Once upon a time" \
               --max_new_tokens 200 --temperature 0.8 --top_k 200 --seed 1337
    gpt export --checkpoint runs/x/checkpoints/last.ckpt --out exports/x --format hf
    gpt eval   --checkpoint exports/x --data runs/demo/shards --split val --json eval.json
    gpt plan   --preset llama-7b --gpus 64 --gpu h100 --zero 3             (gpt/plan.py)
    gpt attention --checkpoint runs/x/checkpoints/last.ckpt --prompt "..."  (gpt/attention.py)
    gpt plot   runs/a runs/b --out runs/compare                             (gpt/plots.py)
    gpt chat   --checkpoint runs/demo/sft/checkpoints/last.ckpt --system "Be brief."   (gpt/chat_cli.py)
    gpt score  --checkpoint RM --prompt "What is 2 + 3?" --response "5"     (gpt/score_cli.py)
    python -m gpt sample --help

A checkpoint is any kind gpt.checkpoint.load_model knows: a Lightning .ckpt, a DeepSpeed
checkpoint directory, a native export or a Hugging Face directory.

What every subcommand gets from `main`, so a new one is just a function appended to COMMANDS
(its name is the function's, less a trailing underscore: `eval_` is `gpt eval`; its options
are its typed parameters, their help the Args of its docstring):
- options take underscores or dashes (`--max-new-tokens` = `--max_new_tokens`);
- bad input is one line `gpt: error: ...` on stderr and exit status 2, whether the parser
  found it (an unknown option, a non-integer) or the command did (a ValueError, OSError,
  KeyError or RuntimeError, which CheckpointError and ShardError are). Anything else is a bug:
  one line and status 1, with the traceback when GPT_TRACEBACK=1.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, Literal, Optional

import torch
from jsonargparse import ArgumentParser

from gpt.checkpoint import (CheckpointError, check_vocab, load_model, load_tokenizer, one_line, refuse_reward_model,
                            save_model)

DESCRIPTION = (
    "Sample from, export and evaluate GPT checkpoints of any kind: a Lightning .ckpt, a DeepSpeed "
    "checkpoint directory, a native export or a Hugging Face directory. Options take underscores or "
    "dashes (--max_new_tokens or --max-new-tokens); `gpt SUBCOMMAND --help` lists a subcommand's options. "
    "Errors are one line on stderr, exit status 2.")


# ---- shared by the subcommands -----------------------------------------------------------
def _device(device: Optional[str]) -> str:
    """The device to run on, or a one-line ValueError when this machine does not have it."""
    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"--device {device}: no CUDA GPU is available (torch {torch.__version__}, {build})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: use cpu, cuda, cuda:N or mps")
    return device


def _model_and_tokenizer(checkpoint: str, tokenizer: Optional[str], device: Optional[str]):
    device = _device(device)  # before loading: a bad --device must not cost a model load
    override = load_tokenizer(tokenizer) if tokenizer is not None else None
    refuse_reward_model(checkpoint, checkpoint, "score replies with it: gpt score --checkpoint ...")
    model, tok = load_model(checkpoint, device=device)
    if override is not None:
        check_vocab(override, model.config, f"--tokenizer {tokenizer}")
        tok = override
    return model, tok


def _utf8(name: str, text: str) -> str:
    """Undecodable bytes in argv arrive as lone surrogates (PEP 383): name the byte."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape")
        raise ValueError(f"--{name} is not valid UTF-8: byte 0x{raw.hex()} at character {e.start} "
                         "(check the terminal's encoding, e.g. LANG=C.UTF-8)") from None
    return text


# ---- subcommands ---------------------------------------------------------------------------
def sample(checkpoint: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: Optional[int] = 200, top_p: Optional[float] = None, seed: Optional[int] = 1337,
           device: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
    """Continue a prompt, printing the text as it is generated.

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint dir, a native export or an HF directory.
        prompt: text to continue; empty starts from end-of-text (an unconditional sample).
        max_new_tokens: most tokens to generate (>= 0); capped so prompt + new tokens fit block_size.
        temperature: softmax temperature, >= 0; 0 = greedy.
        top_k: sample among the k most likely tokens (None or 0 = all).
        top_p: nucleus sampling threshold in (0, 1] (None = off).
        seed: random seed in [0, 2**64); the same seed gives the same text.
        device: cpu, cuda, cuda:1, mps; default cuda when available.
        tokenizer: a tokenizer.json (or GPT-2 vocab/merges dir) overriding the checkpoint's.
    """
    from gpt.generate import IncrementalDecoder, check_sampling, generate

    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)  # before a model is loaded
    _utf8("prompt", prompt)
    model, tok = _model_and_tokenizer(checkpoint, tokenizer, device)
    if tok is None:
        raise CheckpointError(f"{checkpoint}: holds no tokenizer; pass --tokenizer PATH")
    ids = tok.encode(prompt) if prompt else [tok.eot_id]
    room = model.config.block_size - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt is {len(ids)} tokens; the model's block_size is {model.config.block_size}")
    if max_new_tokens > room:
        print(f"gpt: note: max_new_tokens capped at {room} (block_size {model.config.block_size})", file=sys.stderr)
        max_new_tokens = room
    dec = IncrementalDecoder(tok)
    sys.stdout.write(prompt)
    sys.stdout.flush()

    def on_token(row: int, token_id: int) -> None:
        piece = dec.push(token_id)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()

    generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             seed=seed, stop_ids=[tok.eot_id], on_token=on_token)
    sys.stdout.write(dec.flush() + "\n")
    sys.stdout.flush()


def export(checkpoint: str, out: str, format: Literal["hf", "native"] = "hf",
           tokenizer: Optional[str] = None) -> None:
    """Write a checkpoint as a Hugging Face directory (from_pretrained) or a native export.

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint dir, a native export or an HF directory.
        out: output directory (written under a temporary name, then renamed; modes follow the umask).
        format: hf (GPT2LMHeadModel / LlamaForCausalLM + tokenizer.json) or native (gpt.checkpoint).
        tokenizer: a tokenizer.json overriding the checkpoint's.
    """
    model, tok = _model_and_tokenizer(checkpoint, tokenizer, "cpu")
    if format == "hf":
        from gpt.hf import export_hf

        path = export_hf(model, out, tokenizer=tok)
    else:
        path = save_model(model, out, tokenizer=tok)
    print(path)


def eval_(checkpoint: str, data: str, split: str = "val", block_size: Optional[int] = None,
          windows: Optional[int] = None, batch_size: int = 8, device: Optional[str] = None,
          tokenizer: Optional[str] = None, json: Optional[str] = None, wandb_project: Optional[str] = None,
          wandb_group: Optional[str] = None, wandb_dir: Optional[str] = None) -> None:
    """Held-out loss and bits/byte of a checkpoint on a shard split: one line, optionally JSON.

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint dir, a native export or an HF directory.
        data: a shard directory (data_prep.make_shards --out); its tokenizer must be the checkpoint's.
        split: the split to measure (val, train, ...).
        block_size: tokens per window (default the model's); a run's val/loss used data.block_size.
        windows: measure the first N windows of the split (default all); a run's val/loss used data.val_windows.
        batch_size: windows per forward pass.
        device: cpu, cuda, cuda:1, mps; default cuda when available.
        tokenizer: a tokenizer.json overriding the checkpoint's (needed for bits/byte when it has none).
        json: also write the result as JSON to this file (written atomically); '-' = stdout (the line then goes to stderr).
        wandb_project: log the result as one W&B run (job_type eval) in this project; default no W&B run.
        wandb_group: the W&B group (the experiment) of that run.
        wandb_dir: where W&B writes its files (default ./wandb).
    """
    from gpt.lm_eval import check_options, evaluate, log_wandb, open_split, summary_line, write_json

    check_options(block_size, windows, batch_size)
    shards = open_split(data, split)  # a bad shard directory fails before a model is loaded
    model, tok = _model_and_tokenizer(checkpoint, tokenizer, device)
    if tok is None:
        print(f"gpt: note: {checkpoint} holds no tokenizer: the shards' tokenizer is not checked and bits/byte "
              "is not computed (pass --tokenizer PATH)", file=sys.stderr)
    result = {"checkpoint": str(checkpoint), **evaluate(model, shards, tok, block_size, windows, batch_size)}
    print(summary_line(result), file=sys.stderr if json == "-" else sys.stdout, flush=True)
    if json:
        write_json(result, json)
    if wandb_project:
        log_wandb(result, wandb_project, wandb_group, wandb_dir)


from gpt.attention import attention  # noqa: E402  (subcommands defined in their own modules)
from gpt.chat_cli import chat  # noqa: E402
from gpt.plan import plan  # noqa: E402
from gpt.plots import plot  # noqa: E402
from gpt.score_cli import score  # noqa: E402

COMMANDS: list[Callable[..., None]] = [sample, export, eval_, chat, score, plan, attention, plot]


# ---- parsing and the shared error handling ------------------------------------------------
class _Parser(ArgumentParser):
    """jsonargparse's parser, reporting a bad command line as one line like every other error."""

    def error(self, message: str, ex: Optional[Exception] = None):
        if not self.exit_on_error:  # jsonargparse is probing (e.g. a union type): let it catch
            return super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        required = re.match(r"the following arguments are required: (.+)", message)
        if required:  # "sample.checkpoint" is jsonargparse's key; the user typed --checkpoint
            keys = [k.strip() for k in required.group(1).split(",")]
            prog = f"gpt {keys[0].split('.')[0]}" if "." in keys[0] else prog
            message = "missing " + ", ".join("--" + k.split(".", 1)[-1] for k in keys)
        print(f"gpt: error: {_bad_value(message)} (see {prog} --help)", file=sys.stderr)
        sys.exit(2)


def _bad_value(message: str) -> str:
    """jsonargparse's multi-line type error as `--top_k: expected int or None, got '1.5'`."""
    found = re.match(r'Parser key "([\w.]+)":\s*(.*)', message, re.S)
    if not found:
        return " ".join(message.split())
    key, rest = found.groups()
    got = re.findall(r"(?:Got|Given) value: (.*)", rest)
    rest = rest.split("Given value type")[0]
    literal = re.search(r"Literal\[(.*?)\]", rest)
    types = ["None" if t == "NoneType" else t for t in re.findall(r"<class '(\w+)'>", rest)]
    expected = f"one of {literal.group(1)}" if literal else " or ".join(dict.fromkeys(types))
    if not got or not expected:
        return f"--{key}: " + " ".join(rest.split())
    return f"--{key}: expected {expected}, got {got[-1].strip()!r}"


def _commands() -> dict[str, Callable[..., None]]:
    return {f.__name__.rstrip("_"): f for f in COMMANDS}


def build_parser() -> ArgumentParser:
    from jsonargparse import auto_parser

    return auto_parser(_commands(), as_positional=False, parser_class=_Parser, prog="gpt",
                       description=DESCRIPTION)


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--name` of the parser and its subcommands' parsers (argparse lists them only in _actions)."""
    names = set()
    for action in parser._actions:
        names.update(o[2:] for o in action.option_strings if o.startswith("--"))
        if isinstance(action.choices, dict):  # a subcommands action: name -> parser
            for sub in action.choices.values():
                if isinstance(sub, argparse.ArgumentParser):
                    names |= _option_names(sub)
    return names


def _underscore_options(argv: list[str], names: Optional[set[str]] = None) -> list[str]:
    """`--max-new-tokens 5` -> `--max_new_tokens 5` for names that are options of some subcommand."""
    names = _option_names(build_parser()) if names is None else names
    out = []
    for arg in argv:
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, eq, value = arg[2:].partition("=")
            if name.replace("-", "_") in names:
                arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def _shorthands(argv: list[str]) -> list[str]:
    """Two conveniences jsonargparse lacks: a bare boolean option means true (`gpt plan --json`), and
    the words right after a command whose function names a list parameter in its `positional`
    attribute become that list (`gpt plot A B --out D` -> `--run_dirs ["A", "B"] --out D`)."""
    import json
    import typing

    command = _commands().get(argv[0] if argv else "")
    if command is None:
        return argv
    hints = typing.get_type_hints(command)
    flags = {n for n, t in hints.items() if t is bool or t == Optional[bool]}
    out = [argv[0]]
    for i, arg in enumerate(argv[1:], start=1):
        out.append(arg)
        if arg[2:] in flags and arg.startswith("--") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    name, bare = getattr(command, "positional", None), out[1:]
    end = next((i for i, a in enumerate(bare) if a.startswith("-")), len(bare))
    if name is None or end == 0:
        return out
    return [out[0], f"--{name}", json.dumps(bare[:end]), *bare[end:]]


def _run(argv: list[str]) -> Any:
    parser = build_parser()
    init = parser.instantiate(parser.parse_args(_shorthands(_underscore_options(argv, _option_names(parser)))))
    name = init.subcommand
    kwargs = {k: v for k, v in vars(init[name]).items() if k != "config"}
    return _commands()[name](**kwargs)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        _run(sys.argv[1:] if argv is None else list(argv))
    except BrokenPipeError:  # `gpt sample ... | head`: the reader left, nothing to report
        sys.exit(0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # bad input: CheckpointError, ShardError, ...
        print(f"gpt: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if os.environ.get("GPT_TRACEBACK"):
            raise
        print(f"gpt: error: {type(e).__name__}: {one_line(e)} (an unexpected error; GPT_TRACEBACK=1 shows "
              "where)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
