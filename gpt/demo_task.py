"""The verifiable demo task: short instruction conversations with one exact answer each.

    from gpt.demo_task import make_rows, check, reward, FAMILIES
    rows = make_rows(1000, "train", seed=0)   # list of dicts, TRL's conversational format:
    # {"messages": [{"role": "user", "content": "What is the smaller number, 1 or 7?"},
    #               {"role": "assistant", "content": "1"}],
    #  "family": "compare", "answer": "1", "split": "train", "template": "compare/7", "key": "pair|1|7"}
    check(rows[0], "1.")  -> True       reward(rows[0], "7") -> 0.0

No instruction data set can be downloaded on the demo's machine, so the post-training stages
learn and are measured on this generator. Families (FAMILIES): copy a quoted word, the first/last
word of 2-3 words, count 1-4 words, the larger/smaller of two digits, look a key up in a list of
2-3, and two multi-turn ones (recall a word given a turn earlier; say the previous answer again).
Each family has several phrasing templates, some optional system prompts, and its answers are
one short canonical token ("7", "king"). The task is sized for the demo's 2.6M-parameter model:
with longer lists, two-digit numbers and multi-word answers, its SFT stayed at 0-1% held-out
exact-match and never copied from the prompt (measured: `git log gpt/demo_task.py`).

The held-out split ("val") is unseen twice over: its phrasing templates (and system prompts)
are never used for training rows, and its values are disjoint — every question's values
(the word list, the number pair, the table) have a `key`, and a key belongs to exactly one
split by its hash, whatever the family (so a held-out word list is never copied, reversed or
counted in training either). Row i of a split is a pure function of (seed, split, i): asking
for more rows keeps the first ones.

The post-training split ("post") asks about training values in a third set of phrasings (and
system prompts) that neither SFT nor the held-out evaluation uses: the prompts of the
preference pairs and of RL, which (as in InstructGPT, whose RL prompts were not its SFT
prompts) learn from rewards on questions the SFT model was never shown answers to. Measured
(docs/LOG.md, 2026-11-29 evening): GRPO on the SFT rows' own phrasings (memorized: 73% exact
match there, 56% held out) left held-out exact match flat; on "post" prompts it rose. Its
phrasings are many (POST_CORES under POST_PREFIXES, 30-67 per family), and none of their turns
is within a few word edits of another split's (`near_duplicate`).

The development split ("dev") asks about held-out values in a fourth set of phrasings (and
system prompts): it is for choosing settings and comparing variants, so that "val" is read once
per result, not tuned on. (Its values are val's: the held-out value space is small, and neither
split is ever trained on.)

Exact match is the metric. `check` compares after `normalize`: case, runs of whitespace,
surrounding quotes and trailing ".", "!" or "?" are ignored — nothing else. A reply that
wraps the right value in a sentence ("The answer is 19.") is wrong: the task teaches bare
answers, and accepting sentences would reward a reply that lists several values. `reward`
is the same test as a float in {0, 1}, the verifiable reward for RL.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional

Split = Literal["train", "val", "post", "dev"]
SPLITS = ("train", "val", "post", "dev")
# "post" asks about training values; "dev" about held-out ones (the same value space as "val": neither is trained on)
VALUE_SPLIT = {"train": "train", "val": "val", "post": "train", "dev": "val"}
VAL_SHARE = 0.2  # share of value keys held out
# Template ids are unique per family, counted over the splits in this order: "post" last, since its
# phrasings are composed and may grow, and the other splits' rows must not change when they do.
TEMPLATE_ID_ORDER = ("train", "val", "dev", "post")

# Nouns that are one token with and without a leading space in the demo tokenizer, so copying
# a word from the question into the answer is copying a token.
WORDS = ("age", "air", "bed", "day", "ear", "form", "fort", "hat", "head", "heart", "house", "joy", "king",
         "land", "man", "night", "pen", "pin", "port", "rain", "ring", "rest", "ship", "son", "thing", "way")

SYSTEM_PROMPTS = {
    "train": ("You are a helpful assistant.", "Answer with just the answer.", "Be brief.",
              "You are a concise assistant. Reply with the answer only.",
              # Many more, of every kind a user writes (persona, tone, format, length, context), so that
              # no word of a system turn is a cue for a family: with four, a held-out system prompt that
              # said "words" made the model count (docs/LOG.md, 2026-11-29 late night and 2026-11-30).
              "You are a friendly tutor.", "You are Ada, an AI assistant.", "Be polite.",
              "Today is Monday.", "The user is learning English.", "Be direct.",
              "You are a terse bot.", "No explanations, please.", "Respond in plain text.",
              "One word or one number per reply is best.", "Do not use full sentences.",
              "You help people with small puzzles.", "You are precise and careful.",
              "Think, then answer with only the result.", "Use lowercase if you like.",
              "You are a quiz master's assistant.", "Never add extra words to an answer.",
              "The user prefers minimal replies.", "Write the answer and nothing else.",
              "You are an expert at lists and numbers.", "Stay on topic.",
              "You are a calm and patient helper.", "Short replies only.",
              "Count carefully when counting, copy carefully when copying.",
              "Answers are checked by a program, so give the exact answer.", "Avoid punctuation where possible.",
              "You are a model trained to follow instructions.", "Help the user.",
              "Your name is Sam.", "The conversation may have several turns.",
              "Be accurate.", "Do what the user asks."),
    "val": ("Reply briefly.", "You are an assistant that answers in as few words as possible."),
    "post": ("Keep it short.", "You are a chat assistant. Give only the answer."),
    "dev": ("Give short answers.", "You are a helpful assistant. Keep your replies as short as possible."),
}
SYSTEM_SHARE = 0.25
ACKS = ("OK.", "Got it.", "Noted.", "Sure.")


@dataclass(frozen=True)
class Family:
    """Phrasings per split and a sampler of (fields for the template, answer, value key)."""
    name: str
    templates: dict[str, tuple[str, ...]]
    sample: Callable[[random.Random], tuple[dict, str, str]]
    turns: int = 1  # 2: templates are "first user turn|second user turn"


# ---- value samplers: (template fields, answer, key) -----------------------------------------
def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def _word_list(lo: int, hi: int, answer: Callable[[list[str], dict], str], **extra):
    def sample(rng: random.Random) -> tuple[dict, str, str]:
        words = _words(rng, lo, hi)
        fields = {k: rng.choice(v) for k, v in extra.items()}
        return {"words": " ".join(words), **fields}, answer(words, fields), "words|" + " ".join(words)
    return sample


def _compare(rng: random.Random) -> tuple[dict, str, str]:
    a, b = rng.sample(range(10), 2)
    rel = rng.choice(("larger", "smaller"))
    answer = max(a, b) if rel == "larger" else min(a, b)
    return {"a": a, "b": b, "rel": rel}, str(answer), f"pair|{min(a, b)}|{max(a, b)}"


def _lookup(rng: random.Random) -> tuple[dict, str, str]:
    keys = _words(rng, 2, 3)
    values = [rng.randint(0, 9) for _ in keys]
    table = ", ".join(f"{k}: {v}" for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return {"table": table, "key": keys[i]}, str(values[i]), f"table|{table}|{keys[i]}"


def _word(family: str, answer_of_first_turn: Callable[[random.Random, str], str]):
    """One word, the conversation's only content word; keyed per family, so a held-out word
    of one family is still an answer (of another family) in training."""
    def sample(rng: random.Random) -> tuple[dict, str, str]:
        w = rng.choice(WORDS)
        return {"words": w, "first": answer_of_first_turn(rng, w)}, w, f"{family}|{w}"
    return sample


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("copy", {
        "train": ('Repeat after me: "{words}"', 'Say "{words}".', 'Please repeat this word: "{words}"',
                  'Echo: "{words}"', 'Copy this exactly: "{words}"', 'Can you repeat "{words}"?',
                  'Repeat the following: "{words}"', 'Write this again: "{words}"'),
        "val": ('Say again: "{words}"', 'Please copy this word: "{words}"', 'Could you echo "{words}"?'),
        "post": ('Print the word "{words}".', 'Just say "{words}".',
                 'Repeat "{words}" back to me.', 'Output this word: "{words}"',
                 'Type "{words}".', 'Reply with the word "{words}".',
                 'Give me back this word: "{words}"', 'Write down "{words}".'),
        "dev": ('Repeat this word back: "{words}"', 'Can you say "{words}"?', 'Write the word "{words}" for me.')},
        _word("copy", lambda rng, w: "")),
    Family("first_last", {
        "train": ('What is the {pos} word in "{words}"?', 'Which word comes {pos} in "{words}"?',
                  'Tell me the {pos} word of "{words}".', 'Give the {pos} word: "{words}"',
                  'Name the {pos} word in "{words}".', 'In "{words}", which word is {pos}?',
                  'The {pos} word of "{words}" is?', 'Say the {pos} word: "{words}"'),
        "val": ('Find the {pos} word in "{words}".', 'Which is the {pos} word of "{words}"?',
                'Please say the {pos} word in "{words}".'),
        "post": ('Return the {pos} word of "{words}".', 'From "{words}", give me the {pos} word.',
                 'What word is {pos} in "{words}"?', 'Point out the {pos} word in "{words}".',
                 'Tell me which word is {pos} in "{words}".', 'Look at "{words}". Which word is {pos}?',
                 'I say "{words}". What is the {pos} word?', 'Pick the {pos} word from "{words}".'),
        "dev": ('Of the words "{words}", which is {pos}?', 'Say which word is {pos}: "{words}"',
                'Give me the {pos} word from "{words}".')},
        _word_list(2, 3, lambda w, f: w[0] if f["pos"] == "first" else w[-1], pos=("first", "last"))),
    Family("count", {
        "train": ('How many words are in "{words}"?', 'Count the words: "{words}"',
                  'How many words does this have: "{words}"', 'Count how many words are in "{words}".',
                  'Number of words in "{words}"?', 'How many words? "{words}"',
                  'Tell me how many words are in "{words}".', 'What is the word count of "{words}"?'),
        "val": ('Please count the words in "{words}".', 'How many words do you see here: "{words}"',
                'Give the number of words in "{words}".'),
        "post": ('Count the number of words in "{words}".', 'What is the number of words in "{words}"?',
                 'How many words appear in "{words}"?', 'Word count for "{words}"?',
                 'How many words does "{words}" have?', 'Count them: "{words}"',
                 'Tell me the number of words in "{words}".', 'I wrote "{words}". How many words is that?'),
        "dev": ('How many words are there in "{words}"?', 'Count up the words in "{words}".',
                'Tell me the word count of "{words}".')},
        _word_list(1, 4, lambda w, f: str(len(w)))),
    Family("compare", {
        "train": ("Which is {rel}, {a} or {b}?", "Which number is {rel}: {a} or {b}?", "{a} or {b}: which is {rel}?",
                  "Of {a} and {b}, which is {rel}?", "Tell me the {rel} number: {a}, {b}.",
                  "Pick the {rel} of {a} and {b}.", "Compare {a} and {b}. Which is {rel}?",
                  "What is the {rel} number, {a} or {b}?"),
        "val": ("Between {a} and {b}, which one is {rel}?", "Which of {a} and {b} is {rel}?",
                "Name the {rel} of these two numbers: {a}, {b}."),
        "post": ("Which one is {rel}: {a} or {b}?", "Say the {rel} number of {a} and {b}.",
                 "I have {a} and {b}. Which is {rel}?", "Choose the {rel}: {a} or {b}.",
                 "Out of {a} and {b}, which is {rel}?", "Which is the {rel} one, {a} or {b}?",
                 "Give the {rel} of {a} and {b}.", "{a} and {b}: name the {rel}."),
        "dev": ("Tell me which is {rel}: {a} or {b}.", "Which is {rel} of the two, {a} or {b}?",
                "Look at {a} and {b}. Which one is {rel}?")},
        _compare),
    Family("lookup", {
        "train": ('In the list "{table}", what is {key}?', "Given {table}. What is {key}?",
                  "{table}. What number goes with {key}?", "Here is a list: {table}. What is the value of {key}?",
                  'Look up {key} in "{table}".', "What is {key} in this list: {table}?",
                  'From "{table}", tell me {key}.', "Find the value of {key} in: {table}"),
        "val": ('Using the list "{table}", what is {key}?', "In {table}, what number is {key}?",
                'Check "{table}". What is {key}?'),
        "post": ("Table: {table}. What is {key}?", 'What value does {key} have in "{table}"?',
                 'Read "{table}" and tell me {key}.', "Given the list {table}, what number is {key}?",
                 "Here: {table}. Which number is {key}?", 'In the table "{table}", what is {key}?',
                 "Tell me {key} from this list: {table}.", "The list is {table}. What number is {key}?"),
        "dev": ('In "{table}", what number does {key} have?', "Here are the values: {table}. What is {key}?",
                'What does {key} equal in "{table}"?')},
        _lookup),
    Family("recall", {
        "train": ('Remember the word "{words}".|What was the word?', 'Please remember this: "{words}".|Tell me the word.',
                  'My favorite word is "{words}".|What is my favorite word?',
                  'Keep this word in mind: "{words}".|Which word was it?', 'The secret word is "{words}".|What is the secret word?',
                  'Remember "{words}" for me.|What did I ask you to remember?',
                  'Here is a word: "{words}".|What word did I give you?', 'Note the word "{words}".|Say the word I gave you.'),
        "val": ("Don't forget the word \"{words}\".|Can you say the word again?",
                'Here is a word to remember: "{words}".|What word did I tell you to remember?',
                'I pick the word "{words}".|Which word did I pick?'),
        "post": ('Memorize the word "{words}".|What word did I ask you to memorize?',
                 'Hold on to "{words}".|Which word did I give you?', 'Your word is "{words}".|What is your word?',
                 'Remember this word: "{words}".|What was it?',
                 'Please keep "{words}" in mind.|Which word did I ask you to keep in mind?',
                 'Today\'s word is "{words}".|What is today\'s word?',
                 'Store the word "{words}".|What word did you store?', 'I choose "{words}".|What did I choose?'),
        "dev": ('The word to remember is "{words}".|What was the word to remember?',
                'Keep "{words}" in memory.|What word is in your memory?', 'I will say a word: "{words}".|What word did I say?')},
        _word("recall", lambda rng, w: rng.choice(ACKS)), turns=2),
    Family("followup", {
        "train": ('Say "{words}".|Say it again.', 'Repeat after me: "{words}"|Once more, please.',
                  'Echo: "{words}"|Repeat your answer.', 'Copy this exactly: "{words}"|What did you just say?',
                  'Please say "{words}".|Again?', 'Write this: "{words}"|Say that one more time.',
                  'Repeat the word "{words}".|And again.', 'Say the word "{words}".|What was your answer?'),
        "val": ('Could you echo "{words}"?|Can you repeat that?', 'Please copy this word: "{words}"|One more time?',
                'Type the word "{words}".|What did you answer?'),
        "post": ('Say "{words}", please.|Say it once more.', 'Echo the word "{words}".|Repeat it.',
                 'Write "{words}".|What did you write?', 'Please repeat "{words}".|Again, please.',
                 'Repeat "{words}".|Repeat it again.', 'Just type "{words}".|Type it once more.',
                 'Please echo "{words}".|Echo it again.', 'Say the word "{words}", please.|What did you say?'),
        "dev": ('Say the word "{words}" now.|Say it one more time.', 'Can you type "{words}"?|Type it again.',
                'Repeat this: "{words}"|What was your reply?')},
        _word("followup", lambda rng, w: w), turns=2),
]}


# ---- the post split asks in many phrasings ----------------------------------------------------
# Its hand-written phrasings, plus cores under prefixes: 30-67 per family instead of 8. A phrasing
# whose turn is within a few words of any other split's turn (edit distance over words) is left out,
# so "post" stays unseen by SFT and by both evaluations. The old split had 9 turns within a word of
# held-out ones, and GRPO's held-out gain leaned on them (+4.7 then, +3.0 without: docs/LOG.md,
# 2026-11-30).
POST_PREFIXES = ("", "Please ", "Quick question: ", "Hey, ", "Now ", "One more: ")
POST_CORES = {
    "copy": ('Repeat "{words}".', 'Say "{words}" back.', 'Write "{words}" again.', 'Echo the word "{words}".',
             'Give me "{words}" once.', 'Reply with just "{words}".', 'Type the word "{words}" for me.', 'Copy "{words}".',
             'Return the word "{words}".', 'Send back "{words}".', 'Word to repeat: "{words}"',
             'Output "{words}" and nothing else.'),
    "first_last": ('Which word is {pos} in "{words}"?', 'Name the {pos} one of "{words}".',
                   'Give the {pos} word of "{words}".', '"{words}": which word comes {pos}?',
                   'Tell me the {pos} word from "{words}".', 'What word is {pos} here: "{words}"?',
                   'Say the word that is {pos} in "{words}".', 'From the words "{words}", pick the {pos}.',
                   'Looking at "{words}", what is the {pos} word?', 'Return the word in {pos} place in "{words}".'),
    "count": ('How many words in "{words}"?', 'Count the words of "{words}".', '"{words}": how many words?',
              'Tell me how many words "{words}" has.', 'Give the word count for "{words}".',
              'How many words does the text "{words}" contain?', 'Number of words here: "{words}"',
              'Count how many words you see in "{words}".', 'How many separate words are in "{words}"?',
              'What is the number of words in "{words}"?'),
    "compare": ("Which is {rel}: {a} or {b}?", "Of {a} and {b}, say the {rel}.", "{a} or {b}, which one is {rel}?",
                "Tell me the {rel} of {a} and {b}.", "Pick the {rel} number from {a} and {b}.",
                "Between {a} and {b}, name the {rel}.", "Give me the {rel} one: {a}, {b}.",
                "Numbers {a} and {b}: which is {rel}?", "Say which is {rel}, {a} or {b}."),
    "lookup": ('In "{table}", what is {key}?', "List: {table}. What is {key}?", 'Given "{table}", tell me {key}.',
               "What number is {key} in {table}?", "From {table}, give the value of {key}.",
               "Values: {table}. Which number is {key}?", 'Look at "{table}" and say {key}.',
               'What does {key} map to in "{table}"?', "Find {key} in: {table}.",
               "Here is a table, {table}. What is {key}?"),
    "recall": tuple(f"{first}|{second}" for first, seconds in (
        ('Remember "{words}".', ("What word was that?", "Which word did I give?", "Tell me the word again.")),
        ('Please keep the word "{words}".', ("Which word did I ask you to keep?", "What was my word?")),
        ('My word is "{words}".', ("What is my word?", "Say my word.", "Which word is mine?")),
        ('Here is a word for later: "{words}".', ("Now, what was the word?", "What word did I give you earlier?")),
        ('Take note: "{words}".', ("What did I ask you to note?", "Which word did you note?"))) for second in seconds),
    "followup": tuple(f"{first}|{second}" for first, seconds in (
        ('Reply with "{words}".', ("Say it once more.", "Repeat that.", "Give it to me again.")),
        ('Give me the word "{words}".', ("A second time, please.", "Same again?")),
        ('Answer with the word "{words}".', ("Could you say it a second time?", "Echo it once more.")),
        ('Send me "{words}".', ("Send it again.", "Which word did you send?"))) for second in seconds),
}


def _words_of(template: str) -> list[str]:
    return re.sub(r"[^a-z{}| ]", " ", template.lower()).split()


def _word_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance over words."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def near_duplicate(turn: str, others: list[list[str]]) -> bool:
    """Within max(1, a quarter of the shorter one's words) word edits of one of `others` (word lists)."""
    w = _words_of(turn)
    return any(_word_distance(w, o) <= max(1, min(len(w), len(o)) // 4) for o in others)


def _post_templates(fam: Family, others: list[list[str]]) -> tuple[str, ...]:
    composed = [p + (c[0].lower() + c[1:] if p and c[0].isalpha() else c) for p in POST_PREFIXES
                for c in POST_CORES[fam.name]]
    return tuple(dict.fromkeys(t for t in (*fam.templates["post"], *composed)
                               if not any(near_duplicate(turn, others) for turn in t.split("|"))))


# Every user turn of every other split, whatever the family: a post turn must be none of them, nearly.
_OTHER_TURNS = [_words_of(turn) for f in FAMILIES.values() for s in SPLITS if s != "post"
                for t in f.templates[s] for turn in t.split("|")]
for _fam in FAMILIES.values():
    _fam.templates["post"] = _post_templates(_fam, _OTHER_TURNS)


def key_split(key: str) -> Split:
    """The split a value key belongs to: a fixed hash, so the same in every process and version."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h % 1000 < VAL_SHARE * 1000 else "train"


def make_row(family: str, split: Split, rng: random.Random) -> dict:
    """One conversation of `family` whose phrasing and values belong to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    fam = FAMILIES[family]
    while True:  # rejection: ~1/(1 - VAL_SHARE) draws for train and post, ~5 for val
        fields, answer, key = fam.sample(rng)
        if key_split(key) == VALUE_SPLIT[split]:
            break
    t = rng.randrange(len(fam.templates[split]))
    turns = fam.templates[split][t].format(**fields).split("|")
    messages = [{"role": "user", "content": turns[0]}]
    if fam.turns == 2:
        messages += [{"role": "assistant", "content": fields["first"]}, {"role": "user", "content": turns[1]}]
    messages.append({"role": "assistant", "content": answer})
    if rng.random() < SYSTEM_SHARE:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS[split])})
    tid = sum(len(fam.templates[s]) for s in TEMPLATE_ID_ORDER[:TEMPLATE_ID_ORDER.index(split)]) + t
    return {"messages": messages, "family": family, "answer": answer, "split": split,
            "template": f"{family}/{tid}", "key": key}


def make_rows(n: int, split: Split, seed: int = 0, families: Optional[list[str]] = None) -> list[dict]:
    """n rows, families in turn; row i depends only on (seed, split, i)."""
    names = list(families or FAMILIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown demo task families {unknown}; known: {', '.join(FAMILIES)}")
    return [make_row(names[i % len(names)], split, random.Random(f"{seed}|{split}|{i}")) for i in range(n)]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation a model is asked to continue: the row without its final answer."""
    return row["messages"][:-1]


_TRAILING = re.compile(r"[.!?]+$")


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes, no trailing . ! ?"""
    t = " ".join(text.split()).lower()
    t = _TRAILING.sub("", t).strip()
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        t = _TRAILING.sub("", t[1:-1].strip()).strip()
    return t


def check(row: dict, reply: str) -> bool:
    """Exact match of a reply against the row's answer, after `normalize`."""
    return normalize(reply) == normalize(row["answer"])


def reward(row: dict, reply: str) -> float:
    """The verifiable reward: 1.0 for an exact match, else 0.0."""
    return 1.0 if check(row, reply) else 0.0

