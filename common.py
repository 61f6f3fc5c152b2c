"""Shared pieces of the STaR scripts, in the order a record meets them: errors and files, data, prompts, answers.
Models and processes are in models.py; generation in engines.py (the engines and their stop rule) and generation.py
(the job create_data.py and evaluate.py share); training's pieces beside train.py (objectives.py, memory.py,
checkpoints.py, attention.py).

STaR: Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning", https://arxiv.org/abs/2203.14465
"""
import contextlib
import json
import os
import random
import re
import shutil
import socket
import sys
import traceback
import urllib.parse
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

# ============================================================================= errors, files and data
DATASETS = ("gsm8k", "arithmetic")
SPLITS = ("train", "dev", "test")  # dev: the last --dev_samples train questions, held out for model selection
DEV_SAMPLES = 200  # default dev slice: choices are made on it, the test split is only reported
ARITH_COLUMNS = ["Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands"]
ARITH_SIZES = {"train": 2000, "test": 500}  # per split; operands of 1 to 5 digits, as in the STaR paper
CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations, e.g. <<48/2=24>>
# Flags that change no generated token and no trained weight: a rerun may change them and still resume.
NOT_RESUME_SETTINGS = ("output", "output_dir", "overwrite", "debug", "save_results", "check_steps",
                       "max_per_question", "accumulate", "logging_steps", "save_steps", "save_minutes",
                       "gradient_checkpointing", "report_to", "save_adapter", "max_pairs_per_question")


class StarError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


@contextlib.contextmanager
def cli_errors(debug=False):
    """Turn StarError into one stderr line and exit 2 (--debug or STAR_DEBUG=1 adds the traceback)."""
    debug = debug or os.environ.get("STAR_DEBUG") == "1"
    try:
        yield
    except StarError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_positive(values, *names):
    """values: a dict of flag values (vars(args)); each named one must be > 0 when given."""
    for name in names:
        if values[name] is not None and values[name] <= 0:
            raise StarError(f"--{name} must be > 0, got {values[name]}")


def check_output(path, overwrite):
    """Refuse, before any work, an output that exists (unless --overwrite) or that cannot be written."""
    if os.path.exists(path) and not overwrite:
        raise StarError(f"{path} exists; pass --overwrite to replace it")
    probe = f"{path}.probe{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise StarError(f"cannot write {path}: {e.strerror or e}") from None


def run_info(values):
    """What every output records about how it was made: the flags (a dict) and the command line."""
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    return {"args": dict(values), "command": command, "processes": int(os.environ.get("WORLD_SIZE", 1))}


def resume_settings(values, **extra):
    """The flags (a dict) that must match for an interrupted run to be continued."""
    return {**{k: v for k, v in sorted(values.items()) if k not in NOT_RESUME_SETTINGS}, **extra}


def move_into_place(tmp, path):
    """Rename a finished file or folder over `path`: a reader never sees half an output, and until
    the rename the old output stays whole. A folder cannot be renamed over a full one: move it aside."""
    if os.path.isdir(path):
        os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_text(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    move_into_place(path + ".tmp", path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, records):
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path, required=()):
    """Records of a JSONL file; a bad line is a StarError naming the file and line number."""
    if not os.path.isfile(path):
        raise StarError(f"{path}: no such file")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise StarError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in required if not isinstance(r, dict) or k not in r]
            if missing:
                raise StarError(f"{path}:{n}: record has no {', '.join(missing)}")
            records.append(r)
    return records


def gsm8k_dir(data_dir=None):
    return data_dir or os.environ.get("GSM8K_DIR")


def hub_reachable(seconds=3):
    """Can the hub be reached? Asked before a download so that an offline machine gets one error line in
    seconds instead of minutes of retries. Behind a proxy the answer is left to the download itself."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=seconds).close()
        return True
    except OSError:
        return False


def load_gsm8k(split, data_dir=None):
    """GSM8K rows {question, answer} from a local folder (openai/grade-school-math format) or the hub."""
    folder = gsm8k_dir(data_dir)
    if folder:
        path = os.path.join(folder, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise StarError(f"{folder} has no {split}.jsonl (expected train.jsonl and test.jsonl)")
        return read_jsonl(path, required=("question", "answer"))
    if not hub_reachable():
        raise StarError("cannot load openai/gsm8k: the hub cannot be reached; point --data_dir or GSM8K_DIR at a "
                        "folder holding train.jsonl and test.jsonl")
    try:
        import datasets

        return list(datasets.load_dataset("openai/gsm8k", "main", split=split))
    except Exception as e:  # offline, hub down, no such dataset...
        raise StarError(
            f"cannot load openai/gsm8k from the hub ({type(e).__name__}); point --data_dir "
            "or GSM8K_DIR at a folder holding train.jsonl and test.jsonl"
        ) from None


def solution_to_rationale(solution):
    """Human GSM8K solution -> rationale: calculator annotations removed, '#### N' -> answer sentence."""
    body, _, final = CALC_RE.sub("", solution).rpartition("####")
    return body.strip() + "\n" + ANSWER_SENTENCE.format(answer=final.strip())


def arithmetic_example(a, b):
    """A sum with its column-by-column scratchpad, in GSM8K's record format."""
    lines, carry = [], None
    da, db = str(a)[::-1], str(b)[::-1]
    for col in range(max(len(da), len(db))):
        x = int(da[col]) if col < len(da) else 0
        y = int(db[col]) if col < len(db) else 0
        s = x + y + (carry or 0)
        terms = f"{x} + {y}" if carry is None else f"{x} + {y} + {carry}"
        carry = s // 10
        lines.append(f"{ARITH_COLUMNS[col]}: {terms} = {s}, write {s % 10}, carry {carry}.")
    lines.append(f"So {a} + {b} = {a + b}.")
    return {"question": f"What is {a} + {b}?", "answer": "\n".join(lines) + f"\n#### {a + b}"}


def make_arithmetic(split):
    """Deterministic n-digit addition (n = 1..5, both operands n digits); test pairs never in train."""
    def pairs(seed, count, exclude):
        rng, out, seen = random.Random(seed), [], set(exclude)
        while len(out) < count:
            n = rng.randint(1, 5)
            lo = 0 if n == 1 else 10 ** (n - 1)
            pair = (rng.randint(lo, 10**n - 1), rng.randint(lo, 10**n - 1))
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
        return out

    test = pairs(1, ARITH_SIZES["test"], ())
    chosen = test if split == "test" else pairs(0, ARITH_SIZES["train"], test)
    return [arithmetic_example(a, b) for a, b in chosen]


def load_split(dataset, split, data_dir=None, max_samples=None, dev_samples=0):
    """Rows {id, question, answer (final number), solution} of one split; id = index in the file.
    With dev_samples = D, "dev" is the train file's last D questions and "train" the rest, so no choice
    made on dev ever trains on or is shown a dev question."""
    if dataset not in DATASETS:
        raise StarError(f"unknown --dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if split not in SPLITS:
        raise StarError(f"unknown --split {split!r} (choose from {', '.join(SPLITS)})")
    source = "test" if split == "test" else "train"
    raw = load_gsm8k(source, data_dir) if dataset == "gsm8k" else make_arithmetic(source)
    if not raw:
        raise StarError(f"the {dataset} {source} split holds no questions")
    if split != "test" and not 0 <= dev_samples < len(raw):
        raise StarError(f"--dev_samples {dev_samples} leaves no train question in the {len(raw)} of the {dataset} "
                        f"train split (it must be in [0, {len(raw)}); --dev_samples 0 holds none out)")
    first, last = {"train": (0, len(raw) - dev_samples), "dev": (len(raw) - dev_samples, len(raw)),
                   "test": (0, len(raw))}[split]
    if max_samples:
        last = min(last, first + max_samples)
    rows = []
    for i in range(first, last):
        final = raw[i]["answer"].rpartition("####")[2]
        if normalize_number(final) is None:
            raise StarError(f"{dataset} {source} record {i}: gold answer {final.strip()!r} is not a number")
        rows.append({"id": i, "question": raw[i]["question"], "answer": normalize_number(final),
                     "solution": raw[i]["answer"]})
    if not rows:
        raise StarError(f"the {dataset} {split} split holds no questions" + (" (--dev_samples is 0)" if split == "dev" else ""))
    return rows


def pick_exemplars(train_rows, k, seed):
    """K train rows fixed by the seed (few-shot exemplars); never drawn from the test split."""
    if k > len(train_rows):
        raise StarError(f"--k {k} is larger than the {len(train_rows)} exemplars available")
    rng = random.Random(seed)
    return [train_rows[i] for i in sorted(rng.sample(range(len(train_rows)), k))]


# ============================================================================= prompts
# One question/answer pair per turn (chat models) or per paragraph (base models).
# Every chat user turn (exemplars, Stage 2's hinted question, the zero-shot prompt train.py trains on and
# evaluate.py asks) carries Meta's GSM8K answer-format instruction, worded as lm-evaluation-harness's
# gsm8k_cot_llama task words it. Without it Llama-3.2-3B-Instruct ends "So, Ali now has $71." and the stated-answer
# rule misses most of its right answers (the measurement: docs/results.md, "The answer-format instruction").
INSTRUCTION = ("Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
               "Your response should end with \"The final answer is [answer]\" where [answer] is the response to the problem.")
QUESTION_TEMPLATE = "Question: {question}"  # base models (no chat template): plain "Question: ...\nAnswer: ..."
HINT_TEMPLATE = "{question} (Hint: the answer is {answer}.)"  # Stage 2 only, never saved
# The sentence the instruction asks for, ending as Meta's exemplars end it: no period after the number (the end of
# the turn, or of the line, ends it). Human rationales and the arithmetic scratchpads end with it.
ANSWER_SENTENCE = "The final answer is {answer}"
PLAIN_ANSWER_PREFIX = "\nAnswer:"  # base models: "Question: ...\nAnswer: <rationale>\n\n"
STOP_STRINGS = ("Question:",)  # the model starting a new question means its answer is over
PLAIN_STOP_STRINGS = ("Question:", "\n\n")  # rationales never hold a blank line
FIXED_DATE = "26 Jul 2024"  # Llama 3 chat templates print today's date unless given one: keep runs reproducible


class Prompt(NamedTuple):
    prefix: str    # the K exemplars: the same for every question, so generation computes it once
    question: str  # this question's part; prefix + question is the whole prompt


def is_chat(tok):
    return bool(getattr(tok, "chat_template", None))


def chat_text(tok, messages, generation_prompt):
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=FIXED_DATE
    )


def ask(question, hint=None, instruction=INSTRUCTION):
    """The user's turn: the question (with the Stage-2 hint, the gold final number, when given) put into the
    instruction; instruction=QUESTION_TEMPLATE gives base models' plain form."""
    if hint is not None:
        question = HINT_TEMPLATE.format(question=question, answer=hint)
    return instruction.replace("{question}", question)  # not format(): another template may hold braces


def exemplar_rationale(exemplar):
    """A train row's human solution as a rationale, or a ready rationale (lm-evaluation-harness's exemplars)."""
    return exemplar["rationale"] if "rationale" in exemplar else solution_to_rationale(exemplar["solution"])


def build_prompt(tok, question, exemplars=(), hint=None, instruction=INSTRUCTION):
    """Prompt(prefix, question part) of a K-shot prompt; with exemplars=() the zero-shot prompt.

    Chat models: one user turn per question, each in `instruction`; base models: "Question: ..." paragraphs.
    A hint (Stage 2) goes into the question and into every exemplar; it is never part of a saved record.
    """
    hinted, chat = hint is not None, is_chat(tok)
    form = instruction if chat else QUESTION_TEMPLATE
    shots = [(ask(e["question"], e["answer"] if hinted else None, form), exemplar_rationale(e)) for e in exemplars]
    query = ask(question, hint, form)
    if chat:
        msgs = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        full = chat_text(tok, msgs + [{"role": "user", "content": query}], True)
        prefix = chat_text(tok, msgs, False) if msgs else ""
        assert full.startswith(prefix), "chat template does not extend a conversation by appending"
        return Prompt(prefix, full[len(prefix):])
    bos = tok.bos_token if tok.bos_token and tok("a").input_ids[:1] == [tok.bos_token_id] else ""
    # The blank line between examples starts the question part, not ends the prefix: tokenized apart,
    # "...\n\n" + "Question" would not give the tokens of the whole prompt.
    prefix = bos + "\n\n".join(f"{q}{PLAIN_ANSWER_PREFIX} {a}" for q, a in shots)
    return Prompt(prefix, ("\n\n" if shots else "") + query + PLAIN_ANSWER_PREFIX)


def build_prompts(tok, questions, exemplars=(), hints=None, instruction=INSTRUCTION):
    """(shared prefix, [question part of each question]): what generate() takes."""
    hints = hints or [None] * len(questions)
    prompts = [build_prompt(tok, q, exemplars, h, instruction) for q, h in zip(questions, hints)]
    return (prompts[0].prefix if prompts else ""), [p.question for p in prompts]


def build_completion(tok, rationale, end=True):
    """The target text after the zero-shot prompt: the rationale and (end) the end-of-turn token."""
    lead = "" if is_chat(tok) else " "
    return lead + rationale + ((tok.eos_token or "") if end else "")


# ============================================================================= answers
# The numbers this project reads, in one place. NUMBER: a number as a rationale writes it, what the step checker
# (steps.py) computes with. Currency, a mixed number (1 1/2, 2 and 1/3), a fraction written a/b (one operand, so
# `25 / 1/3` divides by a third), thousands with commas or spaces (1,200.50 / 3 000), decimals; then an optional %.
# ASCII digits only: other scripts' digits are not arithmetic we check.
NUMBER = (r"(?:(?:[$€£¢]|\\\$)\s?)?(?:[0-9]+ (?:and )?[0-9]{1,2}/[0-9]+(?![0-9/])"
          r"|[0-9]+/[0-9]+(?![0-9%]|/[0-9]|\.[0-9]|\s%)"
          r"|[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?(?![0-9])|[0-9]{1,3}(?: [0-9]{3})+(?![-0-9]|\.[0-9])"
          r"|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:\s?\\?%)?")
# ANSWER_NUMBER: a stated answer's number, the narrower form normalize_number turns into a Decimal (a sign, $,
# digits with commas, decimals): a GSM8K answer is an integer, never a fraction or a percent.
ANSWER_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
# A stated answer, in the forms models write: "The final answer is 18" (what INSTRUCTION asks), "The answer is 18.",
# "The final answer is: 18", "The final answer is $\boxed{18}$" (Llama-Instruct), "**The final answer is 18**",
# a bare "\boxed{18}", "#### 18". Not "So she has 18." nor a JSON {"answer": 18}: those count as unstated.
# Each optional sign owns the spaces after it (`\s*(?:\$\s*)?`, never `\s*\$?\s*`): two runs of spaces in a row
# with nothing between could split the spaces in every way, and a long run of them took polynomial time.
BOXED = r"(?:\\boxed\{\s*)?(?:\$\s*)?(" + ANSWER_NUMBER.replace(r"\$?", "") + r")(?:\s*\})?\$?\**"
ANSWER_RE = re.compile(r"[Tt]he (?:final )?answer is:?\s*(?:\*+\s*)?(?:\$\s*)?" + BOXED)
BOXED_RE = re.compile(r"\\boxed\{\s*(?:\$\s*)?(" + ANSWER_NUMBER.replace(r"\$?", "") + r")\s*\}")
HASH_RE = re.compile(r"####\s*(" + ANSWER_NUMBER + r")")
# The one answer rule: the stated answer is the text's LAST statement in any of these forms, as lm-evaluation-harness's
# strict-match reads (group_select -1). Strict scoring reads it (extract_stated_answer) and create_data.py keeps the
# rationale up to its end (cut_after_answer), so a kept rationale ends with what strict reads. A completion seldom
# holds two: generation stops at the end of the turn or after the first complete answer sentence (ANSWER_END_RE).
STATED_RE = re.compile("|".join(p.pattern for p in (ANSWER_RE, BOXED_RE, HASH_RE)))
NUMBER_RE = re.compile(ANSWER_NUMBER)
# An answer sentence is complete once a period + space or a line break follows the number: "18." alone may still
# become "18.5". (The end of the turn also ends one: the stop tokens do that.)
ANSWER_END_RE = re.compile(r"answer is:?\s*(?:\*+\s*)?(?:\$\s*)?" + BOXED + r"\s*(?:\.\s|\n)")
HINT_WORDS_RE = re.compile(r"\bhint|\bgiven answer|answer (?:is )?given|we are told the answer", re.I)


def normalize_number(text):
    """'$1,000.50' -> '1000.50'; None when the text is not a number."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        Decimal(s)
    except InvalidOperation:
        return None
    return s


def last_statement(text):
    """The last STATED_RE match in the text (the one answer rule above), or None."""
    m = None
    for m in STATED_RE.finditer(text):
        pass
    return m


def extract_stated_answer(text):
    """The number of the text's last stated answer, or None when it states none. Keeping (create_data.py) and
    strict scoring (evaluate.py) both use this rule."""
    m = last_statement(text)
    return normalize_number(next(g for g in m.groups() if g is not None)) if m else None


def extract_last_number(text):
    numbers = NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(pred, gold):
    """Number-aware equality: 18 = 18.0 = $18, 1,000 = 1000."""
    p, g = normalize_number(pred), normalize_number(gold)
    if p is None or g is None:
        return False
    return Decimal(p) == Decimal(g)


def cut_after_answer(text):
    """The rationale up to and including its last stated answer (drops anything after it): a kept rationale ends
    with the answer extract_stated_answer reads."""
    m = last_statement(text)
    if not m:
        return text.strip()
    end = m.end()
    if end < len(text) and text[end] == ".":
        end += 1
    return text[:end].strip()


def rationalization_problem(rationale, answer):
    """Why a Stage-2 rationale must be rejected, or None. It must reason, not lean on the hint."""
    m = last_statement(rationale)
    reasoning = rationale[: m.start()] if m else rationale
    if not NUMBER_RE.search(reasoning):
        return "no_reasoning"
    if HINT_WORDS_RE.search(rationale):
        return "mentions_hint"
    if not any(answers_match(n, answer) for n in NUMBER_RE.findall(reasoning)):
        return "answer_not_derived"
    return None
