"""Prompt construction: the exact (context, continuation) strings lm-evaluation-harness 0.4 builds."""

import json

import pytest

from mobilellm.errors import MobileLLMError
from mobilellm.eval import tasks as T


def test_arc_question_answer_template():
    doc = {"id": "Mercury_1", "question": "Which gas do plants absorb?",
           "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    ex = T.arc_example(doc)
    ctx = "Question: Which gas do plants absorb?\nAnswer:"
    assert ex.requests == [(ctx, " oxygen"), (ctx, " carbon dioxide"), (ctx, " helium")]
    assert ex.gold == 1 and ex.choices == ["oxygen", "carbon dioxide", "helium"]
    numeric = dict(doc, choices={"text": ["a", "b"], "label": ["1", "2"]}, answerKey="2")
    assert T.arc_example(numeric).gold == 1  # NY Regents questions use digit labels


def test_boolq_template_and_labels():
    doc = {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."}
    ex = T.boolq_example(doc)
    ctx = "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert ex.requests == [(ctx, " no"), (ctx, " yes")] and ex.gold == 1
    assert T.boolq_example(dict(doc, answer=False)).gold == 0


def test_piqa_template():
    ex = T.piqa_example({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0})
    assert ex.requests == [("Question: Open a jar\nAnswer:", " twist the lid"), ("Question: Open a jar\nAnswer:", " hit it")]
    assert ex.gold == 0


def test_siqa_template():
    doc = {"context": "Tracy took the bus.", "question": "Why did Tracy do this?", "answerA": "to get home",
           "answerB": "to swim", "answerC": "to sleep", "correct": "A"}
    ex = T.siqa_example(doc)
    ctx = "Q: Tracy took the bus. Why did Tracy do this?\nA:"
    assert ex.requests == [(ctx, " to get home"), (ctx, " to swim"), (ctx, " to sleep")] and ex.gold == 0
    assert T.siqa_example(dict(doc, correct="C")).gold == 2


def test_hellaswag_reconstructs_ctx_b_and_preprocesses():
    doc = {"ind": 0, "activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he",
           "endings": ["is using wrap.", "starts pulling up roofing [title] on a roof.", "a", "b"], "label": 1}
    ex = T.hellaswag_example(doc)
    # lm-eval: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    assert ex.requests[0] == (ctx, " is using wrap.")
    assert ex.requests[1] == (ctx, " starts pulling up roofing. on a roof.")  # " [title]" -> ". "
    assert ex.gold == 1
    assert T.hellaswag_split_ctx("A lady walks. She bends down. the lady") == ("A lady walks. She bends down.", "the lady")
    assert T.hellaswag_split_ctx("A man runs.") == ("A man runs.", "")
    # with the original fields present they are used as they are (capitalize lower-cases the rest, as in lm-eval)
    orig = dict(doc, ctx_a="Intro [header] text.", ctx_b="then The man")
    assert T.hellaswag_example(orig).requests[0][0] == "Roof shingle removal: Intro text. Then the man"


@pytest.mark.parametrize("ctx_a, ctx_b", [  # original HellaSwag validation records (ctx = ctx_a + " " + ctx_b)
    ("A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he"),
    ("Then he takes a small stone from the flowing river and smashes it on another stone. "
     "He starts to crush the small stone to smaller pieces.", "he"),
    ("Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
     "with other individuals visible in the background.", "the child and a different man"),
])
def test_hellaswag_split_recovers_original_fields(ctx_a, ctx_b):
    assert T.hellaswag_split_ctx(ctx_a + " " + ctx_b) == (ctx_a, ctx_b)


def test_openbookqa_template_release_and_hf_layouts():
    release = {"id": "7-980", "question": {"stem": "The sun is responsible for",
               "choices": [{"text": "puppies", "label": "A"}, {"text": "plants sprouting", "label": "B"}]},
               "answerKey": "B"}
    ex = T.openbookqa_example(release)
    assert ex.requests == [("The sun is responsible for", " puppies"), ("The sun is responsible for", " plants sprouting")]
    assert ex.gold == 1
    hf = {"question_stem": "The sun is responsible for", "question": "x",
          "choices": {"text": ["puppies", "plants sprouting"], "label": ["A", "B"]}, "answerKey": "B"}
    assert T.openbookqa_example(hf).requests == ex.requests


def test_winogrande_partial_evaluation():
    doc = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "1"}
    ex = T.winogrande_example(doc)
    cont = " always got the harder cases."
    assert ex.requests == [("Sarah was a much better surgeon than Maria so Sarah", cont),
                           ("Sarah was a much better surgeon than Maria so Maria", cont)]
    assert ex.gold == 0


def test_lambada_both_file_layouts():
    ex = T.lambada_example({"context": "He opened the door and saw his", "continuation": "dog"})
    assert ex.requests == [("He opened the door and saw his", " dog")]
    assert T.lambada_example({"text": "He opened the door and saw his dog"}).requests == ex.requests


def test_task_names_and_aliases():
    assert T.resolve_task_names("paper") == list(T.ZERO_SHOT)
    assert T.resolve_task_names("piqa, wikitext2,piqa") == ["piqa", "wikitext2"]
    with pytest.raises(MobileLLMError, match="unknown task 'arc'"):
        T.resolve_task_names("arc")


def test_load_examples_limit_and_bad_files(tmp_path):
    (tmp_path / "piqa").mkdir()
    rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)]
    (tmp_path / "piqa" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.gold for e in T.load_examples("piqa", tmp_path, limit=3)] == [0, 1, 0]
    with pytest.raises(MobileLLMError, match="--data-dir"):
        T.load_examples("piqa", None)
    with pytest.raises(MobileLLMError, match="boolq/dev.jsonl not found"):
        T.load_examples("boolq", tmp_path)
    (tmp_path / "piqa" / "validation.jsonl").write_text('{"goal": "g", "sol1": "a"}\n')
    with pytest.raises(MobileLLMError, match="record 1 is not in the piqa format.*sol2"):
        T.load_examples("piqa", tmp_path)
    (tmp_path / "piqa" / "validation.jsonl").write_text("not json\n")
    with pytest.raises(MobileLLMError, match="validation.jsonl:1 is not valid JSON"):
        T.load_examples("piqa", tmp_path)


def test_wikitext_is_joined_with_blank_lines(tmp_path):
    (tmp_path / "wikitext2" / "raw").mkdir(parents=True)
    (tmp_path / "wikitext2" / "raw" / "wiki.test.raw").write_bytes(b" = A = \r\n Text one .\r\n")
    assert T.read_wikitext(tmp_path) == " = A = \n\n\n Text one .\n"
