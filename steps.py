"""Step checking: is every written step of a rationale true? (faithfulness, beyond a right final answer)

A rationale can reach the right number through wrong steps; STaR would then train on them. This counts
the `=` links of the arithmetic a rationale writes, and for the arithmetic scratchpad each column line.

    python -c "from steps import check_steps; print(check_steps('3 * 4 = 12, 12 + 6 = 19'))"   # (1, 2)
"""
import ast
import operator
import re
from fractions import Fraction

from common import ARITH_COLUMNS

# Step checking (faithfulness of a rationale). Rounding rule: a right side written with d decimals
# must equal the left side rounded or truncated to d decimals; a % is read as /100 or as a label.
# A number: currency, a mixed number (1 1/2), thousands with commas or spaces (1,200 / 3 000),
# plain digits, decimals, then an optional % or trailing currency (1700$). A space before the number only
# after a currency sign: were it optional everywhere, the space after each `+` could go to the operator or
# to the number, and a long sum with no `=` ("1 + 2 + ... + 50") would take exponential time to reject.
STEP_NUM = (r"(?:[$€£¢]\s?)?(?:\d+ (?:and )?\d{1,2}/\d+(?![\d/])|\d{1,3}(?:,\d{3})+(?!\d)|\d{1,3}(?: \d{3})+(?!\d|\.\d)"
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



def all_steps_true(steps_true, steps_found):
    """A faithful rationale: at least one written step, and every one of them true."""
    return 0 < steps_found == steps_true
