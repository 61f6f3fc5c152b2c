"""Step checking: is every written step of a rationale true? (faithfulness, beyond a right final answer)

A rationale can reach the right number through wrong steps; STaR would then train on them. This counts
the `=` links of the arithmetic a rationale writes, and for the arithmetic scratchpad each column line.

    python -c "from steps import check_steps; print(check_steps('3 * 4 = 12, 12 + 6 = 19'))"   # (1, 2)

The text is read as tokens in one pass (no regex that backtracks over an expression, no recursion), so a
model's degenerate output (a 1,000-term sum, deep brackets, a 5,000-digit number) is checked in linear time.
"""
import re
from fractions import Fraction

from common import ARITH_COLUMNS, NUMBER

# One token at a time, each alternative anchored on its first character, so the scan is linear. Currency
# signs, braces and LaTeX spacing are skipped; `\frac{1}{3}` is a number; `**` is bold unless between numbers.
TOKEN_RE = re.compile(
    rf"(?P<num>{NUMBER})|(?P<frac>\\[dt]?frac\{{\s*([0-9]{{1,30}})\s*\}}\{{\s*([0-9]{{1,30}})\s*\}})"
    r"|(?P<word>[A-Za-z]+(?:['’][A-Za-z]+)*)|(?P<op>\*\*|[-+*/×÷−–·⋅^√]|\\times|\\cdot|\\div|\\ast)"
    r"|(?P<eq>=)|(?P<lp>\(|\\left\()|(?P<rp>\)|\\right\))|(?P<nl>\n)"
    r"|(?P<skip>[ \t\r{}]+|[$€£¢]|\\[$,!;: ]|\\[()\[\]]|\\(?:text|mathrm|mbox)\{|\\quad)|(?P<other>.)")
OPERATORS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "·": "*", "⋅": "*", "\\times": "*",
             "\\cdot": "*", "\\ast": "*", "x": "*", "X": "*", "of": "*", "/": "/", "÷": "/", "\\div": "/"}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3}
# Words that start a new clause: after a number they end its unit (`3 + 4 eggs so eggs left = 16 - 7`).
STOP_WORDS = {"and", "or", "so", "then", "thus", "therefore", "hence", "is", "are", "was", "were", "will", "would",
              "which", "that", "who", "the", "a", "an", "he", "she", "it", "they", "we", "i", "you", "if", "but",
              "because", "since", "when", "while", "where", "now"}
SIGNS_RE = re.compile(r"^(?:[$€£¢]|\\\$)\s?|\s?\\?%$")  # a number's currency and percent signs
UNIT_WORDS = 3  # `4 miles per hour` is a number with its unit; a longer run of words is prose
MAX_DIGITS = 30  # a longer number is not arithmetic we check: Fraction work would grow with its square
MAX_BITS = 400  # an intermediate value past this is a degenerate product, not a rationale's step
COLUMN_RE = re.compile(
    r"^[ \t]*(" + "|".join(ARITH_COLUMNS) + r"):\s*(\d+)\s*\+\s*(\d+)(?:\s*\+\s*(\d+))?\s*=\s*(\d+),"
    r"\s*write\s+(\d+),\s*carry\s+(\d+)\.?[ \t]*$", re.I | re.M)
QUESTION_SUM_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
# Forms instruct models write that the chain reader would miss, rewritten before it reads (rewrite_forms):
# a label repeated down the lines (`Time = 150 miles / 75 mph` then `Time = 2 hours`: one chain), a product written
# as `2(1.5)`, and a part in words (`Half of 10 is 5`: 10 / 2 = 5; `twice 10 is 20`: 2 * 10 = 20).
LABEL_LINE_RE = re.compile(r"[ \t]*(?:[-*•][ \t]+)?([A-Za-z][A-Za-z '’]{0,40})=([^=\n]*)")  # fullmatch, one line
IMPLICIT_TIMES_RE = re.compile(r"(?<=[0-9)])\((?=[ \t]*[$0-9])")
PARTS = {"half": "/ 2", "a half": "/ 2", "one half": "/ 2", "a third": "/ 3", "one third": "/ 3", "a quarter": "/ 4",
         "one quarter": "/ 4", "a fourth": "/ 4", "one fourth": "/ 4", "a fifth": "/ 5", "one fifth": "/ 5"}
TIMES = {"twice": "2 *", "double": "2 *", "triple": "3 *"}
PART_RE = re.compile(rf"\b({'|'.join(PARTS)}) of ({NUMBER}) (?:is|equals) (?=\$?[0-9])", re.I)
TIMES_RE = re.compile(rf"\b({'|'.join(TIMES)}) (?:of )?({NUMBER}) (?:is|equals) (?=\$?[0-9])", re.I)
SO_RE = re.compile(r"^[ \t]*So\s+(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\.?[ \t]*$", re.M)


def number_items(text):
    """A number token as evaluator items: ("num", value, percent, decimals), a fraction as (a / b). The value is an
    int or a Fraction (exact), None when the number is too long to be arithmetic we check."""
    if text.isdigit() and len(text) <= MAX_DIGITS:
        return [("num", int(text), False, 0)]  # the common case, quickly
    if text.startswith("\\"):  # \\frac{a}{b}
        text = "/".join(re.findall(r"[0-9]+", text))
    core = SIGNS_RE.sub("", text)
    if len(core) > MAX_DIGITS and sum(c.isdigit() for c in core) > MAX_DIGITS:
        return [("num", None, False, None)]
    if "/" in core:  # a fraction, or a mixed number `1 1/2` / `2 and 1/3`: the whole plus the fraction
        *whole, fraction = core.replace("and ", "").split(" ")
        a, b = fraction.split("/")
        plus = [("num", int(whole[0]), False, None), ("op", "+")] if whole else []
        return [("lp",), *plus, ("num", int(a), False, None), ("op", "/"), ("num", int(b), False, None), ("rp",)]
    whole, _, decimals = core.replace(",", "").replace(" ", "").partition(".")
    value = Fraction(int((whole or "0") + decimals), 10 ** len(decimals)) if decimals else int(whole)
    return [("num", value, text.endswith("%"), len(decimals))]  # the decimals written: how far it may be rounded


def read_tokens(text):
    """(kind, text, start, end) of each token of the lines that can hold a step: those with an `=`, and those
    that a line starting with `=` continues. Any other line is one break token: prose is never tokenized."""
    lines = text.split("\n")
    continued, tokens = [False] * len(lines), []
    for i in range(len(lines) - 2, -1, -1):  # does the next non-blank line start with `=`?
        nxt = lines[i + 1].lstrip(" \t*")
        continued[i] = nxt.startswith("=") or (not nxt and continued[i + 1])
    for line, cont in zip(lines, continued):
        if "=" in line or cont:
            tokens += [(m.lastgroup, m.group(), m.start(), m.end()) for m in TOKEN_RE.finditer(line)
                       if m.lastgroup != "skip"]
        else:
            tokens.append(("other", "", 0, 0))
        tokens.append(("nl", "=" if cont else "\n", len(line), len(line) + 1))  # "=": the next line continues
    return tokens


def resolve(tokens, i):
    """The role of token i in its context: `x` and `of` between operands multiply, a letter glued to a number
    is an unknown (`50x`), `/` or `-` glued between a number and a word is part of a unit (`$35/hour`, `60-mile`),
    `**` is bold unless between numbers, `^` is a power (not checked)."""
    kind, text, start, end = tokens[i]
    prev = tokens[i - 1] if i else ("nl", "", 0, 0)
    nxt = tokens[i + 1] if i + 1 < len(tokens) else ("nl", "", 0, 0)
    operand_next = nxt[0] in ("num", "frac", "lp")
    if kind == "word":
        if text in ("x", "X") and prev[0] in ("num", "rp", "word") and operand_next:
            return "op", "*"
        if text == "of" and (prev[0] == "frac" or prev[0] == "num" and ("/" in prev[1] or "%" in prev[1])):
            return ("op", "*") if operand_next else ("var", text)  # `50% of 80`; `1/3 of Solomon` is not a number
        if len(text) == 1 and prev[0] in ("num", "frac", "rp") and prev[3] == start:
            return "var", text
        return ("stop" if text.lower() in STOP_WORDS else "word"), text
    if kind == "num" and (prev[0] == "word" or prev[1] == ":" and tokens[i - 2][0] == "num") and prev[3] == start:
        return "var", text  # a number glued to a name (`x1`, `Q3`) or a clock time's minutes (`7:50`)
    if kind == "op":
        if text == "**":
            return ("sym", text) if prev[0] in ("num", "rp") and operand_next else ("skip", text)
        if text in "^√":
            return "sym", text
        if text in "/-–" and prev[0] in ("num", "word") and prev[3] == start and nxt[0] == "word" and nxt[2] == end \
                and len(nxt[1]) > 1:  # `$35/hour`, `60-mile`; `24/Y` and `100-x` are algebra
            return "unit", text
        return "op", OPERATORS[text]
    return kind, text


def new_side():
    return {"items": [], "symbolic": False, "expect": True, "unit": 0, "money": False, "cents": False}


def close(chains, chain, side):
    """End the side and its chain at a break; a chain with at least one `=` link is kept."""
    if not chain and not side["items"] and not side["symbolic"]:
        return  # nothing open (prose)
    if side["symbolic"] or side["items"] and not side["expect"]:
        chain.append(dict(side))
    if len(chain) > 1:
        chains.append(chain[:])
    chain.clear()
    side.update(new_side())


def read_operand(tokens, i, kind, text, chains, chain, side):
    """Add a number or an opening bracket to the side; right after a whole operand it starts a new expression,
    unless it is a bracket glued to it (`2(7)`, `(1/2)(20)` multiply)."""
    if not side["expect"]:
        prev = tokens[i - 1]
        if kind == "lp" and prev[0] in ("num", "frac", "rp") and prev[3] == tokens[i][2]:
            side["items"].append(("op", "*"))
        else:
            close(chains, chain, side)
    if kind == "lp":
        side["items"].append(("lp",))
        side["expect"] = True
    else:
        side["items"] += number_items(text)
        side["expect"], side["unit"], side["cents"] = False, 0, False
        side["money"] |= text[0] in "$€£¢\\"


def extend_side(tokens, i, kind, text, side, was_prose):
    """Add an operator, a closing bracket, a minus sign or a unit word to the side, or mark it symbolic. False when
    the token is not part of the side (an `=`, a line end, punctuation, prose)."""
    items, whole = side["items"], side["items"] and not side["expect"]
    if side["symbolic"]:
        return kind in ("num", "frac", "var", "op", "sym", "lp", "rp", "word", "unit")  # to the next `=` or break
    if kind in ("rp", "op") and whole:
        items.append(("rp",) if kind == "rp" else ("op", text))
        side["expect"] = kind == "op"
    elif kind == "op" and text == "-" and not was_prose and tokens[i + 1][0] in ("num", "frac", "lp") \
            and tokens[i + 1][2] == tokens[i][3]:
        items.append(("neg",))  # a minus sign: `-5`, `-(3 + 4)`; `w-10` is algebra
    elif kind in ("word", "unit") and whole and side["unit"] < UNIT_WORDS:
        side["unit"] += kind == "word"
        side["symbolic"] = kind == "word" and len(text) == 1  # `1 3/4 t`, `gives b =`: an unknown, not a unit
        side["cents"] |= text.lower().startswith("cent")
    elif kind in ("var", "sym") or kind == "op" and (was_prose or items) or kind == "word" and items and not whole:
        side["symbolic"] = True  # an unknown, a power or root, an operator after a word, a word as an operand
    else:
        return False
    return True


def read_chains(tokens):
    """Group tokens into chains of sides joined by `=` (a line starting with `=` continues the line above). A side
    is numbers, operators and brackets; words right after a number are its unit (`20 miles/day × 5 days`); a side
    with a word or an unknown as an operand (`Cat's speed / 5`, `2x + 3`) is symbolic; prose ends a chain."""
    chains, chain, side, prose = [], [], new_side(), False
    for i in range(len(tokens)):
        if tokens[i][0] == "word" and not side["items"] and not side["symbolic"] and tokens[i][1] not in "xX":
            close(chains, chain, side)  # prose: the common case, read quickly
            prose = True
            continue
        kind, text = resolve(tokens, i)
        was_prose, prose = prose, False
        complete = side["symbolic"] or side["items"] and not side["expect"]
        if kind == "skip" or kind == "op" and not side["items"] and not was_prose and text != "-":
            prose = was_prose  # bold, or a bullet
        elif kind in ("num", "frac", "lp") and not side["symbolic"]:
            read_operand(tokens, i, kind, text, chains, chain, side)
        elif extend_side(tokens, i, kind, text, side, was_prose):
            pass
        elif kind == "eq" and complete:
            chain.append(dict(side))
            side.update(new_side())
        elif kind == "eq" and not side["items"] and not chain or kind == "nl" and text == "=" and complete:
            pass  # a label's `=` (`Cost = 6 x $2.50 = $15`), or a line that the next one continues
        else:
            close(chains, chain, side)
            prose = kind in ("word", "stop", "unit")
    close(chains, chain, side)
    return chains


def trim_brackets(items):
    """Drop prose brackets around a side, e.g. `(3 + 4` / `7)` of `(3 + 4 = 7)`."""
    opened = sum(item[0] == "lp" for item in items)
    closed = sum(item[0] == "rp" for item in items)
    start, end = 0, len(items)
    while opened > closed and items[start][0] == "lp":
        start, opened = start + 1, opened - 1
    while closed > opened and items[end - 1][0] == "rp":
        end, closed = end - 1, closed - 1
    return items[start:end]


def apply(values, op):
    """Apply one operator to the value stack; a value too large to be a rationale's step raises ValueError."""
    if op == "neg":
        values[-1] = -values[-1]
        return
    b, a = values.pop(), values.pop()
    value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else Fraction(a) / b  # ints stay exact
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise ValueError("too large")
    values.append(value)


def evaluate(items, percent=True):
    """The exact value of one side (numbers, + - * /, minus signs, brackets), by shunting-yard: no recursion, so
    depth and length cost only time linear in the side. None when it is not arithmetic we check."""
    values, ops = [], []
    try:
        for item in items:
            if item[0] == "num":
                if item[1] is None:
                    return None
                values.append(Fraction(item[1], 100) if percent and item[2] else item[1])
            elif item[0] in ("lp", "neg"):
                ops.append(item[0])
            elif item[0] == "rp":
                while ops and ops[-1] != "lp":
                    apply(values, ops.pop())
                if not ops:
                    return None
                ops.pop()
            else:
                while ops and ops[-1] != "lp" and PRECEDENCE[ops[-1]] >= PRECEDENCE[item[1]]:
                    apply(values, ops.pop())
                ops.append(item[1])
        while ops and ops[-1] != "lp":
            apply(values, ops.pop())
    except (ValueError, IndexError):  # too large, or a side that is not a whole expression
        return None
    return values[0] if len(values) == 1 and not ops else None


def match_rounded(value, rhs_value, rhs):
    """True if the right side equals the value up to the rounding (or truncation) the writer used."""
    if value == rhs_value or len(rhs) != 1 or rhs[0][3] is None:
        return value == rhs_value  # an expression or fraction on the right states an exact value
    unit = Fraction(1, 10 ** rhs[0][3])
    truncated = Fraction(int(value / unit)) * unit  # 2/3 = 0.66 is how some people write it
    return abs(value - rhs_value) <= unit / 2 or rhs_value == truncated


def percent_change(items):
    """`$50 - 10%` written for a 10% discount (`$80 + 25%` for a rise): a * (1 -/+ p/100) as one number, else None."""
    if len(items) != 3 or items[1] not in (("op", "+"), ("op", "-")) or items[0][0] != "num" or items[2][0] != "num":
        return None
    if items[0][1] is None or items[2][1] is None or items[0][2] or not items[2][2]:
        return None
    change = Fraction(items[2][1], 100) if items[1][1] == "+" else -Fraction(items[2][1], 100)
    return [("num", items[0][1] * (1 + change), False, None)]


def check_link(left_side, right_side):
    """Judge one `left = right` link: True/False, or None when a side is not arithmetic we check."""
    left, right = trim_brackets(left_side["items"]), trim_brackets(right_side["items"])
    # `0.25 * 100 = 25%`, `1.2 x 100% = 120`: a % may be meant as a label, so try both readings.
    both = [(True, True), (False, True), (True, False), (False, False)]
    readings = both if any(item[0] == "num" and item[2] for item in left + right) else both[:1]
    lefts = [left] + ([percent_change(left)] if percent_change(left) else [])
    # `2 x 3 = 6 x 7 = 42`, a running total: the left equals the right side's first number.
    rights = [right, right[:1]] if len(right) > 2 and right[0][0] == "num" and right[1][0] == "op" else [right]
    # `$1 / 2 = 50 cents`: dollars on the left, cents on the right.
    scales = (1, 100) if right_side["cents"] and left_side["money"] and not right_side["money"] else (1,)
    try:
        values = [(evaluate(lhs, p), evaluate(rhs, q), rhs) for p, q in readings for lhs in lefts for rhs in rights]
    except ZeroDivisionError:
        return False
    if values[0][0] is None or values[0][1] is None:
        return None
    return any(match_rounded(value * scale, rhs_value, rhs) for value, rhs_value, rhs in values
               if value is not None and rhs_value is not None for scale in scales)


def is_label(side):
    """A lone number on the left of `=` is a label or a unit change, not a step: `Number of packages of 3 = 18 / 3`,
    `2 hours = 2 x 60 = 120 minutes`, `Day 2 = 15 + 5`."""
    return len(side["items"]) == 1 or len(trim_brackets(side["items"])) == 1


def check_equations(text):
    """Count (true, found) over every `=` link of every arithmetic chain in free text."""
    true = found = 0
    for chain in read_chains(read_tokens(text)):
        for left, right in zip(chain, chain[1:]):
            if left["symbolic"] or right["symbolic"] or is_label(left):
                continue  # algebra (an unknown or a named quantity as an operand) is not arithmetic to check
            verdict = check_link(left, right)
            if verdict is not None:
                found += 1
                true += verdict
    return true, found


def written_equations(text):
    """The chains a rationale writes, normalized (`3 x $4 = $12` -> `3*4=12`): the same reasoning, reworded."""
    def show(item):
        return {"lp": "(", "rp": ")", "neg": "-"}.get(item[0]) or str(item[1])
    return ["=".join("".join(map(show, side["items"])) for side in chain) for chain in read_chains(read_tokens(text))]


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


def rewrite_forms(text):
    """The text with IMPLICIT_TIMES_RE's, PART_RE's, TIMES_RE's and LABEL_LINE_RE's forms written as plain chains: lines
    `L = a` / `L = b` (the earlier one without a result of its own) become `L = a = b`."""
    text = IMPLICIT_TIMES_RE.sub("*(", text)
    text = PART_RE.sub(lambda m: f"{m[2]} {PARTS[m[1].lower()]} = ", text)
    text = TIMES_RE.sub(lambda m: f"{TIMES[m[1].lower()]} {m[2]} = ", text)
    out, last = [], None
    for line in text.split("\n"):
        m = LABEL_LINE_RE.fullmatch(line)
        label = m[1].strip().lower() if m else None
        if label and label == last:
            out[-1] += " = " + m[2].strip()
            continue
        out.append(line)
        last = label
    return "\n".join(out)


def check_steps(text, question=None):
    """(steps that are true, steps found) in a rationale: every `=` link of every written equation,
    and for the arithmetic scratchpad every column line, checked against the operands' real digits
    (from the question "What is A + B?" when given, else from the closing "So A + B = S")."""
    lines = [m.groups() for m in COLUMN_RE.finditer(text)]  # groups() keeps None for a missing carry-in
    if not lines:
        return check_equations(rewrite_forms(text))
    so = QUESTION_SUM_RE.search(question or "") or SO_RE.search(text)
    operands = (int(so.group(1)), int(so.group(2))) if so else None
    col_true, col_found = check_columns(lines, operands)
    rest_true, rest_found = check_equations(COLUMN_RE.sub("", text))  # includes the `So` line
    return col_true + rest_true, col_found + rest_found


def first_false_line(text, question=None):
    """The index of the line that holds a rationale's first false step: the shortest run of its first lines whose
    steps are not all true (a chain written down several lines is read as the whole rationale reads it); None when no
    step found is false. Step-level pairs are cut there (create_data.make_step_pairs)."""
    lines = text.split("\n")
    for i in range(len(lines)):
        true, found = check_steps("\n".join(lines[: i + 1]), question)
        if true < found:
            return i
    return None


def all_steps_true(steps_true, steps_found):
    """A faithful rationale: at least one written step, and every one of them true."""
    return 0 < steps_found == steps_true
