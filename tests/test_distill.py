import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaqkd.config import TermConfig
from vaqkd.distill.anchors import virtual_anchor
from vaqkd.distill.contrastive import CRDLoss
from vaqkd.distill.objective import Objective, build_term
from vaqkd.distill.registry import TERMS
from vaqkd.models import create_model, stage_channels


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16), mode=st.sampled_from(["minmax", "absmax", "tensor"]))
def test_anchor_levels_argmax_and_ranking(bits, seed, mode):
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(seed)) * 5
    a = virtual_anchor(z, bits, mode)
    for i in range(len(z)):
        assert len(torch.unique(a[i])) <= 2**bits
        if mode == "minmax":
            assert a[i][z[i].argmax()] == a[i].max()  # the teacher's class stays a top class (ties allowed)
        # non-strict ranking: z_j > z_k never becomes a_j < a_k (rounding is monotone)
        order = torch.argsort(z[i])
        assert torch.all(a[i][order][1:] >= a[i][order][:-1])


def test_anchor_at_16_bits_is_the_input_and_modes_differ():
    z = torch.randn(8, 100)
    for mode in ("minmax", "absmax", "tensor"):
        assert torch.allclose(virtual_anchor(z, 16, mode), z, atol=1e-3)
    assert torch.equal(virtual_anchor(torch.tensor([[1.0, 2.0, 3.0, 10.0]]), 2), torch.tensor([[1.0, 1.0, 4.0, 10.0]]))
    with pytest.raises(ValueError, match="mode"):
        virtual_anchor(z, 2, "log")


def test_no_gradient_reaches_the_teacher():
    teacher, student = create_model("resnet20", 10), create_model("resnet20", 10)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    t = teacher.forward_features(x)  # deliberately *with* grad tracking: the anchor must still cut it
    terms = [TermConfig(kind="kd", anchor_bits=(2,), anchor_weights=(1.0,))]
    obj = Objective(terms, [build_term(terms[0], {}, {}, y)])
    a = virtual_anchor(t["logits"], 2)
    assert not a.requires_grad
    loss, parts = obj(student.forward_features(x), {k: v.detach() for k, v in t.items()}, y)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.fc.weight.grad is not None and set(parts) == {"kd", "kd@va2"}


def _own(kind: str, **params) -> dict:
    """The given parameters that the term `kind` declares (the others are not its own)."""
    return {k: v for k, v in params.items() if k in TERMS[kind].params}


def _setup(kind):
    torch.manual_seed(0)
    student, teacher = create_model("resnet20", 10), create_model("resnet20", 10).eval()
    labels = torch.arange(40) % 10
    cfg = TermConfig(kind=kind, params=_own(kind, nce_k=16), anchor_bits=(4,) if kind != "ce" else (),
                     anchor_weights=(0.5,) if kind != "ce" else ())  # fmt: skip
    term = build_term(cfg, stage_channels(student), stage_channels(teacher), labels)
    return student, teacher, labels, cfg, term


@pytest.mark.parametrize("kind", TERMS)
def test_every_term_is_finite_with_gradients_to_the_student(kind):
    student, teacher, labels, cfg, term = _setup(kind)
    obj = Objective([cfg], [term])
    idx = torch.arange(8)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        t = teacher.forward_features(x)
    total, parts = obj(student.forward_features(x), t, labels[idx], index=idx, step=0)
    assert total.ndim == 0 and torch.isfinite(total)
    assert all(torch.isfinite(v) for v in parts.values())
    total.backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0


def test_objective_parts_add_up_to_the_total():
    student, teacher, labels, _, _ = _setup("ce")
    cfgs = [
        TermConfig(kind="ce", weight=0.7),
        TermConfig(kind="kd", weight=0.3, anchor_bits=(4, 2), anchor_weights=(0.2, 0.1)),
        TermConfig(kind="kd", weight=0.5, params={"temperature": 2.0}),
    ]
    obj = Objective(cfgs, [build_term(c, {}, {}, labels) for c in cfgs])
    assert obj.names == ["ce", "kd", "kd@va4", "kd@va2", "kd2"]
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        t = teacher.forward_features(x)
    total, parts = obj(student.forward_features(x), t, labels[:6])
    weights = {"ce": 0.7, "kd": 0.3, "kd@va4": 0.2, "kd@va2": 0.1, "kd2": 0.5}
    assert torch.allclose(total, sum(weights[k] * v for k, v in parts.items()))
    assert parts["kd@va4"] != parts["kd"]


def test_crd_negatives_are_other_classes_and_memory_updates():
    labels = torch.arange(200) % 10
    crd = CRDLoss(64, 64, labels, feat_dim=16, nce_k=500)
    idx = torch.arange(0, 200, 7)
    neg = crd.sample_negatives(idx, step=3)
    assert neg.shape == (len(idx), 500)
    assert torch.all(labels[neg] != labels[idx][:, None])  # never the positive, never its class
    assert len(torch.unique(labels[neg])) == 10  # every other class is reachable
    before = crd.memory_s.clone()
    s = {"embedding": torch.randn(len(idx), 64)}
    loss = crd(s, torch.randn(len(idx), 64), labels[idx], index=idx, step=0)
    assert torch.isfinite(loss)
    changed = (crd.memory_s != before).any(1)
    assert changed[idx].all() and changed.sum() == len(idx)
    after = crd.memory_s.clone()
    cache = {}
    crd(s, torch.randn(len(idx), 64), labels[idx], index=idx, step=1, cache=cache)
    after = crd.memory_s.clone()
    crd(s, torch.randn(len(idx), 64), labels[idx], index=idx, step=1, anchor=True, cache=cache)
    assert torch.equal(crd.memory_s, after)  # anchors never write the memory


@pytest.mark.parametrize("kind", ["hint", "crd", "kd"])
def test_two_terms_of_one_kind_keep_their_own_state(kind):
    """Two terms of the same kind (same stage) each use their own regressor / head / negatives: every
    trainable head gets a gradient, and each term's loss is what it would be alone."""
    student, teacher, labels, _, _ = _setup("ce")
    cfgs = [TermConfig(kind=kind, params=_own(kind, nce_k=16, temperature=t)) for t in (4.0, 2.0)]
    s_ch, t_ch = stage_channels(student), stage_channels(teacher)
    torch.manual_seed(1)
    terms = [build_term(c, s_ch, t_ch, labels, seed=i) for i, c in enumerate(cfgs)]
    obj = Objective(cfgs, terms)
    idx = torch.arange(8)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        t = teacher.forward_features(x)
    feats = student.forward_features(x)
    total, parts = obj(feats, t, labels[idx], index=idx)
    total.backward()
    for term in terms:
        for p in term.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    import copy

    alone = copy.deepcopy(terms[1])
    if kind == "crd":  # the first call above moved the memories and Z: compare on a fresh pair
        return
    with torch.no_grad():
        solo = Objective(cfgs[1:], [alone])({k: v.detach() for k, v in feats.items()}, t, labels[idx], index=idx)[1]
    assert torch.allclose(parts[f"{kind}2"], solo[kind], rtol=1e-5)


def _crd_pair(k=4096, n=2000, seed=0):
    labels = torch.arange(n) % 100
    torch.manual_seed(seed)
    crd = CRDLoss(64, 64, labels, feat_dim=128, nce_k=k, seed=seed)
    idx = torch.arange(0, n, 16)[:64]
    g = torch.Generator().manual_seed(seed)
    emb_s, emb_t = torch.randn(2, len(idx), 64, generator=g).relu()
    return crd, labels, idx, emb_s, emb_t


def test_crd_scores_stay_fp32_under_bf16_autocast():
    """Under bf16 autocast h_neg (~1e-5) vanished against K·P_n: the negative term read ~0.01 instead of ~1 per
    sample. The loss must equal its fp32 value."""
    import copy

    crd, labels, idx, emb_s, emb_t = _crd_pair()
    ref = copy.deepcopy(crd)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16 = crd({"embedding": emb_s.bfloat16()}, emb_t.bfloat16(), labels[idx], index=idx, step=0)
        loss_bf16_2 = crd({"embedding": emb_s.bfloat16()}, emb_t.bfloat16(), labels[idx], index=idx, step=1)
    loss32 = ref({"embedding": emb_s.bfloat16().float()}, emb_t.bfloat16().float(), labels[idx], index=idx, step=0)
    loss32_2 = ref({"embedding": emb_s.bfloat16().float()}, emb_t.bfloat16().float(), labels[idx], index=idx, step=1)
    assert loss_bf16.dtype == torch.float32
    assert torch.allclose(loss_bf16, loss32, rtol=1e-5) and torch.allclose(loss_bf16_2, loss32_2, rtol=1e-5)


def test_contrastive_anchor_split_matches_qkd_exactly_on_the_teacher_side():
    """VA-QKD contrastive (FP32 weight w, anchor weight w_b) against QKD (weight w + w_b): the teacher head and
    both memories get exactly QKD's gradient and updates; the student's head differs (the anchor positive)."""
    import copy

    crd, labels, idx, emb_s, emb_t = _crd_pair(k=512)
    va_term, qkd_term = crd, copy.deepcopy(crd)
    va_cfg = TermConfig(kind="crd", weight=0.4, params={"nce_k": 512}, anchor_bits=(2,), anchor_weights=(0.4,))
    va = Objective([va_cfg], [va_term])
    qkd = Objective([TermConfig(kind="crd", weight=0.8, params={"nce_k": 512})], [qkd_term])
    for obj in (va, qkd):
        for step in range(2):
            total, parts = obj({"embedding": emb_s}, {"embedding": emb_t}, labels[idx], index=idx, step=step)
            total.backward()
    for name in ("embed_t.weight", "embed_t.bias"):
        assert torch.allclose(va_term.get_parameter(name).grad, qkd_term.get_parameter(name).grad, atol=1e-6), name
    assert torch.equal(va_term.memory_s, qkd_term.memory_s) and torch.equal(va_term.memory_t, qkd_term.memory_t)
    assert not torch.allclose(va_term.embed_s.weight.grad, qkd_term.embed_s.weight.grad)
