"""gpt.evaluate: exact match through the real generator, on models whose greedy replies are known."""
import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.config import GPTConfig
from gpt.demo_task import check, make_rows
from gpt.evaluate import exact_match, format_result, generate_replies
from gpt.generate import generate
from gpt.model import GPT
from tests.chat_fixtures import shakespeare_tokenizer


@pytest.fixture(scope="module")
def tok():
    return shakespeare_tokenizer()


def chain_model(tok, chain: list[int]) -> GPT:
    """A GPT whose greedy next token depends only on the current one: chain[i] -> chain[i+1].

    Blocks add nothing (zero output projections), so the last position's logits are
    lm_head(norm(wte[token])); wte gives chain[i] the unit vector e_i and lm_head maps e_i to
    chain[i+1]. Any other token embeds to zero, all logits tie, and argmax picks id 0.
    """
    assert len(set(chain[:-1])) == len(chain) - 1
    torch.manual_seed(0)
    model = GPT(GPTConfig(flavour="llama", n_layer=1, n_head=2, n_embd=32, block_size=128,
                          vocab_size=tok.vocab_size, tie_embeddings=False))
    with torch.no_grad():
        for b in model.blocks:
            b.attn.proj.weight.zero_()
            b.mlp.proj.weight.zero_()
        model.wte.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (t, nxt) in enumerate(zip(chain, chain[1:])):
            model.wte.weight[t, i] = 1.0
            model.lm_head.weight[nxt, i] = 10.0
    return model.eval()


def rows_with_answer_19():
    rows = make_rows(30, "val", seed=2)
    extra = [{"messages": [{"role": "user", "content": "What is 10 + 9?"}, {"role": "assistant", "content": "19"}],
              "family": "add", "answer": "19"},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: 19"},
                           {"role": "assistant", "content": "19."}], "family": "copy", "answer": "19."}]
    return rows[:13] + extra + rows[13:]


def test_exact_match_equals_the_checker_on_a_forced_reply(tok):
    chat = ChatTemplate(tok)
    nineteen = tok.encode("19")
    rows = rows_with_answer_19()
    model = chain_model(tok, [chat.role_ids["assistant"], *nineteen, chat.end_id])
    r = exact_match(model, tok, rows, max_new_tokens=8, batch_size=6)
    assert r["replies"] == ["19"] * len(rows)
    want = [check(row, "19") for row in rows]
    assert sum(want) == 2 + sum(row["answer"] == "19" for row in rows[:13] + rows[15:])
    assert r["exact_match"] == sum(want) / len(rows) and r["n"] == len(rows)
    for fam, v in r["per_family"].items():
        hits = [w for row, w in zip(rows, want) if row["family"] == fam]
        assert v == {"exact_match": sum(hits) / len(hits), "n": len(hits)}
    assert (r["ended"], r["eot"], r["truncated"]) == (1.0, 0.0, 0.0)
    assert "exact-match" in format_result(r) and "add" in format_result(r)


def test_stops_are_classified(tok):
    chat = ChatTemplate(tok)
    rows = rows_with_answer_19()[12:16]
    one, nine = tok.encode("1"), tok.encode("9")
    # "19" then a token with no successor: all logits tie, argmax = id 0 = <|endoftext|>.
    eot = exact_match(chain_model(tok, [chat.role_ids["assistant"], *one, *nine]), tok, rows, max_new_tokens=8)
    assert eot["replies"] == ["19"] * 4 and (eot["ended"], eot["eot"], eot["truncated"]) == (0.0, 1.0, 0.0)
    assert eot["exact_match"] == 0.5
    # "1" -> "9" -> "1" ...: never stops, runs to the limit and is wrong.
    loop = exact_match(chain_model(tok, [chat.role_ids["assistant"], *one, *nine, *one]), tok, rows, max_new_tokens=7)
    assert loop["replies"] == ["1919191"] * 4 and (loop["ended"], loop["truncated"]) == (0.0, 1.0)
    assert loop["exact_match"] == 0.0


def test_batched_left_padded_replies_equal_one_at_a_time(tok):
    """A real (random) model: prompts of many lengths batched with left padding give the same replies."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=160, vocab_size=tok.vocab_size)).eval()
    rows = make_rows(12, "train", seed=5)
    convs = [r["messages"][:-1] for r in rows]
    chat = ChatTemplate(tok)
    assert len({len(chat.render_prompt(c)) for c in convs}) > 5
    # One at a time, straight through the generator with the template's prompt and stop tokens...
    alone = []
    for conv in convs:
        (ids,) = generate(model, [chat.render_prompt(conv)], 10, temperature=0.0, stop_ids=chat.stop_ids)
        alone.append((ids, tok.decode(ids)))
    # ...equals the evaluator's batches of mixed lengths, whatever the batch size.
    for bs in (5, 64):
        replies = generate_replies(model, tok, convs, max_new_tokens=10, batch_size=bs)
        assert [(r.ids, r.text) for r in replies] == alone


def test_sampled_replies_are_seeded_and_training_mode_is_restored(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=tok.vocab_size, dropout=0.5))
    convs = [r["messages"][:-1] for r in make_rows(6, "val", seed=1)]
    a = generate_replies(model, tok, convs, max_new_tokens=6, temperature=1.0, seed=3)
    assert a == generate_replies(model, tok, convs, max_new_tokens=6, temperature=1.0, seed=3)
    assert a != generate_replies(model, tok, convs, max_new_tokens=6, temperature=1.0, seed=4)
    assert model.training  # dropout was off while sampling, and training mode is back
    with pytest.raises(ValueError, match="no rows"):
        exact_match(model, tok, [])


def test_cli_refuses_a_reward_model(tmp_path, capsys):
    from gpt.evaluate import main
    from tests.rl_fixtures import write_reward_model

    rm = write_reward_model(tmp_path / "rm.ckpt")
    with pytest.raises(SystemExit) as e:
        main(rm)
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: {rm}: holds a reward model (recipes/reward.py), not a language " \
                                      "model; exact match is measured on a language model's replies\n"
