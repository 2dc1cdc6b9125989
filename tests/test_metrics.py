"""Benchmark scorers against hand-computed results on fixtures in each benchmark's own file format."""
import json

import pytest

from vlmplug.metrics import mme, pope, screenspot, vqa_accuracy, vqa_normalize
from vlmplug.metrics.mme import parse_answer as mme_parse
from vlmplug.metrics.mme import parse_line
from vlmplug.metrics.pope import parse_answer as pope_parse
from vlmplug.metrics.screenspot import box_from_xywh

# ------------------------------------------------------------------------------------------ POPE
# the benchmark's question file (one json per line) and a model's answer file, as the official script reads them
POPE_QUESTIONS = """\
{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}
{"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": "no"}
{"question_id": 3, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a car in the image?", "label": "yes"}
{"question_id": 4, "image": "COCO_val2014_000000210789.jpg", "text": "Is there a bench in the image?", "label": "no"}
{"question_id": 5, "image": "COCO_val2014_000000429109.jpg", "text": "Is there a person in the image?", "label": "yes"}
{"question_id": 6, "image": "COCO_val2014_000000429109.jpg", "text": "Is there a kite in the image?", "label": "no"}
"""
POPE_ANSWERS = """\
{"question_id": 1, "text": "Yes, there is a snowboard in the image."}
{"question_id": 2, "text": "There is no dog."}
{"question_id": 3, "text": "No. The road is empty, but yes a car is parked."}
{"question_id": 4, "text": "Yes"}
{"question_id": 5, "text": "I do not see anyone, there is a person."}
{"question_id": 6, "text": "Not a kite."}
"""


def test_pope_parsing_follows_the_official_script():
    assert pope_parse("Yes, there is a snowboard in the image.") == "yes"
    assert pope_parse("There is no dog.") == "no"
    assert pope_parse("No. The road is empty, but yes a car is parked.") == "no"  # first sentence only
    assert pope_parse("Yes. There is no dog.") == "yes"  # "no" only after the first '.'
    assert pope_parse("I do not see anyone") == "no"
    assert pope_parse("Not a kite.") == "yes"  # "Not" (capital) is not one of the official words
    assert pope_parse("no,") == "no"  # commas are dropped before splitting


def test_pope_scores_by_hand():
    qs = [json.loads(x) for x in POPE_QUESTIONS.splitlines()]
    ans = {json.loads(x)["question_id"]: json.loads(x)["text"] for x in POPE_ANSWERS.splitlines()}
    r = pope([ans[q["question_id"]] for q in qs], [q["label"] for q in qs])
    # parsed: 1 yes (label yes: TP), 2 no (no: TN), 3 no (yes: FN), 4 yes (no: FP), 5 no (yes: FN), 6 yes (no: FP)
    assert (r["tp"], r["tn"], r["fp"], r["fn"]) == (1, 1, 2, 2)
    assert r["accuracy"] == pytest.approx(2 / 6)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(1 / 3)
    assert r["yes_ratio"] == pytest.approx(3 / 6)


def test_pope_edges():
    r = pope(["No", "no"], ["yes", "no"])  # no "yes" predicted: precision's denominator is 0
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0 and r["accuracy"] == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        pope(["a", "b"], ["yes"])


# ------------------------------------------------------------------------------------------ VQA / TextVQA
TEXTVQA = {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
    {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "how many dogs?",
     "answers": ["two", "2", "2", "two dogs", "2", "two", "3", "2", "two", "2"]},
    {"question_id": 34603, "image_id": "003a8ae2ef43b902", "question": "what does the sign say?",
     "answers": ["don't walk", "dont walk", "Don't Walk", "walk", "walk", "don't walk", "dont walk.", "stop",
                 "don't walk", "walk"]},
    {"question_id": 34604, "image_id": "003a8ae2ef43b903", "question": "what brand?",
     "answers": ["coca cola", "coca-cola", "coke", "coke", "coca cola", "pepsi", "coca cola", "coke", "cola", "coke"]},
]}


def test_vqa_normalisation_awkward_cases():
    assert vqa_normalize("Two") == "2" and vqa_normalize("two dogs") == "2 dogs"
    assert vqa_normalize("Don't") == "don't" and vqa_normalize("dont") == "don't"
    assert vqa_normalize("The Coca-Cola!") == "coca cola"  # article dropped; "-" inside a word -> space
    assert vqa_normalize("1,000") == "1000" and vqa_normalize("3.5") == "3.5" and vqa_normalize("stop.") == "stop"
    assert vqa_normalize("a man's hat") == "man 's hat"
    assert vqa_normalize("yes , no") == "yes no"  # a mark touching a space is deleted


def test_vqa_accuracy_by_hand():
    d = TEXTVQA["data"]
    # q1 normalised: 2 x7 ("two", "2"), "2 dogs", "3": a prediction "2" matches 7 of 10 answers;
    # leave-one-out: dropping a "2" leaves 6 matches (min(1, 6/3) = 1), dropping another leaves 7 -> always 1
    assert vqa_accuracy("Two", d[0]["answers"]) == pytest.approx(1.0)
    # "2 dogs" appears once: dropping it leaves 0 matches (0), dropping any other leaves 1 (1/3) -> 9/10 * 1/3
    assert vqa_accuracy("two dogs", d[0]["answers"]) == pytest.approx(0.9 / 3)
    # q2: "don't walk" x6 after normalisation ("dont walk." too), "walk" x3, "stop" x1
    assert vqa_accuracy("Dont walk", d[1]["answers"]) == pytest.approx(1.0)
    # "walk": 3 matches; leaving out one of the 3 gives 2/3, leaving out another answer gives 1 -> (3*2/3 + 7)/10
    assert vqa_accuracy("walk", d[1]["answers"]) == pytest.approx((3 * 2 / 3 + 7) / 10)
    # q3: "coca cola" x4 (coca-cola normalises to it), "coke" x4, "pepsi", "cola"
    assert vqa_accuracy("Coca-Cola", d[2]["answers"]) == pytest.approx(1.0)
    # "cola" once -> 9/10 * 1/3 ; "sprite" never -> 0
    assert vqa_accuracy("cola", d[2]["answers"]) == pytest.approx(0.3)
    assert vqa_accuracy("sprite", d[2]["answers"]) == 0.0


# ------------------------------------------------------------------------------------------ MME
# the official results layout: one file per subtask, "image<TAB>question<TAB>answer<TAB>prediction", two per image
MME_EXISTENCE = """\
000000006040.jpg\tIs there a train in this image? Please answer yes or no.\tYes\tYes
000000006040.jpg\tIs there a bed in this image? Please answer yes or no.\tNo\tNo, there is not.
000000044279.jpg\tIs there a skis in this image? Please answer yes or no.\tYes\tYes.
000000044279.jpg\tIs there a clock in this image? Please answer yes or no.\tNo\tYes, there is a clock.
"""
MME_COUNT = """\
000000067213.jpg\tIs there only one dog in the image? Please answer yes or no.\tYes\tThere is one dog.
000000067213.jpg\tIs there two dogs in the image? Please answer yes or no.\tNo\tNot sure
"""
MME_CODE = """\
0020.png\tThe image shows a python code. Is the output of the code 'hello'? Please answer yes or no.\tYes\t yes
0020.png\tThe image shows a python code. Is the output of the code 'world'? Please answer yes or no.\tNo\tno
"""


def test_mme_parsing_follows_the_official_tool():
    assert mme_parse("Yes") == "yes" and mme_parse("No, there is not.") == "no"
    assert mme_parse("There is one dog.") == "other"  # "ther": neither -> always wrong
    assert mme_parse("Not sure") == "no"  # "not " holds "no"
    assert mme_parse(" yes") == "yes"


def test_mme_scores_by_hand():
    recs = []
    for cat, text in [("existence", MME_EXISTENCE), ("count", MME_COUNT), ("code_reasoning", MME_CODE)]:
        recs += [dict(parse_line(x), category=cat) for x in text.splitlines()]
    r = mme(recs)
    ex = r["subtasks"]["existence"]
    # existence: 3 of 4 right (the last one wrong); images: 006040 both right, 044279 one right -> acc+ 1/2
    assert ex["acc"] == pytest.approx(75.0) and ex["acc_plus"] == pytest.approx(50.0) and ex["score"] == 125.0
    cnt = r["subtasks"]["count"]
    # count: "There is one dog." -> other (wrong), "Not sure" -> no (right): acc 50, acc+ 0
    assert (cnt["acc"], cnt["acc_plus"], cnt["score"]) == (50.0, 0.0, 50.0)
    code = r["subtasks"]["code_reasoning"]
    assert (code["acc"], code["acc_plus"], code["score"]) == (100.0, 100.0, 200.0)
    assert r["perception"] == pytest.approx(175.0) and r["cognition"] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="4 tab-separated"):
        parse_line("a\tb\tc")


# ------------------------------------------------------------------------------------------ ScreenSpot
SCREENSPOT_MOBILE = [
    {"img_filename": "mobile_0.png", "bbox": [100, 200, 50, 20], "instruction": "open settings", "data_type": "text",
     "data_source": "ios"},
    {"img_filename": "mobile_1.png", "bbox": [10, 10, 30, 30], "instruction": "search", "data_type": "icon",
     "data_source": "android"},
    {"img_filename": "mobile_2.png", "bbox": [0, 0, 10, 10], "instruction": "back", "data_type": "icon",
     "data_source": "android"},
]


def test_screenspot_by_hand():
    boxes = [box_from_xywh(e["bbox"]) for e in SCREENSPOT_MOBILE]
    assert boxes[0] == (100.0, 200.0, 150.0, 220.0)
    points = [(150.0, 220.0), (5.0, 25.0), None]  # on the corner (inside: bounds count), left of the box, unparsed
    groups = [f"mobile/{e['data_type']}" for e in SCREENSPOT_MOBILE]
    r = screenspot(points, boxes, groups)
    assert r["accuracy"] == pytest.approx(1 / 3) and r["n"] == 3
    assert r["per_group"] == {"mobile/icon": {"accuracy": 0.0, "n": 2}, "mobile/text": {"accuracy": 1.0, "n": 1}}
