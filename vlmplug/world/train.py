"""Train the embedded world VLM from scratch on drawn scenes (CPU-friendly, fixed seeds).

    python -m vlmplug.world.train --minutes 34         # time-boxed run, writes vlmplug/world/weights/
    python -m vlmplug.world.train --steps 1200         # fixed number of steps (exactly reproducible schedule)
    python -m vlmplug.world.train --steps 50 --out /tmp/w

What makes a small CPU budget enough:
- several question/answer turns per image in one sequence (the 64 image tokens are paid once per 3-6 answers);
  the first turn is exactly the single-turn inference prompt;
- loss only on answer tokens (+ their end-of-sequence token), balanced question kinds;
- a training-only dense auxiliary loss on the projected image tokens (per-patch shape, colour, object-centre, row
  and column classes, known from the drawing) so the vision tower learns fast;
- supervised attention: in layer 0 two heads of the answer position read the question's key words, in layers 1-2
  the same heads look at the patch holding the centre of each object asked about (known from the drawing). This teaches the
  two-hop lookup "which shape was asked -> where is it" directly and leaves grounded attention maps;
- a width-appropriate initialisation (std 1/sqrt(d) instead of HF's 0.02), 2-D sin-cos initial vision position
  embeddings, and a large RoPE base so that content lookups far back in the sequence stay position-invariant;
- curriculum: few large objects first, then more objects, other image sizes, clutter and small objects;
- AdamW, linear warm-up then cosine decay, higher learning rate for the projector.
The auxiliary head is thrown away and the decoder is switched back to SDPA: the shipped model is a plain
``LlavaForConditionalGeneration``. The best checkpoint by held-out accuracy is saved during training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import compat
from . import scenes as S
from .model import IMAGE_SIZE, NUM_IMAGE_TOKENS, PATCH_SIZE, build_model, build_processor, weights_dir

GRID = IMAGE_SIZE // PATCH_SIZE


@dataclass
class TrainConfig:
    steps: int = 2400
    batch_size: int = 24
    lr: float = 2.5e-3
    projector_lr: float = 5e-3
    weight_decay: float = 0.01
    warmup: int = 60
    min_lr_ratio: float = 0.05
    aux_weight: float = 1.0
    attn_weight: float = 0.5
    attn_layers: tuple[int, ...] = (1, 2)
    attn_heads: tuple[int, ...] = (0, 2)
    key_layer: int = 0
    turns: tuple[int, int] = (3, 6)
    seed: int = 0
    threads: int = 1
    eval_every: int = 100
    eval_per_kind: int = 96
    grad_clip: float = 1.0
    minutes: float | None = None  # time-boxed run: the schedule follows wall time instead of ``steps``
    init_from: str | None = None  # continue from a saved checkpoint (e.g. a second, low-LR stage)
    kind_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)  # sampling weights of QUESTION_KINDS per turn
    # Existence questions: "match" supervises attention on the matching object only (none for a "no"); "shape"
    # supervises it on every object of the asked shape, so a "no" to a shape that is here in another colour is
    # answered by reading that object's colour (the hard negative the model got wrong most often).
    exists_targets: str = "match"
    hard_exists: float = 0.0  # chance per training image of one extra "shape here, colour not" existence question
    # colours the model confuses with each other (found by eval: red / blue / purple); a hard negative whose present
    # and asked colours are both in this set is drawn this many times more often
    confusable: tuple[str, ...] = ()
    confusable_weight: float = 4.0
    # a third head of the key layer whose answer-position attention is supervised onto the colour word alone (for
    # questions that name a colour), so the asked colour reaches the answer position undiluted by the shape word
    color_head: int | None = None
    # with init_from: append this many decoder layers that start as exact identities (zeroed output projections),
    # extra capacity for the answer (e.g. comparing an asked colour with a retrieved one) without losing what the
    # trained layers do
    grow_text_layers: int = 0
    model_sizes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- data


def curriculum(progress: float, rng: random.Random) -> dict[str, Any]:
    """Scene options for a training sample at ``progress`` in [0, 1]."""
    if progress < 0.15:
        return dict(n_objects=(1, 2))
    if progress < 0.35:
        return dict(n_objects=(1, 4))
    r = rng.random()
    opts: dict[str, Any] = dict(n_objects=(1, 6))
    if r < 0.12:
        opts = dict(clutter=True)
    elif r < 0.22:
        opts = dict(n_objects=(1, 4), small=True)
    if rng.random() < 0.3:
        # Other image sizes and aspect ratios: the processor resizes them to IMAGE_SIZE x IMAGE_SIZE.
        side = rng.randint(40, 200)
        aspect = rng.uniform(0.7, 1.4)
        opts["size"] = (max(24, int(side * aspect)), side)
    return opts


class Encoder:
    """Turns scenes into token ids, labels, pixel values and per-patch auxiliary targets."""

    def __init__(self, processor):
        import numpy as np

        self.np = np
        self.processor = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.bos = self.tok.bos_token_id
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id
        self.user = self._ids("USER:")
        self.assistant = self._ids("ASSISTANT:")
        self._cache: dict[str, list[int]] = {}
        self.shape_index = {s: i + 1 for i, s in enumerate(S.SHAPES)}
        self.color_index = {c: i + 1 for i, c in enumerate(S.COLORS)}

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def q_ids(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self._ids(text)
        return ids

    def prompt_ids(self, question: str) -> list[int]:
        """Same ids as the chat template + processor produce for one image and one question."""
        return [self.bos] + self.user + [self.image_id] * NUM_IMAGE_TOKENS + self.q_ids(question) + self.assistant

    def conversation(self, questions: list[S.Question]):
        """Token ids, labels (answers + their eos only), per question the position whose logits give the answer, and
        per question the positions of its key words (shape, plural, colour)."""
        ids, labels, query_pos, key_pos = [], [], [], []
        self.last_color_pos = []
        for t, q in enumerate(questions):
            head = self.prompt_ids(q.text) if t == 0 else self.user + self.q_ids(q.text) + self.assistant
            ans = self.q_ids(q.answer) + [self.eos]
            keys = set(self.q_ids(q.shape) + self.q_ids(S.PLURALS[q.shape]) + (self.q_ids(q.color) if q.color else []))
            key_pos.append([len(ids) + i for i, tid in enumerate(head) if tid in keys])
            cids = set(self.q_ids(q.color)) if q.color else set()
            self.last_color_pos.append([len(ids) + i for i, tid in enumerate(head) if tid in cids])
            ids += head
            query_pos.append(len(ids) - 1)
            ids += ans
            labels += [-100] * len(head) + ans
        return ids, labels, query_pos, key_pos

    def aux_targets(self, scene: S.Scene):
        """Per-patch (shape, colour, centre-shape) classes; 0 = background / no centre."""
        np = self.np
        from PIL import Image

        lab = scene.labels
        w, h = lab.size
        if (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
            lab = lab.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST)
        a = np.asarray(lab).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
        n = len(scene.objects)
        counts = np.stack([(a == k).sum(1) for k in range(n + 1)], 1)  # patches x (bg + objects)
        counts[:, 0] = 0
        best = counts.argmax(1)
        best[counts.max(1) < PATCH_SIZE * PATCH_SIZE // 8] = 0
        shape_of = np.array([0] + [self.shape_index[o.shape] for o in scene.objects])
        color_of = np.array([0] + [self.color_index[o.color] for o in scene.objects])
        centre = np.zeros(GRID * GRID, dtype=np.int64)
        for o in scene.objects:
            centre[centre_patch(scene, o)] = self.shape_index[o.shape]
        return (shape_of[best], color_of[best], centre), counts


def sample_questions(scene: S.Scene, rng: random.Random, n: int, weights=None) -> list[S.Question]:
    out: list[S.Question] = []
    kinds = list(S.QUESTION_KINDS)
    tries = 0
    while len(out) < n and tries < 4 * n:
        tries += 1
        kind = rng.choices(kinds, weights=weights)[0] if weights else rng.choice(kinds)
        q = S.ask(scene, kind, rng)
        if q is not None and all(q.text != o.text for o in out):
            out.append(q)
    return out


def centre_patch(scene: S.Scene, obj: S.SceneObject) -> int:
    """Index (row-major) of the image token whose patch holds the object's centre."""
    w, h = scene.size
    cx, cy = obj.center
    return min(GRID - 1, int(cy / h * GRID)) * GRID + min(GRID - 1, int(cx / w * GRID))


def make_batch(enc: Encoder, rng: random.Random, progress: float, cfg: TrainConfig):
    import numpy as np
    import torch

    images, seqs, labs, aux = [], [], [], []
    sup_b, sup_pos, sup_t = [], [], []
    key_b, key_q, key_k = [], [], []  # (sample, query position, key-word position) triples
    col_b, col_q, col_k = [], [], []  # (sample, query position, colour-word position) triples
    while len(images) < cfg.batch_size:
        opts = curriculum(progress, rng)
        scene = S.random_scene(rng, kinds=(), **opts)
        weights = None if len(set(cfg.kind_weights)) == 1 else list(cfg.kind_weights)
        qs = sample_questions(scene, rng, rng.randint(*cfg.turns), weights)
        # A count question about the repeated shape is likely asked by sample_questions' random shape choice only
        # 1/5 of the time; random_scene(count_focus) makes repeats, and we add one focused count question here.
        if rng.random() < 0.35 and scene.objects:
            shape = rng.choice(scene.objects).shape
            q = S.count_question(scene, shape)
            if all(q.text != o.text for o in qs):
                qs.insert(rng.randint(0, len(qs)), q)
        if rng.random() < cfg.hard_exists:
            q = hard_negative(scene, rng, cfg.confusable, cfg.confusable_weight)
            if q is not None and all(q.text != o.text for o in qs):
                qs.insert(rng.randint(0, len(qs)), q)
        if not qs:
            continue
        ids, lab, qpos, kpos = enc.conversation(qs)
        for pos, cols in zip(qpos, enc.last_color_pos):
            for k in cols:
                col_b.append(len(images))
                col_q.append(pos)
                col_k.append(k)
        targets, counts = enc.aux_targets(scene)
        for pos, keys in zip(qpos, kpos):
            for k in keys:
                key_b.append(len(images))
                key_q.append(pos)
                key_k.append(k)
        for q, pos in zip(qs, qpos):
            objs = attention_targets(scene, q, cfg.exists_targets)
            if not objs:
                continue
            # Target: the patch holding each asked object's centre (where the "centre" auxiliary class lives).
            w = np.zeros(NUM_IMAGE_TOKENS, dtype=np.float32)
            for i in objs:
                w[centre_patch(scene, scene.objects[i])] += 1.0
            sup_b.append(len(images))
            sup_pos.append(pos)
            sup_t.append(w / w.sum())
        images.append(scene.image)
        seqs.append(ids)
        labs.append(lab)
        aux.append(targets)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), enc.pad, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(l)] = torch.tensor(l)
        attn[i, : len(s)] = 1
    pixel_values = enc.processor.image_processor(images, return_tensors="pt")["pixel_values"]

    aux_t = [torch.from_numpy(np.stack([a[k] for a in aux])).long() for k in range(3)]
    sup = (
        torch.tensor(sup_b, dtype=torch.long),
        torch.tensor(sup_pos, dtype=torch.long),
        torch.from_numpy(np.stack(sup_t)) if sup_t else torch.zeros(0, NUM_IMAGE_TOKENS),
        torch.tensor(key_b, dtype=torch.long),
        torch.tensor(key_q, dtype=torch.long),
        torch.tensor(key_k, dtype=torch.long),
        torch.tensor(col_b, dtype=torch.long),
        torch.tensor(col_q, dtype=torch.long),
        torch.tensor(col_k, dtype=torch.long),
    )
    return dict(input_ids=input_ids, attention_mask=attn, pixel_values=pixel_values, labels=labels), aux_t, sup


def hard_negative(scene: S.Scene, rng: random.Random, confusable=(), weight: float = 1.0) -> S.Question | None:
    """"Is there a <colour> <shape>?" for a shape that is in the scene, in a colour it is not: answer "no".
    Pairs whose present and asked colours are both ``confusable`` are ``weight`` times more likely."""
    present = {(o.shape, o.color) for o in scene.objects}
    pool: dict[tuple[str, str], float] = {}
    for o in scene.objects:
        for c in S.COLORS:
            if (o.shape, c) not in present:
                w = weight if (o.color in confusable and c in confusable) else 1.0
                pool[(o.shape, c)] = max(pool.get((o.shape, c), 0.0), w)
    if not pool:
        return None
    keys = sorted(pool)
    shape, color = rng.choices(keys, weights=[pool[k] for k in keys])[0]
    return S.exists_question(scene, shape, color)


_LOGITS: dict = {}


def _train_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (probabilities returned) that also keeps the attention logits of one decoder layer."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

    out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if _LOGITS.get("layer") is not None and getattr(module, "layer_idx", None) == _LOGITS["layer"]:
        k = repeat_kv(key, module.num_key_value_groups)
        logits = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask[:, :, :, : k.shape[-2]]
        _LOGITS["logits"] = logits
    return out, weights


def grow_text_layers(model, n: int, seed: int):
    """The same model with `n` more decoder layers on top whose attention and MLP output projections are zero, so
    it computes exactly what it did; training then uses them."""
    import torch

    old = model.config.text_config.num_hidden_layers
    sizes = dict(text_layers=old + n)
    new = build_model(seed=seed, **sizes)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    new_layers = tuple(f"layers.{old + i}." for i in range(n))
    if unexpected or any(not any(t in k for t in new_layers) for k in missing):
        raise RuntimeError(f"growing the decoder: unexpected {unexpected}, missing {missing}")
    with torch.no_grad():
        for layer in new.model.language_model.layers[old:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return new


def attention_targets(scene: S.Scene, q: S.Question, exists: str = "match") -> list[int]:
    """Indices of the objects a question is about (where the answer's attention should look); [] if none."""
    if q.kind == "count" or (q.kind == "exists" and exists == "shape"):
        return [i for i, o in enumerate(scene.objects) if o.shape == q.shape]
    return [] if q.target is None else [q.target]


# --------------------------------------------------------------------------------------------- evaluation


def heldout_set(enc: Encoder, per_kind: int, seed: int = 777, **scene_kwargs):
    """A fixed list of (scene image, question) per kind from fresh held-out scenes."""
    rng = random.Random(10**9 + seed)
    items: dict[str, list[tuple[Any, S.Question]]] = {k: [] for k in S.QUESTION_KINDS}
    i = 0
    while any(len(v) < per_kind for v in items.values()):
        scene = S.random_scene(10**9 + seed * 7919 + i, **scene_kwargs)
        i += 1
        for q in scene.questions:
            if len(items[q.kind]) < per_kind:
                items[q.kind].append((scene.image, q))
    return items


def fast_accuracy(model, enc: Encoder, items, batch_size: int = 64) -> dict[str, float]:
    """Accuracy from one forward pass per question: the argmax of the first answer token (answers are one token)."""
    import torch

    acc: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for kind, pairs in items.items():
            correct = 0
            for b in range(0, len(pairs), batch_size):
                chunk = pairs[b : b + batch_size]
                seqs = [enc.prompt_ids(q.text) for _, q in chunk]
                L = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), L), enc.pad, dtype=torch.long)
                attn = torch.zeros_like(ids)
                for i, s in enumerate(seqs):  # left padding, like generation
                    ids[i, L - len(s) :] = torch.tensor(s)
                    attn[i, L - len(s) :] = 1
                pv = enc.processor.image_processor([im for im, _ in chunk], return_tensors="pt")["pixel_values"]
                logits = model(input_ids=ids, attention_mask=attn, pixel_values=pv, logits_to_keep=1).logits[:, -1]
                pred = logits.argmax(-1).tolist()
                for p, (_, q) in zip(pred, chunk):
                    correct += int(p == enc.q_ids(q.answer)[0])
            acc[kind] = correct / max(1, len(pairs))
    model.train()
    return acc


# --------------------------------------------------------------------------------------------- training


def init_vision_positions(model, scale: float = 0.5) -> None:
    """2-D sin-cos initial position embeddings for the vision tower, large enough to stand out against patch
    content: with the default tiny random init, positions (needed for "where" questions) are learned very slowly."""
    import torch

    emb = next(m for n, m in model.named_modules() if n.endswith("vision_tower") or n == "vision_tower")
    table = next(m for m in emb.modules() if hasattr(m, "position_embedding")).position_embedding.weight
    dim = table.shape[1]
    q = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(q, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(GRID, dtype=torch.float32), torch.arange(GRID, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        ang = coord[:, None] * omega[None]
        parts += [torch.sin(ang), torch.cos(ang)]
    pe = torch.cat(parts, 1)
    if pe.shape[1] < dim:
        pe = torch.cat([pe, torch.zeros(pe.shape[0], dim - pe.shape[1])], 1)
    with torch.no_grad():
        table[1:] = scale * pe
        table[0] = 0.0


def _lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to ``min_lr_ratio`` over the rest of ``progress``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    w = cfg.warmup / max(1, cfg.steps) if not cfg.minutes else 0.0
    t = (progress - w) / max(1e-9, 1 - w)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))


def _score(acc: dict[str, float]) -> float:
    return acc["color"] + acc["exists"] + acc["where"] + 0.5 * acc["count"]


def save(model, processor, out_dir: Path, meta: dict | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    if meta is not None:
        (out_dir / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def train(
    steps: int | None = None,
    out_dir: str | Path | None = None,
    config: TrainConfig | None = None,
    log_file: str | Path | None = None,
    progress_bar: bool = True,
    **overrides: Any,
):
    """Train from scratch; writes the best checkpoint (by held-out accuracy) and the final metrics to ``out_dir``.

    Returns ``(model, processor, metrics)``. ``steps`` and keyword overrides patch :class:`TrainConfig`.
    """
    import torch

    cfg = config or TrainConfig()
    if steps is not None:
        cfg.steps = steps
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown training option {k!r}; options: {', '.join(cfg.__dataclass_fields__)}")
        setattr(cfg, k, v)
    cfg.warmup = min(cfg.warmup, max(1, cfg.steps // 5))
    out = Path(out_dir) if out_dir is not None else weights_dir()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out, log_file, progress_bar)
    finally:
        torch.set_num_threads(old_threads)


def _train(cfg: TrainConfig, out: Path, log_file, progress_bar: bool):
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    processor = build_processor()
    enc = Encoder(processor)
    if cfg.init_from:
        from transformers import LlavaForConditionalGeneration

        from ..compat import load_kwargs

        model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from, **load_kwargs(dtype=torch.float32))
        if cfg.grow_text_layers:
            model = grow_text_layers(model, cfg.grow_text_layers, cfg.seed)
    else:
        model = build_model(seed=cfg.seed, **cfg.model_sizes)
        init_vision_positions(model)
    if cfg.attn_weight:
        # Attention supervision needs the attention probabilities (eager attention in the decoder while training),
        # and the colour head its logits: a saturated softmax has no gradient left to move it.
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        AttentionInterface.register("world_train", _train_attention)
        AttentionMaskInterface.register("world_train", eager_mask)
        _LOGITS["layer"] = cfg.key_layer if cfg.color_head is not None else None
        model.set_attn_implementation({"text_config": "world_train", "vision_config": "sdpa", "": "sdpa"})
    model.train()
    hidden = model.config.text_config.hidden_size
    aux_head = torch.nn.Linear(hidden, 1 + len(S.SHAPES) + 1 + len(S.COLORS) + 1 + len(S.SHAPES) + 2 * GRID)
    grid_rows = torch.arange(NUM_IMAGE_TOKENS) // GRID
    grid_cols = torch.arange(NUM_IMAGE_TOKENS) % GRID
    n_shape, n_color = 1 + len(S.SHAPES), 1 + len(S.COLORS)

    decay, no_decay, proj = [], [], []
    for name, p in model.named_parameters():
        if "multi_modal_projector" in name:
            proj.append(p)
        elif p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        dict(params=decay, lr=cfg.lr, weight_decay=cfg.weight_decay, base=cfg.lr),
        dict(params=no_decay, lr=cfg.lr, weight_decay=0.0, base=cfg.lr),
        dict(params=proj + list(aux_head.parameters()), lr=cfg.projector_lr, weight_decay=0.0, base=cfg.projector_lr),
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)

    items = heldout_set(enc, cfg.eval_per_kind)
    log = open(log_file, "a") if log_file else None

    def emit(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    best, best_acc, history = -1.0, None, []
    t0 = time.time()
    bar = tqdm(total=None if cfg.minutes else cfg.steps, desc="train world", disable=not progress_bar, mininterval=2.0)
    ema = None
    step = -1
    while True:
        step += 1
        if cfg.minutes:
            progress = (time.time() - t0) / (60.0 * cfg.minutes)
            if progress >= 1.0:
                break
        else:
            if step >= cfg.steps:
                break
            progress = step / max(1, cfg.steps)
        bar.update(1)
        f = _lr_factor(step, progress, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base"] * f
        batch, aux, sup = make_batch(enc, rng, progress, cfg)
        outputs = model(**batch, output_attentions=bool(cfg.attn_weight))
        lm_loss = outputs.loss
        img = compat.projected_image_features(outputs).reshape(len(batch["input_ids"]), NUM_IMAGE_TOKENS, hidden)
        logits = aux_head(img)
        ls, lc, lz, lr_, lcol = logits.split([n_shape, n_color, n_shape, GRID, GRID], dim=-1)
        ce = torch.nn.functional.cross_entropy
        B = len(batch["input_ids"])
        aux_loss = (
            ce(ls.reshape(-1, n_shape), aux[0].reshape(-1))
            + ce(lc.reshape(-1, n_color), aux[1].reshape(-1))
            + ce(lz.reshape(-1, n_shape), aux[2].reshape(-1))
            + ce(lr_.reshape(-1, GRID), grid_rows.repeat(B))  # keep "where" linearly readable from each patch
            + ce(lcol.reshape(-1, GRID), grid_cols.repeat(B))
        ) / 5
        loss = lm_loss + cfg.aux_weight * aux_loss
        attn_loss = torch.zeros(())
        if cfg.attn_weight and len(sup[0]):
            # Supervised retrieval heads: from the answer position, attention should fall on the objects the
            # question is about (cross-entropy against their centre patches).
            img_pos = (batch["input_ids"][0] == enc.image_id).nonzero().squeeze(-1)
            heads = torch.tensor(cfg.attn_heads)
            terms = []
            for layer in cfg.attn_layers:
                att = outputs.attentions[layer][sup[0]]  # (N, heads, L, L)
                att = att[torch.arange(len(sup[0])), :, sup[1]][:, heads][:, :, img_pos]  # (N, h, 64)
                logp = torch.log(att + 1e-6)  # raw probabilities: the head must also look at the image, not a sink
                terms.append(-(sup[2][:, None, :] * logp).sum(-1).mean())
            # First hop: in an earlier layer the answer position reads the question's key words (shape, colour).
            kb, kq, kk = sup[3], sup[4], sup[5]
            if len(kb):
                att = outputs.attentions[cfg.key_layer][:, heads]  # (B, h, L, L)
                mass = torch.zeros(att.shape[0], len(heads), att.shape[2])
                mass.index_put_((kb[:, None].expand(-1, len(heads)), torch.arange(len(heads))[None].expand(len(kb), -1), kq[:, None].expand(-1, len(heads))),
                                att[kb, :, kq, kk], accumulate=True)
                sel = mass[kb, :, kq]  # (n, h): total mass on key words, one row per key (duplicates fine)
                terms.append(-torch.log(sel.clamp_min(1e-6)).mean())
            cb, cq, ck = sup[6], sup[7], sup[8]
            if cfg.color_head is not None and len(cb):
                lg = _LOGITS.pop("logits")[cb, cfg.color_head, cq].float()  # [n, L] (masked keys at -inf)
                terms.append(torch.nn.functional.cross_entropy(lg, ck))
            attn_loss = torch.stack(terms).mean()
            loss = loss + cfg.attn_weight * attn_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux_head.parameters()), cfg.grad_clip)
        opt.step()
        ema = lm_loss.item() if ema is None else 0.95 * ema + 0.05 * lm_loss.item()
        bar.set_postfix(lm=f"{ema:.3f}", aux=f"{aux_loss.item():.3f}", attn=f"{attn_loss.item():.3f}")
        if step % 25 == 0:
            emit(dict(step=step, lm=round(lm_loss.item(), 4), aux=round(aux_loss.item(), 4), attn=round(attn_loss.item(), 4), lr=f, s=round(time.time() - t0, 1)))
        last = (not cfg.minutes and step == cfg.steps - 1) or (
            cfg.minutes and (time.time() - t0) >= 60.0 * cfg.minutes
        )
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            acc = fast_accuracy(model, enc, items)
            sc = _score(acc)
            history.append(dict(step=step + 1, seconds=round(time.time() - t0, 1), **acc))
            emit(dict(eval=history[-1]))
            if sc >= best:
                best, best_acc = sc, dict(step=step + 1, **acc)
                save(model, processor, out, dict(config=_cfg_dict(cfg), best=best_acc, history=history))
    steps_done = step if cfg.minutes else cfg.steps
    if steps_done and (not history or history[-1]["step"] != steps_done):
        acc = fast_accuracy(model, enc, items)
        history.append(dict(step=steps_done, seconds=round(time.time() - t0, 1), **acc))
        emit(dict(eval=history[-1]))
        if _score(acc) >= best:
            best, best_acc = _score(acc), dict(step=steps_done, **acc)
            save(model, processor, out, dict(config=_cfg_dict(cfg), best=best_acc, history=history))
    if cfg.attn_weight:
        model.set_attn_implementation("sdpa")
    seconds = time.time() - t0
    metrics = dict(
        seconds=round(seconds, 1), steps=steps_done, best=best_acc, history=history, config=_cfg_dict(cfg)
    )
    (out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    emit(dict(done=metrics))
    if log:
        log.close()
    return model, processor, metrics


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = dict(cfg.__dict__)
    d["turns"] = list(d["turns"])
    d["attn_layers"], d["attn_heads"] = list(d["attn_layers"]), list(d["attn_heads"])
    d["kind_weights"] = list(d["kind_weights"])
    d["confusable"] = list(d["confusable"])
    return d


def write_sample(out_dir: str | Path | None = None, seed: int = 2024, size: int = 192) -> Path:
    """Draw the bundled sample scene (``samples/scene.png`` + ``scene.json`` with a question and its answer)."""
    out = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = [("circle", "red", 0.30), ("square", "blue", 0.26), ("triangle", "yellow", 0.28)]
    scene = S.draw_scene(specs, size=size, rng=rng, background=(200, 200, 200))
    circle = next(i for i, o in enumerate(scene.objects) if o.shape == "circle")
    questions = [S.color_question(scene, circle)]
    w = S.where_question(scene, circle)
    if w is not None:
        questions.append(w)
    questions += [S.exists_question(scene, "triangle", "yellow"), S.exists_question(scene, "square", "green")]
    questions.append(S.count_question(scene, "square"))
    scene.image.save(out / "scene.png")
    meta = dict(
        question=questions[0].text,
        answer=questions[0].answer,
        questions=[dict(kind=q.kind, question=q.text, answer=q.answer) for q in questions],
        objects=[dict(shape=o.shape, color=o.color, box=list(o.box)) for o in scene.objects],
        size=list(scene.size),
        seed=seed,
    )
    (out / "scene.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out / "scene.png"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the embedded world VLM (vlmplug/world/weights).")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="number of steps (reproducible schedule)")
    p.add_argument("--minutes", type=float, default=None, help="time-boxed run: the schedule follows wall time")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--projector-lr", type=float, default=TrainConfig.projector_lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--init-from", default=None, help="continue from this checkpoint folder (second stage)")
    p.add_argument("--kind-weights", default=None, help="sampling weights of color,exists,where,count, e.g. 1,3,1,1")
    p.add_argument("--exists-targets", choices=("match", "shape"), default=TrainConfig.exists_targets,
                   help="existence questions: attention target = the matching object, or every object of the shape")
    p.add_argument("--hard-exists", type=float, default=TrainConfig.hard_exists,
                   help="chance per image of an extra existence question whose shape is here in another colour")
    p.add_argument("--confusable", default="", help="comma-separated colours drawn more often as hard negatives")
    p.add_argument("--confusable-weight", type=float, default=TrainConfig.confusable_weight)
    p.add_argument("--grow-text-layers", type=int, default=0, help="with --init-from: add identity-initialised layers")
    p.add_argument("--color-head", type=int, default=None, help="key-layer head supervised onto the colour word")
    p.add_argument("--eval-per-kind", type=int, default=TrainConfig.eval_per_kind)
    p.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--out", default=None, help="output folder (default: the package's weights folder)")
    p.add_argument("--log", default=None, help="JSON-lines log file")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, _, metrics = train(
        steps=a.steps, out_dir=a.out, log_file=a.log, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
        threads=a.threads, eval_every=a.eval_every, minutes=a.minutes, init_from=a.init_from,
        aux_weight=a.aux_weight, warmup=a.warmup, projector_lr=a.projector_lr, exists_targets=a.exists_targets,
        hard_exists=a.hard_exists, eval_per_kind=a.eval_per_kind, confusable_weight=a.confusable_weight,
        confusable=tuple(c for c in a.confusable.split(",") if c), color_head=a.color_head,
        grow_text_layers=a.grow_text_layers,
        **({"kind_weights": tuple(float(x) for x in a.kind_weights.split(","))} if a.kind_weights else {}),
    )
    print(json.dumps(dict(seconds=metrics["seconds"], steps=metrics["steps"], best=metrics["best"]), indent=2))


if __name__ == "__main__":
    main()
