"""The shipped prompt set (probe/data/prompts.jsonl): how it is made, read, and split.

Prompts are generated deterministically from templates and word lists in seven kinds: prose
continuations, code, questions, chat instructions, lists, numbers and Q&A-formatted text. About half
are chat prompts ({"prompt": ..., "chat": true}: wrapped in the host's chat template), the rest raw
text. Regenerate the file with `python -m alignlens.probe.prompts > probe/data/prompts.jsonl`.

Split: prompt i is held out for evaluation when i % 10 == 9 (10%); training never sees it.
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources
from pathlib import Path

TOPICS = ["the ocean", "volcanoes", "the Roman Empire", "honeybees", "electric cars", "the moon landing",
          "coffee", "black holes", "the printing press", "rainforests", "chess", "jazz music", "glaciers",
          "the immune system", "bridges", "ancient Egypt", "solar panels", "the internet", "whales",
          "mountains", "bread baking", "the French Revolution", "photosynthesis", "trains", "origami",
          "the human brain", "deserts", "vaccines", "typewriters", "lighthouses", "democracy",
          "earthquakes", "the violin", "libraries", "the Silk Road", "penguins", "clocks", "tea",
          "rivers", "quantum computers"]
PLACES = ["small fishing village", "busy train station", "quiet library", "mountain cabin", "desert oasis",
          "space station", "crowded market", "old lighthouse", "snowy forest", "city rooftop"]
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Mumbai", "Toronto", "Sydney", "Berlin"]
NAMES = ["Maria", "Kenji", "Amara", "Lucas", "Priya", "Tom", "Elena", "Omar", "Sofia", "Ivan"]
FORMS = ["poem", "story", "paragraph", "haiku", "letter", "dialogue", "product description", "speech"]
TASKS = ["reverse a string", "check if a number is prime", "compute the factorial of n",
         "merge two sorted lists", "count the words in a sentence", "find the maximum of a list",
         "convert Celsius to Fahrenheit", "read a CSV file", "remove duplicates from a list",
         "compute the Fibonacci sequence", "sort a dictionary by value", "validate an email address"]
THINGS = ["fruits", "European capitals", "programming languages", "musical instruments", "planets",
          "board games", "kitchen tools", "colors", "sports", "birds", "rivers in Africa", "famous painters"]
CONCEPTS = ["gravity", "inflation", "recursion", "a neural network", "the water cycle", "entropy",
            "a prime number", "supply and demand", "evolution", "an algorithm", "climate", "DNA"]
PHENOMENA = ["the sky look blue", "ice float on water", "bread rise", "the moon have phases",
             "metal feel cold", "leaves change color in autumn", "the sea taste salty", "thunder follow lightning"]
HOWTOS = ["learn a new language", "start running", "write a good essay", "save money", "plant tomatoes",
          "prepare for a job interview", "improve my sleep", "make pancakes", "learn to play guitar"]

PROSE = ["The history of {topic} begins", "Once upon a time, in a {place},", "In {year}, the city of {city}",
         "{name} opened the door and saw", "Scientists studying {topic} have found that",
         "It was a cold morning in {city} when", "The most surprising thing about {topic} is",
         "Chapter 1\n\nThe {place} had been empty for years, until", "Dear {name},\n\nI am writing to tell you about",
         "A brief introduction to {topic}:"]
CODE = ["def {fn}(", "# Python function to {task}\ndef", "```python\n# {task}\n", "// JavaScript: {task}\nfunction",
        "import numpy as np\n\n# {task}\n", "SELECT name, {col} FROM {table} WHERE", "#include <stdio.h>\n\nint main() {{\n",
        "class {cls}:\n    def __init__(self", "for i in range({n}):\n", "<html>\n<head>\n<title>{topic}</title>"]
QUESTIONS = ["What is {concept}?", "Why does {phenomenon}?", "How do I {howto}?", "Who invented {topic}?",
             "Can you explain {concept} to a child?", "What are the pros and cons of {topic}?",
             "Is it true that {topic} changed the world?", "What is the difference between {concept} and {concept2}?"]
INSTRUCTIONS = ["Write a short {form} about {topic}.", "Summarize the history of {topic} in three sentences.",
                "Give me three tips to {howto}.", "Translate into French: '{name} is going to {city} tomorrow.'",
                "Write a Python function to {task}.", "Explain {concept} in one paragraph.",
                "Describe a day in the life of {name} in a {place}.", "Write a {form} for a {place}.",
                "Rewrite this sentence more formally: we gotta go to {city} now.",
                "Make a list of {n} {things}."]
LISTS = ["Here is a list of {n} {things}:\n1.", "Top {n} facts about {topic}:\n\n1.",
         "Shopping list:\n- eggs\n- milk\n-", "{things}, sorted alphabetically:\n", "Steps to {howto}:\n1."]
NUMBERS = ["What is {a} + {b}?", "Count from {n} to {m}:", "The first ten prime numbers are",
           "{a} times {b} equals", "Convert {a} kilometers to miles.", "The year {year} was",
           "Table of squares:\n1 1\n2 4\n3 9\n", "Compute {a} - {b} and explain the steps.",
           "Phone: 555-{a}\nZip: {b}\nDate: 20", "What is {pct}% of {a}?"]
QA = ["Q: What is {concept}?\nA:", "Question: Why does {phenomenon}?\nAnswer:",
      "User: How do I {howto}?\nAssistant:", "Interviewer: Tell me about {topic}.\n{name}:"]

KINDS = [("prose", PROSE, False), ("code", CODE, False), ("question", QUESTIONS, True),
         ("instruction", INSTRUCTIONS, True), ("list", LISTS, None), ("number", NUMBERS, None), ("qa", QA, False)]


def _fill(template: str, rng: random.Random) -> str:
    c1, c2 = rng.sample(CONCEPTS, 2)
    return template.format(
        topic=rng.choice(TOPICS), place=rng.choice(PLACES), city=rng.choice(CITIES), name=rng.choice(NAMES),
        year=rng.randint(1700, 2030), form=rng.choice(FORMS), task=rng.choice(TASKS),
        things=rng.choice(THINGS), concept=c1, concept2=c2, phenomenon=rng.choice(PHENOMENA),
        howto=rng.choice(HOWTOS), n=rng.randint(3, 12), m=rng.randint(15, 40), a=rng.randint(2, 999),
        b=rng.randint(2, 999), pct=rng.choice([5, 10, 15, 20, 25, 50, 75]),
        fn=rng.choice(["add", "parse_date", "mean", "is_palindrome", "flatten", "tokenize", "load_config"]),
        col=rng.choice(["age", "price", "email", "created_at"]), table=rng.choice(["users", "orders", "items"]),
        cls=rng.choice(["Stack", "BankAccount", "Matrix", "Logger", "Graph"]))


def generate(n_per_kind: int = 100, seed: int = 0) -> list[dict]:
    """Deterministic prompt list: n_per_kind of each kind, interleaved. Duplicates are dropped."""
    rng = random.Random(seed)
    by_kind = []
    for kind, templates, chat in KINDS:
        rows, seen = [], set()
        tries = 0
        while len(rows) < n_per_kind and tries < 50 * n_per_kind:
            tries += 1
            text = _fill(rng.choice(templates), rng)
            is_chat = rng.random() < 0.5 if chat is None else chat
            if (text, is_chat) in seen:
                continue
            seen.add((text, is_chat))
            row = {"prompt": text, "kind": kind}
            if is_chat:
                row["chat"] = True
            rows.append(row)
        by_kind.append(rows)
    return [row for group in zip(*by_kind) for row in group]


def default_prompt_path() -> Path:
    return Path(str(resources.files(__package__) / "data" / "prompts.jsonl"))


def heldout_prompt_path() -> Path:
    """probe/data/heldout_prompts.jsonl: 80 prompts the evaluation uses and training never sees, of
    kinds absent from the training set (config files, tables, shell, arithmetic, dialogue, other
    languages, verse, email, legal text, ...) and 40 openings of natural text not written from
    templates (public-domain literature and hand-written everyday prose). Hand-written, not
    generated; the `kind` field names each one."""
    return Path(str(resources.files(__package__) / "data" / "heldout_prompts.jsonl"))


def read_prompts(path: str | Path | None = None) -> list[dict]:
    """Rows {"prompt": str, "chat": bool, ...} from a JSONL file (default: the shipped set)."""
    rows = []
    with open(path or default_prompt_path()) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: every line needs a string field 'prompt'")
            row["chat"] = bool(row.get("chat", False))
            rows.append(row)
    return rows


def split(rows: list[dict], held_out: bool) -> list[dict]:
    """Training rows (held_out=False) or the evaluation rows (every 10th, i % 10 == 9)."""
    return [r for i, r in enumerate(rows) if (i % 10 == 9) == held_out]


def encode_prompt(tokenizer, prompt: str | list, chat: bool = False) -> list[int]:
    """Token ids of one prompt, the one encoder used everywhere (probe collection, `alignlens trace`,
    the server's validation).

    A list of ints passes through; a list of {"role", "content"} turns, or a string with `chat`,
    goes through the host's chat template (a string becomes one user turn) with the generation
    prompt added; any other string (and a chat string for a host without a chat template) is raw
    text with the tokenizer's special tokens.
    """
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if chat and isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        chat = False  # a pretrained host without a chat template (Gemma 3 270M): the row as raw text
    if chat or isinstance(prompt, list):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_row(tokenizer, row: dict) -> list[int]:
    """Token ids of one prompt-set row ({"prompt", "chat"}; chat rows through the chat template)."""
    return encode_prompt(tokenizer, row["prompt"], chat=bool(row.get("chat")))


if __name__ == "__main__":
    for row in generate():
        sys.stdout.write(json.dumps(row) + "\n")
