"""Probe: does one GRPO gradient raise the probability of the right answers, and for how long a step?

    python scripts/grpo_step_probe.py --checkpoint runs/demo/sft/checkpoints/last.ckpt --prompts 64

Samples `group` replies to each of the first `prompts` rows of the demo task's train split (the
policy's own samples, gpt.rollout), scores them with the task's checker, takes the GRPO loss's
gradient (group-normalized advantages, no KL), then moves the weights along -gradient by steps of
fixed L2 length and prints the mean teacher-forced probability of each row's reference answer
(+ end-of-turn) on the same rows — and, as a control, after a random step of the same length.
Used for docs/LOG.md 2026-11-29 (night): why GRPO's learning rate has to be small on the demo.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from gpt.chat import ChatTemplate
from gpt.checkpoint import load_model
from gpt.demo_task import prompt_messages, reward
from gpt.rl_losses import group_advantages, grpo_loss
from gpt.rollout import response_logprobs, sample_rollout


def p_right(model: torch.nn.Module, tok, template: ChatTemplate, prompts: list[list[int]], rows: list[dict]) -> float:
    """Mean probability of each row's reference reply (its tokens + <|end|>), teacher-forced."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for p, r in zip(prompts, rows):
            reply = tok.encode(r["answer"]) + [template.end_id]
            logits = model(torch.tensor([p + reply])[:, :-1])[0, len(p) - 1:]
            logp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(reply)[:, None]).sum()
            total += logp.exp().item()
    return total / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--task", default="runs/demo/task/post.jsonl")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", default="0.01,0.03,0.1,0.3", help="L2 lengths of the steps")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.checkpoint)
    t = ChatTemplate(tok)
    with open(a.task, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:a.prompts]
    prompts = [t.render_prompt(prompt_messages(r)) for r in rows]
    base = p_right(model, tok, t, prompts, rows)
    ro = sample_rollout(model, prompts, stop_ids=t.stop_ids, end_id=t.end_id, pad_id=t.pad_id,
                        group_size=a.group, max_new_tokens=8, seed=1)
    rewards = torch.tensor([reward(r, x) for r, x in zip([r for r in rows for _ in range(a.group)], ro.texts(tok))])
    model.train()
    logp, _ = response_logprobs(model, ro)
    w = ro.response_mask.float()
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), group_advantages(rewards, a.group), w, beta=0.0)
    (loss / w.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    print(f"sampled reward {rewards.mean():.3f}; p(right answer) {base:.4f}; gradient L2 norm {norm:.4f}")
    for length in (float(x) for x in a.steps.split(",")):
        stepped, random = copy.deepcopy(model), copy.deepcopy(model)
        noise = [torch.randn_like(g) for g in grads]
        noise_norm = torch.sqrt(sum((n * n).sum() for n in noise))
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), grads):
                p -= length * g / norm
            for p, n in zip(random.parameters(), noise):
                p += length * n / noise_norm
        print(f"step of L2 length {length}: p(right) {p_right(stepped, tok, t, prompts, rows):.4f} "
              f"(random direction: {p_right(random, tok, t, prompts, rows):.4f})")


if __name__ == "__main__":
    main()
