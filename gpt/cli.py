"""The `gpt` command: one typed function per subcommand, parsed by jsonargparse.

    gpt sample --checkpoint runs/x/checkpoints/last.ckpt --prompt "Once upon a time" \
               --max_new_tokens 200 --temperature 0.8 --top_k 200 --seed 1337
    gpt export --checkpoint runs/x/checkpoints/last.ckpt --out exports/x --format hf
    gpt chat   --checkpoint runs/demo/sft/checkpoints/last.ckpt --system "Be brief."
    python -m gpt sample --help

Options take underscores or dashes (`--max-new-tokens`). A checkpoint is any kind
gpt.checkpoint.load_model knows: a Lightning .ckpt, a DeepSpeed checkpoint directory, a
native export or a Hugging Face directory. Errors print one line `gpt: error: ...` on stderr
and exit with status 2. Later stages add subcommands by appending a function to COMMANDS.
"""
from __future__ import annotations

import sys
from typing import Callable, Literal, Optional

import torch

from gpt.checkpoint import CheckpointError, load_model, load_tokenizer, save_model


def _device(device: Optional[str]) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_and_tokenizer(checkpoint: str, tokenizer: Optional[str], device: Optional[str]):
    model, tok = load_model(checkpoint, device=_device(device))
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    return model, tok


def sample(checkpoint: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
           top_k: Optional[int] = 200, top_p: Optional[float] = None, seed: Optional[int] = 1337,
           device: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
    """Continue a prompt, printing the text as it is generated.

    Args:
        checkpoint: a .ckpt file, a DeepSpeed checkpoint dir, a native export or an HF directory.
        prompt: text to continue; empty starts from end-of-text (an unconditional sample).
        max_new_tokens: most tokens to generate; capped so prompt + new tokens fit block_size.
        temperature: 0 = greedy.
        top_k: sample among the k most likely tokens (None or 0 = all).
        top_p: nucleus sampling threshold (None = off).
        seed: random seed; the same seed gives the same text.
        device: cpu, cuda, cuda:1, ...; default cuda when available.
        tokenizer: a tokenizer.json (or GPT-2 vocab/merges dir) overriding the checkpoint's.
    """
    from gpt.generate import IncrementalDecoder, generate

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
        out: output directory (written under a temporary name, then renamed).
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


from gpt.chat_cli import chat  # noqa: E402  (gpt chat lives in its own module)

COMMANDS: list[Callable[..., None]] = [sample, export, chat]


def _underscore_options(argv: list[str]) -> list[str]:
    """`--max-new-tokens 5` -> `--max_new_tokens 5` for names that are parameters of a command."""
    import inspect

    known = {name for f in COMMANDS for name in inspect.signature(f).parameters}
    out = []
    for arg in argv:
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, eq, value = arg[2:].partition("=")
            if name.replace("-", "_") in known:
                arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from jsonargparse import CLI

    argv = _underscore_options(sys.argv[1:] if argv is None else list(argv))
    try:
        CLI(COMMANDS, args=argv, as_positional=False, prog="gpt")
    except (CheckpointError, ValueError, OSError, KeyError, RuntimeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"gpt: error: {lines[0]}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `gpt sample ... | head`: the reader left, nothing to report
        sys.exit(0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
