"""gpt/prompt_data.py: prompt formats, bad rows, and a prompt order that is a pure function of (seed, index)."""
import json
from types import SimpleNamespace

import pytest

from gpt.chat import ChatTemplate
from gpt.demo_task import make_rows
from gpt.prompt_data import PromptDataModule, Prompts, prompt_of
from tests.chat_fixtures import shakespeare_tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(shakespeare_tokenizer().to_str())
    return str(path)


def test_prompt_formats():
    user = {"role": "user", "content": "What is 2 + 3?"}
    assert prompt_of({"messages": [user, {"role": "assistant", "content": "5"}]}) == ([user], "5")
    assert prompt_of({"messages": [user]}) == ([user], None)
    assert prompt_of({"prompt": "What is 2 + 3?", "completion": "5"}) == ([user], "5")
    system = {"role": "system", "content": "Be brief."}
    assert prompt_of({"prompt": [system, user]}) == ([system, user], None)


@pytest.mark.parametrize("row, error", [
    ({"text": "hi"}, "neither a 'messages' nor a 'prompt' column"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "must end with a user turn"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "role 'bot'"),
    ({"prompt": 7}, "expected a list of messages"),
])
def test_bad_rows_are_one_line_naming_the_row(tmp_path, row, error):
    good = {"prompt": "hello"}
    src = _jsonl(tmp_path / "p.jsonl", [good, good, row])
    with pytest.raises(ValueError, match=rf"p.jsonl: row 3: .*{error}"):
        Prompts(src, ChatTemplate(shakespeare_tokenizer()), max_prompt_tokens=100)


def test_rows_carry_their_columns_and_long_prompts_are_counted(tmp_path):
    rows = make_rows(20, "train", seed=0)
    rows[3] = {**rows[3], "messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]}
    template = ChatTemplate(shakespeare_tokenizer())
    p = Prompts(_jsonl(tmp_path / "t.jsonl", rows), template, max_prompt_tokens=120)
    assert len(p) == 19 and p.skipped_long == 1
    item = p[0]
    assert item["prompt_ids"] == template.render_prompt(rows[0]["messages"][:-1])
    assert item["row"]["answer"] == rows[0]["answer"] and item["row"]["family"] == rows[0]["family"]


def _module(src, tok_file, world_size, rank, max_steps=4, steps_per_rollout=1, m=3, **kw):
    dm = PromptDataModule(src, tokenizer=tok_file, micro_batch_size=m, seed=5, **kw)
    module = SimpleNamespace(steps_per_rollout=steps_per_rollout)  # what gpt.rl.RLModule tells it
    dm.trainer = SimpleNamespace(max_steps=max_steps, world_size=world_size, global_rank=rank, global_step=0,
                                 lightning_module=module, strategy=SimpleNamespace())
    dm.setup("fit")
    return dm


def test_order_is_a_function_of_seed_and_index_across_world_sizes_and_resume(tmp_path, tok_file):
    # Keys made unique by the row's index: the demo task repeats a value (one word) across rows.
    src = _jsonl(tmp_path / "t.jsonl", [{**r, "key": f"{r['key']}#{i}"} for i, r in enumerate(make_rows(40, "train", seed=0))])
    one = _module(src, tok_file, world_size=1, rank=0, m=6)
    seq = [r["key"] for b in one.train_dataloader() for r in b["rows"]]
    assert len(seq) == 24 and len(set(seq)) == 24  # 4 rollouts x 6 prompts, no repeats within the epoch
    # Two ranks of 3 read the same global sequence, rank r taking its slice of each rollout.
    ranks = [[[r["key"] for r in b["rows"]] for b in _module(src, tok_file, 2, k).train_dataloader()] for k in (0, 1)]
    assert [k for step in zip(*ranks) for part in step for k in part] == seq
    # Resumed after 2 PPO rollouts of 4 optimizer steps each: the sampler starts at rollout 2.
    dm = _module(src, tok_file, 1, 0, m=6, max_steps=16, steps_per_rollout=4)
    dm.trainer.global_step = 8
    assert [r["key"] for b in dm.train_dataloader() for r in b["rows"]] == seq[12:]


def test_run_checks_are_one_line(tmp_path, tok_file):
    src = _jsonl(tmp_path / "t.jsonl", make_rows(10, "train", seed=0))
    with pytest.raises(ValueError, match="not a multiple of the optimizer steps per rollout, 4"):
        _module(src, tok_file, 1, 0, max_steps=6, steps_per_rollout=4)
    with pytest.raises(ValueError, match="reads 12 prompts .* has 10; lower max_steps or set data.allow_repeat"):
        _module(src, tok_file, 1, 0, allow_repeat=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        _module(str(tmp_path / "missing.jsonl"), tok_file, 1, 0)
    dm = _module(src, tok_file, 1, 0)
    dm.load_state_dict({"global_batch_size": 3, "seed": 5, "max_prompt_tokens": 192, "examples": None})
    dm.micro_batch_size = 4
    with pytest.raises(ValueError, match="trained with 3 prompts per rollout, this run has 4"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"seed 6 -> 5"):
        dm.load_state_dict({"seed": 6})
