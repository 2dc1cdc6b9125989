"""Cluster merging: identity at full budget, selection and merged tokens equal an independent numpy
k-means (same deterministic rule), padding-invariant batches, pre-LLM removal equals masked eager."""
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import vlmplug
from conftest import tiny
from vlmplug.methods.pruning.cluster import Cluster, ClusterRunner
from vlmplug.testing.tiny import make_batch, split_batch

GEN = dict(max_new_tokens=4, do_sample=False)


def np_kmeans(x, k, iters):
    """Cosine k-means, farthest-point init from row 0, Lloyd steps until stable (numpy, float64)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    chosen = [0]
    for _ in range(1, k):
        sims = np.max(xn @ xn[chosen].T, axis=1)
        chosen.append(int(np.argmin(sims)))
    c = xn[chosen].copy()
    assign = np.argmax(xn @ c.T, axis=1)
    for _ in range(iters):
        for j in range(k):
            if (assign == j).any():
                m = xn[assign == j].mean(0)
                c[j] = m / np.linalg.norm(m)
        new = np.argmax(xn @ c.T, axis=1)
        if (new == assign).all():
            break
        assign = new
    # an empty cluster takes the token least similar to its centre among clusters of two or more (earliest on ties)
    sim_all = (xn * c[assign]).sum(1)
    for j in range(k):
        counts = np.bincount(assign, minlength=k)
        if counts[j]:
            continue
        cand = np.where(counts[assign] > 1, sim_all, np.inf)
        i = int(np.argmin(cand))
        assign[i], c[j], sim_all[i] = j, xn[i], 1.0
    reps, merged = [], {}
    for j in range(k):
        members = np.nonzero(assign == j)[0]
        assert len(members), "every cluster has a member"
        sims = (xn[members] * c[j]).sum(1)
        rep = members[np.nonzero(sims >= sims.max() - 1e-9)[0][0]]
        reps.append(int(rep))
        merged[int(rep)] = x[members].mean(0)
    return sorted(reps), merged


class SpyCluster(ClusterRunner):
    """The cluster runner, recording each image's features, kept rows and merged features."""

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def select(self, x, image, index, session):
        before = x.detach().clone()
        rows, new = super().select(x, image, index, session)
        self.seen.append((before, rows.clone(), (x if new is None else new).detach().clone()))
        return rows, new


def test_full_budget_is_identity(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    with torch.no_grad():
        ref = model.generate(**batch.inputs, **GEN)
    with vlmplug.apply(model, "cluster", keep_ratio=1.0), torch.no_grad():
        out = model.generate(**batch.inputs, **GEN)
    assert torch.equal(ref, out)


def test_selection_and_merge_match_numpy_reference(family):
    model = tiny(family)
    batch = make_batch(family, model, (1, 2))
    m = SpyCluster(Cluster(keep_ratio=0.5))
    with vlmplug.apply(model, m) as h, torch.no_grad():
        model.generate(**batch.inputs, **GEN)
        st = h.stats["cluster"]
    assert len(m.seen) == 3
    for before, rows, after in m.seen:
        n = before.shape[0]
        k = int(round(n * 0.5))
        reps, merged = np_kmeans(before.double().numpy(), k, 10)
        assert rows.sort().values.tolist() == reps
        for r in reps:
            assert np.allclose(after[r].double().numpy(), merged[r], atol=1e-5)
    assert [sum(x) for x in st["tokens_kept_per_image"]] == [len(m.seen[0][1]), len(m.seen[1][1]) + len(m.seen[2][1])]


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "idefics3", "internvl"])
def test_padded_batch_equals_each_sample_alone(fam):
    model = tiny(fam)
    batch = make_batch(fam, model, (2, 1, 0))
    with vlmplug.apply(model, "cluster", keep_tokens=2), torch.no_grad():
        together = model(**batch.inputs).logits[:, -1]
        gt = model.generate(**batch.inputs, **GEN)
        for b in range(3):
            single = split_batch(batch, b)
            alone = model(**single.inputs).logits[:, -1]
            assert (alone[0] - together[b]).abs().max() <= 1e-4
            assert torch.equal(model.generate(**single.inputs, **GEN)[0, -4:], gt[b, -4:])


def test_identical_tokens_still_give_k_clusters():
    """Three identical rows and one other, k = 3: the farthest-point start picks row 0 twice, so one cluster starts
    empty; it takes row 0 (every row of the big cluster is equally close to its centre: the earliest), and the
    image keeps exactly 3 tokens: {1, 2}, {3}, {0}."""
    from vlmplug.methods.pruning.cluster import cosine_kmeans, fill_empty

    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assign, _ = cosine_kmeans(x, 3, 10)
    assert len(torch.unique(assign)) == 2  # the empty cluster, before the fill
    filled, sim = fill_empty(*cosine_kmeans(x, 3, 10), 3)
    assert filled.tolist() == [2, 0, 0, 1] and sim[0] == 1.0
    reps, _ = np_kmeans(x.double().numpy(), 3, 10)
    assert len(reps) == 3


def test_the_runner_keeps_k_tokens_when_a_cluster_would_be_empty():
    """The runner itself on an image whose features hold identical rows (a flat region): k kept rows, each merged
    token the mean of its members (here: the empty-start cluster's row 0 alone, {1, 2}, {3})."""
    runner = Cluster(keep_tokens=3).build()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    rows, new = runner.select(x.clone(), None, 0, None)
    assert sorted(rows.tolist()) == [0, 1, 3]
    torch.testing.assert_close(new[rows], x[rows])
