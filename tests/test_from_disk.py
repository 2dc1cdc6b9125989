"""Real deployments: every tiny family saved with `save_pretrained` (the model and its real processor: the family's
processor class, a small tokenizer whose special tokens sit at the tiny config's ids, the family's chat template, the
PIL image processor), loaded back with `vlmplug.load(path)` (`AutoModelForImageTextToText` / `AutoProcessor`), and
driven through `vlmplug.generate` / `generate_info`, `prepare_batch` and `vlmplug run` with every registered method:
the code path of a user with a real checkpoint. The checkpoints come from `vlmplug.testing.processors`.

torchvision is not installed here, and transformers 5's video processors all need it: `AutoProcessor.from_pretrained`
raises ImportError for the processors that own one (Qwen2-VL / 2.5 / 3, LLaVA-OneVision, SmolVLM, InternVL);
`vlmplug.load` then loads the same processor class image-only (`vlmplug.loading.load_processor`). SmolVLMProcessor
also refuses to exist without the `num2words` package (used only for video prompts): where it is missing, this module
stubs it for its run (`_num2words`), so the real SmolVLMProcessor class is what is tested.

Per family and method (`test_method_from_disk`): the method runs on the processor's inputs; the pruning methods keep
their budget (`keep_ratio=0.5`); identity parameters give the plain answer; after the call the model is as before
(weights, hooks, instance attributes, bit-equal logits). The tiny decoders have 2 layers and the tiny vision towers 2,
so the layer parameters are scaled down (ACTIVE / IDENTITY); `test_defaults_*` checks which methods refuse their
defaults at that depth and that all of them run with their defaults on 4-layer / 9-vision-layer checkpoints.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import vlmplug
from vlmplug import MethodConfigError
from vlmplug.cli import main
from vlmplug.loading import VideoProcessorUnavailable, load
from vlmplug.pipeline import generate_info, prepare_batch, prepare_inputs
from vlmplug.testing import processors as P
from vlmplug.testing import tiny
from vlmplug.testing.tiny import FAMILIES

METHODS = vlmplug.available_methods()
GEN = dict(max_new_tokens=3)
PROMPT = "what color is the image?"
HALF = 0.5

# Parameters that make each method act on the tiny models (decoder layers 0..1, vision layers 0..1).
ACTIVE: dict[str, dict] = {
    "record": {},
    "fastv": dict(layer=1, keep_ratio=HALF),
    "plphp": dict(start_layer=1, keep_ratio=HALF, delta=0.0),  # delta 0: every pruned layer keeps exactly the budget
    "visionzip": dict(keep_ratio=HALF),
    "hiprune": dict(keep_ratio=HALF, object_layer=0),
    "flowcut": dict(keep_ratio=HALF),
    "cluster": dict(keep_ratio=HALF),
    "random": dict(keep_ratio=HALF),
    "pool": dict(keep_ratio=HALF),
    "pai": dict(alpha=0.5, layers="1:", gamma=1.0),
    "var": dict(tau=1.0, summ=0.0, layers="0:"),
    "act": dict(layers="0:", threshold=0.02),
    "modpai": dict(layers="0:", gamma=1.0, local_ratio=0.5),
    "vhr": dict(layers="0:"),
}
# Parameters under which each method must not change the answer.
IDENTITY: dict[str, dict] = {
    "record": {},
    "fastv": dict(layer=1, keep_ratio=1.0),
    "plphp": dict(start_layer=1, keep_ratio=1.0, delta=0.0),
    "visionzip": dict(keep_ratio=1.0),
    "hiprune": dict(keep_ratio=1.0, object_layer=0),
    "flowcut": dict(keep_ratio=1.0),
    "cluster": dict(keep_ratio=1.0),
    "random": dict(keep_ratio=1.0),
    "pool": dict(keep_ratio=1.0),
    "pai": dict(alpha=0.0, layers="1:", gamma=1.0),
    "var": dict(p=1.0, layers="0:"),
    "act": dict(beta=1.0, layers="0:"),
    "modpai": dict(alpha=0.0, beta=0.0, layers="0:", gamma=1.0),
    "vhr": dict(alpha=1.0, layers="0:"),
}
# How each pruning method's `tokens_kept_per_image` relates to the budget round(n * keep_ratio) of an image of n tokens.
PER_IMAGE = {"visionzip", "hiprune", "flowcut", "cluster", "random"}  # exactly the budget, per image
AT_MOST = {"pool"}  # a pooled grid: at most the budget (module docstring of pool)
PER_SAMPLE = {"fastv"}  # the budget over all the sample's image tokens
PER_LAYER = {"plphp"}  # every image kept at prefill; each pruned layer's KV cache holds the budget
# Combinations refused on purpose (MethodConfigError at apply, model untouched).
REFUSES = {("flowcut", "qwen2_5_vl"): "windowed vision tower: no CLS / image-wide token to score the flow"}
# Methods whose defaults may name layers the 2-layer tiny decoder / 2-layer vision tower does not have (hiprune's
# default object_layer was 8, now None: the vision tower's own choice).
DEFAULTS_NEED_DEPTH = {"act", "fastv", "hiprune", "modpai", "pai", "plphp", "var"}

# Image tokens of a 112x84 image under each family's processor (what its tiny vision tower yields).
IMAGE_TOKENS = {
    "llava": 16,  # 8x8 pixels, 2x2 patches, CLS dropped
    "llava_next": 70,  # anyres: base 4x4 + unpadded 8x6 high-res grid + 6 row newlines
    "llava_onevision": 70,
    "qwen2_vl": 12, "qwen2_5_vl": 12, "qwen3_vl": 12,  # 112x84 -> 4x3 merged cells
    "idefics3": 80, "smolvlm": 80,  # 2x2 tiles + global view, 16 tokens each
    "gemma3": 4,
    "internvl": 20,  # 4 tiles + thumbnail, 4 tokens each
}


def _image(w: int, h: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


IMAGE = _image(112, 84, 0)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: saved and loaded once per family
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _num2words():
    """SmolVLMProcessor raises ImportError without the num2words package (it formats video prompts with it)."""
    import transformers.models.smolvlm.processing_smolvlm as smol

    with pytest.MonkeyPatch.context() as mp:
        if not smol.num2words:
            mp.setattr(smol, "num2words", lambda n: str(n))
        yield


class _Store:
    def __init__(self, root):
        self.root = root
        self.paths: dict = {}
        self.loaded: dict = {}
        self.plain: dict = {}
        self.snapshots: dict = {}

    def path(self, family: str, deep: bool = False):
        key = (family, deep)
        if key not in self.paths:
            model = _deep_model(family) if deep else None
            try:
                self.paths[key] = P.save_tiny_checkpoint(family, self.root / f"{family}{'-deep' if deep else ''}",
                                                         model)
            except ImportError as e:  # e.g. transformers 5.17's LlavaOnevisionImageProcessorPil still needs torchvision
                pytest.skip(f"{family}: this transformers has no torchvision-free image processor: {str(e).strip()[:120]}")
        return self.paths[key]

    def load(self, family: str, deep: bool = False):
        key = (family, deep)
        if key not in self.loaded:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*loaded without its video processor")
                self.loaded[key] = load(str(self.path(family, deep)))
        model, processor = self.loaded[key]
        h = vars(model).get("_vlmplug_handle")
        if h is not None:  # a failed test left a patch: undo it so the next test starts clean
            h.remove()
        return model, processor

    def plain_answer(self, family: str) -> dict:
        if family not in self.plain:
            model, processor = self.load(family)
            self.plain[family] = generate_info(model, processor, IMAGE, PROMPT, **GEN)
        return self.plain[family]

    def snapshot(self, family: str) -> dict:
        if family not in self.snapshots:
            model, processor = self.load(family)
            self.plain_answer(family)  # transformers installs some hooks lazily at the first forward
            self.snapshots[family] = _snapshot(model, prepare_inputs(model, processor, IMAGE, PROMPT))
        return self.snapshots[family]


_PROCESSOR_PROBLEM: dict = {}


def _processor_problem(family: str, store) -> str | None:
    """Why this transformers cannot load the family's saved processor without torchvision (None: it can). Older
    releases (5.17) build some image processors and the image-only fallback only with torchvision."""
    if family not in _PROCESSOR_PROBLEM:
        from vlmplug.loading import load_processor

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_processor(str(store.path(family)))
            _PROCESSOR_PROBLEM[family] = None
        except ImportError as e:
            _PROCESSOR_PROBLEM[family] = " ".join(str(e).split())[:160]
    return _PROCESSOR_PROBLEM[family]


@pytest.fixture(autouse=True)
def _skip_without_a_loadable_processor(request):
    """Skip (saying why) where this transformers cannot load the family's processor without torchvision."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    family = params.get("family") or ("qwen2_vl" if "qwen2_vl" in request.node.name else None)
    if family:
        problem = _processor_problem(family, request.getfixturevalue("store"))
        if problem:
            pytest.skip(f"{family}: {problem}")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return _Store(tmp_path_factory.mktemp("from_disk"))


def _deep_model(family: str):
    """The tiny model with 4 decoder layers and 9 vision layers: deep enough for every method's default layers."""
    base = tiny.tiny_config

    def config(f):
        c = base(f)
        tc = c.get_text_config()
        tc.num_hidden_layers = 4
        if getattr(tc, "layer_types", None):
            tc.layer_types = (list(tc.layer_types) * 2)[:4]
        return c

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "tiny_config", config)
        return tiny.build_tiny_model(family, vision_layers=9)


# --------------------------------------------------------------------------------------------------------------------
# The model as apply() found it
# --------------------------------------------------------------------------------------------------------------------
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _snapshot(model, inputs) -> dict:
    with torch.no_grad():
        logits = model(**inputs).logits.clone()
    mods = list(model.named_modules(remove_duplicate=False))
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {n: tuple(len(getattr(m, d, {}) or {}) for d in _HOOKS) for n, m in mods},
        "attrs": {n: {k: id(v) for k, v in vars(m).items() if callable(v)} for n, m in mods},
        "attn": model.config._attn_implementation,
        "inputs": inputs,
        "logits": logits,
    }


def _assert_restored(model, before: dict) -> None:
    assert "_vlmplug_handle" not in vars(model)
    after = _snapshot(model, before["inputs"])
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed and after["tensors"].keys() == before["tensors"].keys(), changed[:5]
    assert after["hooks"] == before["hooks"], "hooks left behind"
    assert after["attrs"] == before["attrs"], "instance attributes (forwards) left patched"
    assert after["attn"] == before["attn"]
    assert torch.equal(after["logits"], before["logits"]), "plain logits changed after remove()"


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_load_picks_the_family_classes(family, store):
    """`vlmplug.load(folder)` gives the family's model class with the saved weights and its real processor class; without
    torchvision the processors that own a video processor come image-only, with a warning, where AutoProcessor fails."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = store.path(family)
    video = family in P.VIDEO_FAMILIES and not is_torchvision_available()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, processor = load(str(path))
    said = [str(w.message) for w in caught if "without its video processor" in str(w.message)]
    assert bool(said) == video, said
    assert type(model) is tiny._model_class(family)
    assert not model.training
    assert type(processor) is P.processor_class(family)
    assert type(processor.image_processor).__name__.endswith("Pil") or is_torchvision_available()
    assert processor.chat_template == P.CHAT_TEMPLATES[family]
    assert len(processor.tokenizer) == tiny.VOCAB
    if video:
        assert isinstance(processor.video_processor, VideoProcessorUnavailable)
        with pytest.raises(ImportError, match="needs torchvision"):
            processor(text=processor.video_token, videos=[torch.zeros(2, 3, 8, 8)])
        with pytest.raises(ImportError, match="requires the Torchvision library"):
            AutoProcessor.from_pretrained(path)
    reference = tiny.build_tiny_model(family).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_load_image_only_fallback_is_narrow(tmp_path):
    """The image-only fallback only catches a missing torchvision: a folder without processor files still fails as
    AutoProcessor fails, and the patched type check is restored after loading."""
    from transformers.processing_utils import ProcessorMixin

    from vlmplug.loading import load_processor, without_video_processor

    check = ProcessorMixin.__dict__["check_argument_for_proper_class"]
    tiny.build_tiny_model("qwen2_vl").save_pretrained(tmp_path)
    with pytest.raises(OSError):
        load_processor(str(tmp_path))
    with without_video_processor():
        assert ProcessorMixin.__dict__["check_argument_for_proper_class"] is not check
    assert ProcessorMixin.__dict__["check_argument_for_proper_class"] is check


def test_load_hub_layout_qwen2_vl(tmp_path):
    """The layout of the Qwen2-VL checkpoints on the hub (saved before processor_config.json existed):
    preprocessor_config.json naming the processor class, tokenizer files, chat_template.json. vlmplug.load reads it
    without torchvision too."""
    import json

    tiny.build_tiny_model("qwen2_vl").save_pretrained(tmp_path)
    P.build_image_processor("qwen2_vl").save_pretrained(tmp_path)
    tok = P.build_tokenizer("qwen2_vl")
    tok._set_processor_class("Qwen2VLProcessor")
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": P.CHAT_TEMPLATES["qwen2_vl"]}))
    pre = tmp_path / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "processor_class": "Qwen2VLProcessor"}))
    assert not (tmp_path / "processor_config.json").exists()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*loaded without its video processor")
        model, processor = load(str(tmp_path))
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert processor.chat_template == P.CHAT_TEMPLATES["qwen2_vl"]
    assert generate_info(model, processor, IMAGE, PROMPT, **GEN)["image_tokens"] == IMAGE_TOKENS["qwen2_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_generate_from_disk(family, store):
    """The processor makes as many image tokens as the vision tower yields; `vlmplug.generate` answers as
    `generate_info` does; greedy answers repeat."""
    model, processor = store.load(family)
    plain = store.plain_answer(family)
    assert plain["image_tokens"] == IMAGE_TOKENS[family]
    assert plain["new_tokens"] > 0 and plain["text"]
    assert vlmplug.generate(model, processor, IMAGE, PROMPT, **GEN) == plain["text"]


# --------------------------------------------------------------------------------------------------------------------
# Every method on every family
# --------------------------------------------------------------------------------------------------------------------
def _budget(n: int) -> int:
    return min(n, int(round(n * HALF)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_method_from_disk(family, method, store):
    if method not in ACTIVE or method not in IDENTITY:
        pytest.fail(f"method {method!r} is registered but has no ACTIVE / IDENTITY parameters in {__file__}")
    model, processor = store.load(family)
    plain = store.plain_answer(family)
    before = store.snapshot(family)
    if (method, family) in REFUSES:
        with pytest.raises(MethodConfigError):
            generate_info(model, processor, IMAGE, PROMPT, methods=method, method_params=ACTIVE[method], **GEN)
        _assert_restored(model, before)
        return
    active = generate_info(model, processor, IMAGE, PROMPT, methods=method, method_params=ACTIVE[method], **GEN)
    assert isinstance(active["text"], str) and active["prompt_tokens"] == plain["prompt_tokens"]
    n = plain["image_tokens"]
    st = active["stats"][method]
    if method in PER_IMAGE:
        assert st["tokens_kept_per_image"] == [[_budget(n)]]
    elif method in AT_MOST:
        assert 0 < st["tokens_kept_per_image"][0][0] <= _budget(n)
    elif method in PER_SAMPLE:
        assert sum(st["tokens_kept_per_image"][0]) == _budget(n)
    elif method in PER_LAYER:
        pruned = st["image_tokens_kept_per_layer"]
        assert pruned and all(v == [_budget(n)] for v in pruned.values()), pruned
    else:
        assert "tokens_kept_per_image" not in st
    _assert_restored(model, before)
    same = generate_info(model, processor, IMAGE, PROMPT, methods=method, method_params=IDENTITY[method], **GEN)
    assert same["text"] == plain["text"]
    if method in PER_IMAGE | AT_MOST | PER_SAMPLE:
        assert same["stats"][method]["tokens_kept_per_image"] == [[n]]
    _assert_restored(model, before)


def test_defaults_refused_at_tiny_depth(store):
    """A method's defaults either run on the 2-layer tiny model or name layers it lacks (the default layers of the
    attention methods, FastV's layer 2, PLPHP's start layer 2): then apply() refuses them with a MethodConfigError
    that names the setting, and the model is untouched. Only the methods of DEFAULTS_NEED_DEPTH refuse (a method that
    newly refuses its defaults fails here)."""
    model, processor = store.load("llava")
    before = store.snapshot("llava")
    refused = {}
    for method in METHODS:
        try:
            generate_info(model, processor, IMAGE, PROMPT, methods=method, **GEN)
        except MethodConfigError as e:
            refused[method] = str(e)
        _assert_restored(model, before)
    assert set(refused) <= DEFAULTS_NEED_DEPTH, refused
    assert all(msg.startswith(f"{m}: ") and "layer" in msg for m, msg in refused.items()), refused
    for method, msg in {"pai": "layers='2:'", "fastv": "layer=2", "plphp": "start_layer=2"}.items():
        if method in refused:
            assert msg in refused[method]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_defaults_run_on_deeper_checkpoints(family, store):
    """Every method with its defaults (PAI / ModPAI with their CFG branch) on a checkpoint of 4 decoder layers and 9
    vision layers, loaded from disk."""
    model, processor = store.load(family, deep=True)
    assert model.config.get_text_config().num_hidden_layers == 4
    plain = generate_info(model, processor, IMAGE, PROMPT, **GEN)
    for method in METHODS:
        r = generate_info(model, processor, IMAGE, PROMPT, methods=method, **GEN)
        assert isinstance(r["text"], str), method
        st = r["stats"][method]
        if "tokens_kept_per_image" in st:
            assert 0 < sum(st["tokens_kept_per_image"][0]) <= plain["image_tokens"], (method, st)
        assert "_vlmplug_handle" not in vars(model)


# --------------------------------------------------------------------------------------------------------------------
# Several images in one prompt, left-padded batches
# --------------------------------------------------------------------------------------------------------------------
BATCH_IMAGES = [[_image(112, 84, 1), _image(56, 84, 2)], [_image(84, 56, 3)], []]
BATCH_PROMPTS = ["compare the two images", "what is in this picture?", "describe the colour red"]
BATCH_METHODS = [(None, {}), ("fastv", dict(layer=1, keep_tokens=3)), ("cluster", dict(keep_tokens=2)),
                 ("pai", dict(alpha=0.5, layers="1:", gamma=1.0))]


@pytest.mark.parametrize("family", FAMILIES)
def test_several_images_and_padded_batch(family, store):
    """Two images in one prompt and a left-padded batch of prompts with 2, 1 and 0 images through the real processor:
    each sample answers as alone (plain and under methods), the pruning budgets hold per image / per sample."""
    model, processor = store.load(family)
    before = store.snapshot(family)
    one = generate_info(model, processor, BATCH_IMAGES[0], BATCH_PROMPTS[0], methods="cluster",
                        method_params=dict(keep_tokens=2), **GEN)
    assert one["stats"]["images_per_sample"] == [2]
    assert one["stats"]["cluster"]["tokens_kept_per_image"] == [[2, 2]]
    batch = prepare_batch(model, processor, BATCH_IMAGES, BATCH_PROMPTS)
    am = batch["attention_mask"]
    assert am.shape[0] == 3 and bool(am[:, -1].all()) and not bool(am[:, 0].all())  # left padding
    for method, params in BATCH_METHODS:
        with vlmplug.apply(model, method, processor=processor, **params) if method else _nothing() as h:
            with torch.no_grad():
                out = model.generate(**batch, do_sample=False, **GEN)
            if method == "cluster":  # keep_tokens per image
                assert h.stats[method]["tokens_kept_per_image"] == [[2, 2], [2], []]
            if method == "fastv":  # keep_tokens over each sample's image tokens
                kept = h.stats[method]["tokens_kept_per_image"]
                assert [sum(k) for k in kept] == [3, 3, 0], kept
        for i, (images, prompt) in enumerate(zip(BATCH_IMAGES, BATCH_PROMPTS)):
            alone = prepare_inputs(model, processor, images, prompt)
            with vlmplug.apply(model, method, processor=processor, **params) if method else _nothing():
                with torch.no_grad():
                    ref = model.generate(**alone, do_sample=False, **GEN)
            new = ref[0, alone["input_ids"].shape[1]:]
            assert torch.equal(out[i, batch["input_ids"].shape[1]:][: len(new)], new), (method, i)
    _assert_restored(model, before)


def test_batch_of_one_is_the_sample_alone(store):
    """prepare_batch of one prompt is prepare_inputs, and a sample's inputs do not depend on the batch around it:
    LLaVA-OneVision gets one multi-image sample (base grids, batch_num_images [2]) either way."""
    problem = _processor_problem("llava_onevision", store)
    if problem:
        pytest.skip(f"llava_onevision: {problem}")
    model, processor = store.load("llava_onevision")
    images, prompt = BATCH_IMAGES[0], BATCH_PROMPTS[0]
    alone = prepare_inputs(model, processor, images, prompt)
    assert alone["batch_num_images"].tolist() == [2]
    in_batch = prepare_batch(model, processor, BATCH_IMAGES[:2], BATCH_PROMPTS[:2])
    n = int(in_batch["attention_mask"][0].sum())
    assert torch.equal(in_batch["input_ids"][0, -n:], alone["input_ids"][0])
    crops = alone["pixel_values"].shape[1]  # the batch pads every image to its most crops
    assert torch.equal(in_batch["pixel_values"][:2, :crops], alone["pixel_values"])
    assert not in_batch["pixel_values"][:2, crops:].any()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------------------------
# The CLI: vlmplug run --model PATH --image F --prompt ... --method NAME
# --------------------------------------------------------------------------------------------------------------------
CLI_CASES = [
    ("llava", "fastv", ["layer=1", "keep_ratio=0.5"]),
    ("qwen2_vl", "visionzip", ["keep_ratio=0.5"]),
    ("internvl", "pai", ["layers=1:", "gamma=1.0"]),
    ("idefics3", "pool", ["keep_ratio=0.5"]),
    ("gemma3", "record", []),
]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "image.png"
    IMAGE.save(path)
    return path


@pytest.mark.parametrize("family,method,params", CLI_CASES, ids=[f"{f}-{m}" for f, m, _ in CLI_CASES])
def test_cli_run_from_disk(family, method, params, store, image_file, capsys):
    path = store.path(family)
    argv = ["run", "--model", str(path), "--image", str(image_file), "--prompt", PROMPT, "--method", method,
            "--max-new-tokens", str(GEN["max_new_tokens"])]
    for p in params:
        argv += ["--param", p]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*loaded without its video processor")
        rc = main(argv)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"model: {path}" in out
    lines = [ln for ln in out.splitlines() if "answer:" in ln]
    assert len(lines) == 2 and lines[0].startswith("plain"), out
    # the CLI's plain answer is the API's (image read from the file, converted to RGB)
    assert f"answer: {store.plain_answer(family)['text']!r}" in lines[0]
    if method in PER_IMAGE | AT_MOST | PER_SAMPLE:
        assert f"{method}: image tokens kept per image" in out


def test_cli_method_refused_by_the_model_exits_2(store, image_file, capsys):
    rc = main(["run", "--model", str(store.path("llava")), "--image", str(image_file), "--prompt", PROMPT,
               "--method", "fastv", "--max-new-tokens", "2"])
    assert rc == 2
    assert "fastv: layer=2" in capsys.readouterr().err
