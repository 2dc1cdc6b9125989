"""VQA / TextVQA accuracy: the standard answer normalisation and the soft score.

Normalisation (the EvalAI answer processor that TextVQA's evaluator, and LLaVA's, apply to every prediction and every
ground-truth answer): lower-case; drop "," and "?"; "'s" -> " 's"; newlines and tabs to spaces; strip; punctuation:
each mark of `PUNCT` is deleted where it touches a space (or when a digit-comma-digit appears anywhere), else replaced
by a space; a "." not followed by a digit is deleted (the official pattern, including its `count=re.UNICODE` = 32
replacements at most); then per word: number words zero-ten (and "none") to digits, articles dropped, the
contraction table applied ("dont" -> "don't").

Score: the answer's accuracy is the mean over the ten leave-one-annotator-out subsets of min(1, matches among the
other nine / 3). The original VQA script (vqaEval.py) normalises only when the ten answers disagree, and the ground
truth by punctuation only; TextVQA's evaluator, followed here, normalises always.
"""
from __future__ import annotations

import re
from typing import Sequence

PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern (a lookahead for "<=", not a lookbehind)

# The contraction table of the standard VQA evaluation, as "written form -> canonical form" pairs. Keys never match
# where they hold capitals ("Im", "Ive", "Id've"): words are lower-cased first, as in the official code.
_CONTRACTIONS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's
maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't
mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're
youve you've
"""
CONTRACTIONS = dict(pair.split() for pair in re.split(r"[|\n]", _CONTRACTIONS) if pair.strip())


def _punctuation(text: str) -> str:
    out = text
    comma = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if p + " " in text or " " + p in text or comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # count = re.UNICODE (32), as the official call passes it


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize(answer: str) -> str:
    """The EvalAI / TextVQA answer normalisation (see the module docstring)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The soft VQA accuracy of one prediction against the annotators' answers (ten in VQA / TextVQA): the mean over
    the leave-one-out subsets of min(1, matches / 3), after normalising both sides."""
    if not answers:
        raise ValueError("vqa_accuracy: no ground-truth answers")
    gold = [normalize(a) for a in answers]
    pred = normalize(prediction)
    scores = []
    for i in range(len(gold)):
        matches = sum(1 for j, g in enumerate(gold) if j != i and g == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)
