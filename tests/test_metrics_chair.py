"""CHAIR against hand-computed values on fixtures in COCO's own json layout (instances_*.json, captions_*.json)."""
import json

import pytest

from vlmplug.metrics.chair import (COCO_CATEGORIES, COCO_SYNONYMS, DOUBLE_WORDS, INVERSE_SYNONYMS, MSCOCO_OBJECTS,
                                   caption_objects, chair, ground_truth_from_coco, singularize, word_tokenize)

# The 80 COCO detection categories in category-id order (ids 1..90 with gaps), as instances_val2014.json names them.
COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]


def _image(i):
    return {"license": 3, "file_name": f"COCO_val2014_{i:012d}.jpg",
            "coco_url": f"http://images.cocodataset.org/val2014/COCO_val2014_{i:012d}.jpg", "height": 480,
            "width": 640, "date_captured": "2013-11-14 16:28:13", "flickr_url": "http://farm3.staticflickr.com/x.jpg",
            "id": i}


def _ann(ann_id, image_id, category_id):
    return {"segmentation": [[10.0, 10.0, 60.0, 10.0, 60.0, 50.0, 10.0, 50.0]], "area": 2000.0, "iscrowd": 0,
            "image_id": image_id, "bbox": [10.0, 10.0, 50.0, 40.0], "category_id": category_id, "id": ann_id}


# the real COCO ids and supercategories of the categories used here
_CATS = [(1, "person", "person"), (15, "outdoor", "bench"), (17, "animal", "cat"), (18, "animal", "dog"),
         (22, "animal", "elephant"), (59, "food", "pizza"), (58, "food", "hot dog"), (67, "furniture", "dining table")]

INSTANCES = json.loads(json.dumps({
    "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3, "name": "CC BY-NC-SA"}],
    "images": [_image(i) for i in range(1, 8)],
    "annotations": [
        _ann(101, 1, 18), _ann(102, 1, 1), _ann(103, 1, 18),  # image 1: two dogs and a person
        _ann(201, 2, 58), _ann(202, 2, 67),                   # image 2: hot dog, dining table
        _ann(301, 3, 17),                                     # image 3: cat (the toilet is only in the captions)
        _ann(401, 4, 1), _ann(402, 4, 15),                    # image 4: person, bench
        _ann(501, 5, 22),                                     # image 5: elephant
        _ann(601, 6, 59),                                     # image 6: pizza
    ],                                                        # image 7: no instance annotation
    "categories": [{"supercategory": s, "id": i, "name": n} for i, s, n in _CATS],
}))

CAPTIONS = json.loads(json.dumps({
    "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
    "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3, "name": "CC BY-NC-SA"}],
    "images": [_image(i) for i in range(1, 8)],
    "annotations": [
        {"image_id": 1, "id": 9001, "caption": "A man walks his dog."},                  # person, dog
        {"image_id": 2, "id": 9002, "caption": "A hot dog on a plate on a wooden table."},  # hot dog, dining table
        {"image_id": 3, "id": 9003, "caption": "A cat sleeping on a toilet seat."},      # cat, toilet
        {"image_id": 4, "id": 9004, "caption": "People sitting on a park bench."},       # person, bench
        {"image_id": 5, "id": 9005, "caption": "An elephant walking past a tree."},      # elephant
        {"image_id": 6, "id": 9006, "caption": "A pizza with many toppings."},           # pizza
        {"image_id": 7, "id": 9007, "caption": "Two buses parked by a bench."},          # bus, bench
    ],
}))

# Generated captions, one per image. Hand analysis (tokens after lower-casing, Treebank splitting and singularising;
# two-word phrases merged; "|" marks a mention -> category):
GENERATED = {
    # two dogs and a puppy play with a man on a couch .   (13 tokens, no merge)
    # dogs->dog | puppy->dog | man->person | couch->couch        mentions 4; couch not in {dog, person}: 1 hallucinated
    1: "Two dogs and a puppy play with a man on a couch.",
    # a [hot dog] sits on a table next to a [teddy bear] .   (13 tokens, 2 merges -> 11)
    # hot dog | table->dining table | teddy bear               mentions 3; teddy bear hallucinated: 1 ("dog" alone is
    #                                                          not counted, it is inside "hot dog")
    2: "A hot dog sits on a table next to a teddy bear.",
    # a kitten sits on the [toilet seat] in a bathroom .   (11 tokens, 1 merge -> 10)
    # kitten->cat | toilet seat->toilet                        mentions 2; toilet is in the ground truth through the
    #                                                          reference caption, "seat" is no chair: 0 hallucinated
    3: "A kitten sits on the toilet seat in a bathroom.",
    # the picture is blurry and dark .   (7 tokens)            no mention
    4: "The picture is blurry and dark.",
    # a [baby elephant] stands near a tree with a [baby giraffe] .   (12 tokens, 2 merges -> 10)
    # baby elephant->elephant | baby giraffe->giraffe          "baby" is not a person here; mentions 2, giraffe
    #                                                          hallucinated: 1
    5: "A baby elephant stands near a tree with a baby giraffe.",
    # a pizza next to a cup and a cup .   (10 tokens)
    # pizza | cup | cup                                        mentions 3, both cups hallucinated: 2
    6: "A pizza next to a cup and a cup.",
}


def test_ground_truth_from_instances_and_reference_captions():
    truth = ground_truth_from_coco(INSTANCES, CAPTIONS)
    assert truth == {
        1: {"dog", "person"},
        2: {"hot dog", "dining table"},
        3: {"cat", "toilet"},      # toilet from "toilet seat" in the reference caption
        4: {"person", "bench"},    # "People" -> person
        5: {"elephant"},
        6: {"pizza"},
        7: {"bus", "bench"},       # captions only; "buses" -> "bus"
    }
    # without captions: the instance categories only; image 7 is listed in "images" and gets an empty set
    assert ground_truth_from_coco(INSTANCES) == {1: {"dog", "person"}, 2: {"hot dog", "dining table"}, 3: {"cat"},
                                                 4: {"person", "bench"}, 5: {"elephant"}, 6: {"pizza"}, 7: set()}


def test_chair_scores_by_hand():
    out = chair(GENERATED, ground_truth_from_coco(INSTANCES, CAPTIONS))
    # captions with a hallucination: images 1, 2, 5, 6 -> 4 of 6
    assert out["CHAIR_s"] == pytest.approx(4 / 6)
    # hallucinated mentions 1+1+0+0+1+2 = 5; mentions 4+3+2+0+2+3 = 14
    assert out["CHAIR_i"] == pytest.approx(5 / 14)
    # recalled ground truth: {dog, person} 2, {hot dog, dining table} 2, {cat, toilet} 2, none of {person, bench} 0,
    # {elephant} 1, {pizza} 1 -> 8; ground truth sizes 2+2+2+2+1+1 = 10
    assert out["recall"] == pytest.approx(8 / 10)
    # tokens after merging: 13 + 11 + 10 + 7 + 10 + 10 = 61 over 6 captions
    assert out["length"] == pytest.approx(61 / 6)
    assert (out["n_captions"], out["n_mentions"], out["n_hallucinated"]) == (6, 14, 5)

    per = out["per_image"]
    assert per[1]["mentioned"] == ["dog", "dog", "person", "couch"]
    assert per[1]["mentioned_words"] == ["dog", "puppy", "man", "couch"]
    assert per[1]["hallucinated"] == [("couch", "couch")]
    assert per[2]["mentioned"] == ["hot dog", "dining table", "teddy bear"]
    assert per[2]["hallucinated"] == [("teddy bear", "teddy bear")]
    assert per[3]["mentioned"] == ["cat", "toilet"] and per[3]["hallucinated"] == [] and per[3]["chair_s"] == 0
    assert per[4]["mentioned"] == [] and per[4]["chair_i"] == 0.0 and per[4]["recalled"] == []
    assert per[5]["mentioned"] == ["elephant", "giraffe"] and per[5]["hallucinated"] == [("giraffe", "giraffe")]
    assert per[6]["hallucinated"] == [("cup", "cup"), ("cup", "cup")]
    assert per[6]["chair_i"] == pytest.approx(2 / 3)  # 2 of 3 mentions
    assert per[1]["ground_truth"] == ["dog", "person"] and per[1]["recalled"] == ["dog", "person"]


def test_chair_without_reference_captions_counts_the_toilet():
    # instances only: image 3's ground truth is {cat}, so its "toilet" is now hallucinated
    out = chair({3: GENERATED[3]}, ground_truth_from_coco(INSTANCES))
    assert out["CHAIR_s"] == 1.0
    assert out["CHAIR_i"] == pytest.approx(1 / 2)  # toilet of {cat, toilet}
    assert out["recall"] == 1.0                    # {cat}: 1 of 1


def test_chair_accepts_lists_and_synonyms_as_ground_truth():
    # ground truth as lists, with repeats and a synonym ("puppy" is read as dog)
    out = chair({"a": "A man and his dog."}, {"a": ["puppy", "dog", "person"]})
    assert out["CHAIR_i"] == 0.0 and out["CHAIR_s"] == 0.0
    assert out["recall"] == 1.0                    # {dog, person}: both mentioned
    assert out["length"] == 6                      # a man and his dog .


def test_chair_errors():
    truth = ground_truth_from_coco(INSTANCES)
    with pytest.raises(ValueError, match="no ground truth"):
        chair({1: "a dog", 99: "a cat"}, truth)
    with pytest.raises(ValueError, match="no ground truth"):
        chair({"1": "a dog"}, truth)  # str key, int ground truth
    with pytest.raises(ValueError, match="not a COCO category"):
        chair({1: "a dog"}, {1: {"unicorn"}})
    with pytest.raises(ValueError, match="no captions"):
        chair({}, truth)
    bad = dict(INSTANCES, annotations=[_ann(1, 1, 999)])
    with pytest.raises(ValueError, match="category_id 999"):
        ground_truth_from_coco(bad)


def test_zero_denominators_are_zero():
    out = chair({1: "Nothing to see here."}, {1: set()})
    assert (out["CHAIR_s"], out["CHAIR_i"], out["recall"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("caption, expected", [
    ("Two dogs on the grass.", ["dog"]),                     # plural
    ("a puppy", ["dog"]),                                    # synonym
    ("a man", ["person"]),
    ("Women and children.", ["person", "person"]),           # irregular plurals
    ("people", ["person"]),
    ("a hot dog", ["hot dog"]),                              # two-word objects, not "dog"
    ("two hot dogs", ["hot dog"]),
    ("Teddy bears", ["teddy bear"]),
    ("wine glasses and a wine glass", ["wine glass", "wine glass"]),  # "glass" -> "glas" -> "wine glas"
    ("a bow tie", ["tie"]),
    ("a baby elephant", ["elephant"]),                       # not person + elephant
    ("a passenger train", ["train"]),                        # not person + train
    ("people near the train tracks", ["person"]),            # "train track" is no train
    ("a baby", ["person"]),
    ("the seat of the toilet", ["toilet"]),                  # seat is no chair next to a toilet
    ("a seat", ["chair"]),
    ("a dog. a dog", ["dog", "dog"]),                        # duplicates kept; the period is split off
    ("the dog's bowl", ["dog", "bowl"]),                     # dog 's
    ("a tennis racket", ["tennis racket"]),                  # "tenni racket" -> counted through "racket"
    ("a sports ball", ["sports ball"]),                      # "sport ball" -> counted through "ball"
    ("knives and mice", ["knife", "mouse"]),
    ("a scooter, a motorbike and a motor bike", ["motorcycle", "motorcycle"]),  # " motor bike" quirk
    ("a bus", []),                                           # pattern: "bus" -> "bu" (official quirk)
    ("two buses", ["bus"]),
    ("an iPhone", []),                                       # "iPhone" never matches a lower-cased caption
    ("two collies", []),                                     # pattern leaves "collies" plural
    ("a stove top oven", ["oven", "oven"]),                  # three-word entry never merges
    ("", []),
])
def test_caption_objects(caption, expected):
    assert caption_objects(caption) == expected


def test_singularize_is_patterns():
    cases = {"dogs": "dog", "puppies": "puppy", "women": "woman", "people": "person", "children": "child",
             "knives": "knife", "calves": "calf", "mice": "mouse", "geese": "goose", "oxen": "ox", "skis": "ski",
             "benches": "bench", "glasses": "glass", "buses": "bus", "ties": "ty", "sheep": "sheep",
             "scissors": "scissors", "luggage": "luggage", "collies": "collies", "bus": "bu", "glass": "glas",
             "tennis": "tenni", "is": "is", "mothers-in-law": "mother-in-law", "dogs'": "dog's", "'": "'s"}
    assert {w: singularize(w) for w in cases} == cases


def test_word_tokenize_is_nltks():
    assert word_tokenize("a dog. a cat sat on 2. chairs (and a hat.) then") == [
        "a", "dog", ".", "a", "cat", "sat", "on", "2.", "chairs", "(", "and", "a", "hat", ".", ")", "then"]
    assert word_tokenize("the dog's bone isn't here, \"yes\"...") == [
        "the", "dog", "'s", "bone", "is", "n't", "here", ",", "``", "yes", "''", "..."]
    assert word_tokenize("cannot stop--now!") == ["can", "not", "stop", "--", "now", "!"]
    assert word_tokenize("") == []


def test_synonym_table_is_complete():
    assert list(COCO_CATEGORIES) == COCO_NAMES and len(COCO_SYNONYMS) == 80
    assert all(INVERSE_SYNONYMS[name] == name for name in COCO_NAMES)
    # 416 entries in synonyms.txt, the repeats within lines included
    assert sum(len(v) for v in COCO_SYNONYMS.values()) == 416
    assert COCO_SYNONYMS["motorcycle"] == ["motorcycle", "scooter", " motor bike", "motor cycle", "motorbike",
                                           "scooter", "moped"]
    assert COCO_SYNONYMS["cake"][1] == " cheesecake" and "iPhone" in MSCOCO_OBJECTS
    assert "motor bike" not in MSCOCO_OBJECTS
    assert INVERSE_SYNONYMS["bison"] == "cow" and INVERSE_SYNONYMS["chesterfield"] == "couch"
    # 29 phrases (2 repeated) + 12 animals x {baby, adult} + 2 passenger vehicles + toilet seat + wine glas
    assert len(DOUBLE_WORDS) == 27 + 24 + 2 + 2
    assert DOUBLE_WORDS["bow tie"] == "tie" and DOUBLE_WORDS["baby cub"] == "cub"
