"""CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018), scored as the official code does
(LisaAnne/Hallucination `utils/chair.py` with `data/synonyms.txt`; lmms-eval's `coco_cap_chair` and OPERA's
`chair.py` are copies of it with another lemmatiser, see below).

Pipeline of the official `caption_to_words`, reproduced step by step:

1. lower-case the caption and split it with `nltk.word_tokenize` (Punkt sentence splitting, then the Penn Treebank
   word tokenizer of nltk 3.2.5, the version the official requirements pin);
2. singularise every token with `pattern.en.singularize` (pattern 3.6, pinned there too). The official file builds
   an nltk `WordNetLemmatizer` but never calls it;
3. scan the tokens left to right and merge a pair found in the two-word table (`DOUBLE_WORDS`) into one entry;
4. if the merged list holds both "toilet" and "seat", drop every "seat" (so "the seat of the toilet" is no chair);
5. keep the entries that are in the synonym table (`MSCOCO_OBJECTS`, compared verbatim) and map each one to its
   COCO category. Repeats are kept: "a dog next to another dog" mentions dog twice.

Quirks of the official data kept as they are (lmms-eval's copy has the same strings):
- synonyms.txt spells " motor bike" and " cheesecake" with a leading space and "iPhone" with a capital, so
  "motor bike(s)", "cheesecake(s)" and "iphone(s)" never count as objects;
- pattern singularises singular words that end in s: "bus" -> "bu" and "minibus" -> "minibu" (not counted; "buses"
  -> "bus" is), "tennis" -> "tenni" (so "tennis racket" counts through "racket"), "glass" -> "glas" (the table maps
  "wine glas" back to "wine glass"). Plurals it leaves or mangles: "doggies" and "collies" stay plural, "ties" ->
  "ty", "bow ties" -> "bow ty" (none counted);
- "stove top oven" is in the two-word table but has three words, so "stove" and "oven" count separately.

Where this module differs from the official environment (nltk and pattern are not installed here; both are
re-implemented from their source, `singularize` exactly):
- Punkt's trained English parameters (abbreviation list, collocations, orthographic statistics) are not available:
  sentence splitting runs with empty parameters, which makes three kinds of difference, all about whether a period
  stays glued to the word before it: (a) a word that English Punkt knows as an abbreviation and that is followed by
  more text ("dr.", "mr.", ...) keeps its period there ("dr." one token), here it is split off ("dr", "."); (b) after
  a number or a single letter followed by a period ("2.", "a.") and then a lower-case word, Punkt here never breaks
  the sentence, English Punkt does for the few lower-case words its statistics have seen sentence-initially and never
  capitalised; (c) English Punkt's learnt collocations (pairs like a number and a month) never break, here they do.
  None of these touches an object word unless an object word (or the first word of a two-word phrase) is one of
  English Punkt's abbreviations, which was not checked (its list was not available offline).
- Regular expressions follow Python 2 where the official code ran on Python 2: the Treebank rules match ASCII `\\s`,
  `\\d`, `\\b` only (as Python 2's `re` did on unicode without re.UNICODE); lower-casing uses Python 3's Unicode
  tables.
- Zero denominators give 0.0 (the official code divides by zero when no caption mentions an object); an unknown
  image id or category name raises ValueError (the official code raises KeyError).

lmms-eval (`tasks/coco_cap_chair/utils.py`) and OPERA lemmatise with nltk's POS tagger + WordNetLemmatizer instead of
pattern's `singularize`; their counts differ from the official ones on the words listed above (WordNet keeps "bus",
"glass", "tennis" and turns "ties" into "tie"), and on words the tagger reads as verbs. `recall` follows lmms-eval /
OPERA (the official code has none), `length` follows OPERA's "Len".
"""
from __future__ import annotations

import re
from typing import Any, Hashable, Iterable, Mapping

__all__ = [
    "COCO_SYNONYMS", "COCO_CATEGORIES", "MSCOCO_OBJECTS", "INVERSE_SYNONYMS", "DOUBLE_WORDS",
    "singularize", "word_tokenize", "caption_to_words", "caption_objects", "chair", "ground_truth_from_coco",
]

# ----------------------------------------------------------------------------------------------------------------
# Data: data/synonyms.txt of the official repository, one COCO category per line, its first entry the category
# name. Entries are separated by ", " exactly as there (the two double spaces are real and make the entries
# " motor bike" and " cheesecake"); the repeats inside a line are real too. Trailing spaces are omitted (the
# official parser strips each line).
# ----------------------------------------------------------------------------------------------------------------
_SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, \
sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, \
gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, \
gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, \
drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, \
pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, \
paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, \
finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, \
kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, \
rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, \
vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, \
labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, \
retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""


def _parse_synonyms(text: str) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for line in text.splitlines():
        entries = line.strip().split(", ")
        table[entries[0]] = entries
    return table


COCO_SYNONYMS: dict[str, list[str]] = _parse_synonyms(_SYNONYMS_TXT)
"""category -> its line of synonyms.txt (first entry the category itself; repeats and the spaced entries kept)."""

COCO_CATEGORIES: tuple[str, ...] = tuple(COCO_SYNONYMS)
"""The 80 COCO category names, in synonyms.txt order (= COCO category-id order)."""

MSCOCO_OBJECTS: frozenset[str] = frozenset(e for entries in COCO_SYNONYMS.values() for e in entries)
"""Every string that counts as an object mention after tokenising, singularising and merging."""

INVERSE_SYNONYMS: dict[str, str] = {e: cat for cat, entries in COCO_SYNONYMS.items() for e in entries}
"""synonym -> category (no synonym belongs to two lines)."""


def _double_words() -> dict[str, str]:
    # Two-word phrases that are one object (official list, its repeats and the unreachable three-word entry included).
    phrases = ["motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
               "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat",
               "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
               "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear",
               "home plate", "train track"]
    table = {p: p for p in phrases}
    # "baby bird" / "adult bird" is the bird, not a person ("baby", "adult" are person synonyms).
    for animal in ["bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
                   "cub"]:
        table["baby " + animal] = animal
        table["adult " + animal] = animal
    # "passenger jet" is the jet, not a person.
    for vehicle in ["jet", "train"]:
        table["passenger " + vehicle] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # pattern singularises "glass" to "glas"
    return table


DOUBLE_WORDS: dict[str, str] = _double_words()
"""'first second' (both singularised tokens) -> the entry that replaces the pair."""

# ----------------------------------------------------------------------------------------------------------------
# pattern.en.singularize, pattern 3.6 (pattern/text/en/inflect.py), for nouns. The word lists and rules below are
# its data; the control flow is the same: custom words -> compound with a preposition -> trailing apostrophe ->
# uninflected / uncountable suffix -> "-ie" plural -> irregular suffix -> first matching suffix rule.
# ----------------------------------------------------------------------------------------------------------------
_PLURAL_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below", "for",
    "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto", "around",
    "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart", "betwixt", "beyond",
    "but", "by"))

# pattern tests `known.endswith(word)`: a word that is the *tail* of one of these is returned unchanged
# (so "is", "ness", "ears", "s" stay as they are), not only the words themselves.
_UNINFLECTED = (
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors", "christmas",
    "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod", "graffiti", "mews", "species",
    "contretemps", "mumps", "swine", "corps", "news", "swiss",
    # uncountable
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information", "mathematics",
    "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research", "water", "cheese",
    "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard", "sand")

# A word ending in one of these + "s" is returned as it is, still plural ("collies"). "^pie" and "^tie" are
# literal strings in pattern's test, so they never match.
_IE_WORDS = (
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie", "sortie",
    "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie", "^pie",
    "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie", "quickie",
    "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie")

# Irregular plural suffix -> singular suffix ("women" -> "woman", "people" -> "person", also "four" -> "fmy").
# No word ends in two of these with different results, so the order pattern's dict happens to have is immaterial.
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon"}
_IRREGULAR_RE = [(re.compile("(?i)" + k + "$"), v) for k, v in _IRREGULAR.items()]

# Ordered suffix rules; the first whose pattern is found anywhere in the word rewrites it. Character classes such as
# "[m|l]" and "[octop|vir]" are pattern's own (they include "|" and single letters) and are kept verbatim.
_RULES = [(re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"),
    (r"(?i)(.)itis$", r"\1itis"),
    (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"),
    (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"),
    (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"),
    (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"),
    (r"arves$", "arf"),
    (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"),
    (r"(?i)([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"),
    (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    # an unmatched group is replaced by "" (pattern does it by hand, Python 3's re.sub does it itself)
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"),
    (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"),
    (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
)]


def singularize(word: str) -> str:
    """pattern.en.singularize (pattern 3.6) for a noun: "dogs" -> "dog", "puppies" -> "puppy", "women" -> "woman",
    "people" -> "person", "knives" -> "knife", "mice" -> "mouse"; and its slips on singular words ending in s
    ("bus" -> "bu", "glass" -> "glas", "tennis" -> "tenni")."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PLURAL_PREPOSITIONS:  # "mothers-in-law" -> "mother-in-law"
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):  # "dogs'" -> "dog's"
        return singularize(word[:-1]) + "'s"
    low = word.lower()
    if any(known.endswith(low) for known in _UNINFLECTED):
        return word
    if any(low.endswith(ie + "s") for ie in _IE_WORDS):
        return low
    for pattern, replacement in _IRREGULAR_RE:
        if pattern.search(low):
            return pattern.sub(replacement, word)
    for pattern, replacement in _RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word)
    return word


# ----------------------------------------------------------------------------------------------------------------
# nltk.word_tokenize (nltk 3.2.5) = Punkt sentence splitting + Penn Treebank word tokenizer on each sentence.
# Punkt runs with empty parameters (see the module docstring); its algorithm is otherwise nltk's.
# ----------------------------------------------------------------------------------------------------------------
_PK_NON_WORD = r"(?:[?!)\";}\]\*:@\'\({\[])"
_PK_MULTI = r"(?:\-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PK_WORD_START = r"[^\(\"\`{\[:;&\#\*@\)}\]\-,]"
_PK_WORD = re.compile(
    rf"({_PK_MULTI}|(?={_PK_WORD_START})\S+?(?=\s|$|{_PK_NON_WORD}|{_PK_MULTI}|,(?=$|\s|{_PK_NON_WORD}|{_PK_MULTI}))"
    rf"|\S)")
_PK_PERIOD_CONTEXT = re.compile(rf"\S*[.?!](?=(?P<after_tok>{_PK_NON_WORD}|\s+(?P<next_tok>\S+)))")
_PK_REALIGN = re.compile(r"[\"')\]}]+?(?:\s+|(?=--)|$)", re.MULTILINE)
_PK_ELLIPSIS = re.compile(r"\.\.+$")
_PK_NUMERIC = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")
_PK_INITIAL = re.compile(r"[^\W\d]\.$")
_PK_PUNCTUATION = tuple(";:,.!?")


def _punkt_breaks_inside(context: str) -> bool:
    """Punkt's text_contains_sentbreak: is some token of `context` a sentence break followed by another token?"""
    toks = [t for line in context.split("\n") if line.strip() for t in _PK_WORD.findall(line)]
    breaks = []
    for tok in toks:  # first pass, no abbreviations known
        breaks.append(tok in (".", "?", "!") or (not _PK_ELLIPSIS.match(tok) and tok.endswith(".")
                                                and not tok.endswith("..")))
    for i in range(len(toks) - 1):  # second pass: initials and numbers before a word Punkt would not capitalise
        tok, nxt = toks[i], toks[i + 1]
        if not tok.endswith("."):
            continue
        typ = _PK_NUMERIC.sub("##number##", tok.lower())
        if len(typ) > 1 and typ.endswith("."):
            typ = typ[:-1]
        initial = bool(_PK_INITIAL.match(tok))
        if initial or typ == "##number##":
            # orthographic heuristic with no statistics: punctuation or a lower-case first letter -> not a start;
            # an initial before a capitalised word -> not a break either
            if nxt in _PK_PUNCTUATION or nxt[0].islower() or (initial and nxt[0].isupper()):
                breaks[i] = False
    return any(breaks[:-1])


def _punkt_sentences(text: str) -> list[str]:
    slices = []
    last = 0
    for m in _PK_PERIOD_CONTEXT.finditer(text):
        if _punkt_breaks_inside(m.group() + m.group("after_tok")):
            slices.append((last, m.end()))
            last = m.start("next_tok") if m.group("next_tok") else m.end()
    slices.append((last, len(text.rstrip())))
    # realign: closing quotes / brackets after a break belong to the sentence before it
    out = []
    shift = 0
    for k, (start, stop) in enumerate(slices):
        start += shift
        if k + 1 == len(slices):
            if text[start:stop]:
                out.append(text[start:stop])
            continue
        m = _PK_REALIGN.match(text[slices[k + 1][0]:slices[k + 1][1]])
        if m:
            out.append(text[start:slices[k + 1][0] + len(m.group(0).rstrip())])
            shift = m.end()
        else:
            shift = 0
            if text[start:stop]:
                out.append(text[start:stop])
    return out


_A = re.ASCII  # the official code ran on Python 2, whose `re` matched \s \d \b as ASCII on these patterns
_TB_STEPS = [(re.compile(p, _A), r) for p, r in (
    # opening quotes
    (r'^"', "``"), (r"(``)", r" \1 "), (r'([ (\[{<])"', r"\1 `` "),
    # punctuation
    (r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "), (r"\.\.\.", " ... "), (r"[;@#$%&]", r" \g<0> "),
    (r"([^\.])(\.)([\]\)}>\"\']*)\s*$", r"\1 \2\3 "),  # the sentence's final period
    (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "),
    # brackets, double dashes
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", " -- "),
)]
_TB_ENDING = [(re.compile(p, _A), r) for p, r in (
    (r'"', " '' "), (r"(\S)(\'\')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
)]
_TB_CONTRACTIONS = [re.compile(p, _A) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b", r"(?i)\b(got)(ta)\b",
    r"(?i)\b(lem)(me)\b", r"(?i)\b(mor)('n)\b", r"(?i)\b(wan)(na)\s", r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b")]


def _treebank(sentence: str) -> list[str]:
    text = sentence
    for pattern, replacement in _TB_STEPS:
        text = pattern.sub(replacement, text)
    text = " " + text + " "
    for pattern, replacement in _TB_ENDING:
        text = pattern.sub(replacement, text)
    for pattern in _TB_CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """nltk.word_tokenize as of nltk 3.2.5 (Punkt with empty parameters): "a dog's bone." ->
    ["a", "dog", "'s", "bone", "."]."""
    return [tok for sentence in _punkt_sentences(text) for tok in _treebank(sentence)]


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------
def caption_to_words(caption: str) -> tuple[list[str], list[str], list[str]]:
    """The official `caption_to_words` less its index list: (object words as written after singularising and
    merging, their COCO categories, all merged tokens)."""
    tokens = [singularize(t) for t in word_tokenize(caption.lower())]
    merged = []
    i = 0
    while i < len(tokens):
        pair = " ".join(tokens[i:i + 2])
        if pair in DOUBLE_WORDS:
            merged.append(DOUBLE_WORDS[pair])
            i += 2
        else:
            merged.append(tokens[i])
            i += 1
    words = merged
    if "toilet" in words and "seat" in words:
        words = [w for w in words if w != "seat"]
    words = [w for w in words if w in MSCOCO_OBJECTS]
    return words, [INVERSE_SYNONYMS[w] for w in words], merged


def caption_objects(caption: str) -> list[str]:
    """The COCO categories a caption mentions, in order, repeats kept: "two dogs and a puppy" -> ["dog", "dog"]."""
    return caption_to_words(caption)[1]


def _category(name: Any, where: str) -> str:
    if name not in INVERSE_SYNONYMS:
        raise ValueError(f"chair: {where}: {name!r} is not a COCO category or synonym (see COCO_CATEGORIES)")
    return INVERSE_SYNONYMS[name]


def ground_truth_from_coco(instances: Mapping, captions: Mapping | None = None) -> dict[Hashable, set[str]]:
    """image id -> the COCO categories CHAIR takes as present, as the official `get_annotations` builds them: the
    categories of the image's instance annotations (`instances_*.json`: "images", "annotations" with "image_id" and
    "category_id", "categories" with "id" and "name"), plus, when `captions` (`captions_*.json`) is given, every
    object its reference captions mention (read with `caption_objects`). Every image listed in either file gets an
    entry, an empty set if nothing was found."""
    names = {cat["id"]: cat["name"] for cat in instances.get("categories", [])}
    truth: dict[Hashable, set[str]] = {img["id"]: set() for img in instances.get("images", [])}
    for ann in instances.get("annotations", []):
        if ann["category_id"] not in names:
            raise ValueError(f"chair: annotation {ann.get('id')!r} has category_id {ann['category_id']!r}, which "
                             f"the instances' 'categories' list does not define")
        cat = _category(names[ann["category_id"]], "instances category")
        truth.setdefault(ann["image_id"], set()).add(cat)
    if captions is not None:
        for img in captions.get("images", []):
            truth.setdefault(img["id"], set())
        for ann in captions.get("annotations", []):
            truth.setdefault(ann["image_id"], set()).update(caption_objects(ann["caption"]))
    return truth


def chair(captions: Mapping[Hashable, str], ground_truth: Mapping[Hashable, Iterable[str]]) -> dict:
    """CHAIR of generated captions (one per image) against per-image ground-truth COCO category names (a synonym is
    read as its category).

    Returns fractions 0..1:
      CHAIR_s  captions with at least one hallucinated mention / captions;
      CHAIR_i  hallucinated mentions / object mentions (repeats count every time);
      recall   sum over images of |ground truth ∩ mentioned categories| / sum of |ground truth| (lmms-eval, OPERA);
    and
      length   mean number of tokens per caption after merging two-word phrases, punctuation included (OPERA's "Len",
               which stores it divided by 100; here it is the plain mean);
      per_image  image id -> {"caption", "mentioned" (categories, in order, repeats kept), "mentioned_words" (the
               words as they matched), "hallucinated" ([(word, category)] in order), "ground_truth" (sorted),
               "recalled" (sorted), "chair_s" (0/1), "chair_i"}.
    A ratio whose denominator is 0 is 0.0. Raises ValueError for an image id without ground truth.
    """
    if not captions:
        raise ValueError("chair: no captions")
    missing = [k for k in captions if k not in ground_truth]
    if missing:
        raise ValueError(f"chair: {len(missing)} caption(s) have no ground truth, e.g. image ids {missing[:5]!r} "
                         f"(keys must match exactly: int 42 is not str '42')")
    n_hall_caps = n_hall = n_mentions = n_recalled = n_truth = n_tokens = 0
    per_image = {}
    for image_id, caption in captions.items():
        if not isinstance(caption, str):
            raise TypeError(f"chair: caption of image {image_id!r} is {type(caption).__name__}, not str")
        truth = {_category(name, f"ground truth of image {image_id!r}") for name in ground_truth[image_id]}
        words, mentioned, merged = caption_to_words(caption)
        hallucinated = [(w, c) for w, c in zip(words, mentioned) if c not in truth]
        recalled = truth & set(mentioned)
        n_mentions += len(mentioned)
        n_hall += len(hallucinated)
        n_hall_caps += bool(hallucinated)
        n_recalled += len(recalled)
        n_truth += len(truth)
        n_tokens += len(merged)
        per_image[image_id] = {
            "caption": caption, "mentioned": mentioned, "mentioned_words": words, "hallucinated": hallucinated,
            "ground_truth": sorted(truth), "recalled": sorted(recalled), "chair_s": int(bool(hallucinated)),
            "chair_i": len(hallucinated) / len(mentioned) if mentioned else 0.0}
    n = len(captions)
    return {"CHAIR_s": n_hall_caps / n, "CHAIR_i": n_hall / n_mentions if n_mentions else 0.0,
            "recall": n_recalled / n_truth if n_truth else 0.0, "length": n_tokens / n,
            "n_captions": n, "n_mentions": n_mentions, "n_hallucinated": n_hall, "per_image": per_image}
