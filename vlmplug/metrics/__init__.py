"""Benchmark scoring, re-implemented from each benchmark's official evaluation code (pure Python, no dependencies):

    pope(predictions, labels)            POPE: accuracy, precision, recall, F1, yes-ratio (fractions 0..1)
    vqa_accuracy(prediction, answers)    VQA / TextVQA soft accuracy with the standard answer normalisation
    mme(records)                         MME: per-subtask acc, acc+, score; perception / cognition totals
    screenspot(points, boxes, groups)    ScreenSpot click accuracy, per platform / element type
    chair(captions, ground_truth)        CHAIR_s, CHAIR_i, recall, length (COCO synonyms)
"""
from .chair import chair
from .mme import mme
from .pope import pope
from .screenspot import screenspot
from .vqa import normalize as vqa_normalize
from .vqa import vqa_accuracy

__all__ = ["pope", "vqa_accuracy", "vqa_normalize", "mme", "screenspot", "chair"]

