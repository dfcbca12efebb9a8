"""`sparsekern bench --suite generate`: greedy decode timing, bytes per step, JSON + PNG (tiny Llama)."""

import json

import pytest
import torch

from sparsekern import cli
from sparsekern.bench import generate, runner
from sparsekern.bench.roofline import Roofline

transformers = pytest.importorskip("transformers")
ROOF = Roofline(bandwidth_gbs=10.0, peak_tflops=0.1, dtype="float32", matmul_n=0, copy_mib=0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(tied: bool = False):
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    _tiny().save_pretrained(path)
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_step_bytes_counts_weights_once_and_the_real_kv_cache(tied):
    model = _tiny(tied)
    weights, kv = generate.step_bytes(model, batch=3, context=10)
    emb = model.model.embed_tokens.weight
    every = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedupes tied
    every += sum(b.numel() * b.element_size() for b in model.buffers())
    assert weights == (every if tied else every - emb.numel() * emb.element_size())
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 128, (3, 10)), use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv == real


def test_measure_variant_subtracts_prefill(monkeypatch):
    # A fake clock: 1 s of set-up, 10 ms per prompt token (prefill), 0.1 s per new token.
    calls = []

    def fake_timed(model, ids, new, reps, lean=False):
        calls.append((ids.shape, new))
        return 1.0 + 0.01 * ids.shape[1] + 0.1 * new

    monkeypatch.setattr(generate, "_timed", fake_timed)
    m = generate.measure_variant(_tiny(), batch=2, prompts=(8, 16), new_tokens=3, reps=1)
    assert m["step_s"] == pytest.approx(0.1) and m["tokens_per_s"] == pytest.approx(20.0)
    assert m["ttft_s"] == pytest.approx({8: 1.18, 16: 1.26})
    assert all(shape[0] == 2 for shape, _ in calls)


def test_generate_suite_writes_rows_json_and_png(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "PROMPTS", (16, 32))
    # The lean path decodes 8 tokens of this tiny model in less than t(1)'s noise (--quick's 8
    # tokens, 1 rep): 64 tokens, median of 3, so every row's decode time is measurable.
    monkeypatch.setattr(generate, "schedule", lambda quick: ((16,), 64, 3))
    out = tmp_path / "res"
    res = runner.run(
        suites=("generate",), quick=True, device="cpu", out=out, model_path=str(tiny_dir),
        patterns=("2:4", "block32x32:0.5"), batches=(1, 2), progress=False, show=False, roofline=ROOF,
    )  # fmt: skip
    assert not res["notes"], res["notes"]
    rows = res["rows"]
    # model.generate at each batch, then the lean path (sk.generate) at batch 1.
    assert [(r["pattern"], r["rows"], r["engine"]) for r in rows] == [
        (p, b, e)
        for p in ("dense", "2:4", "block32x32:0.5")
        for b, e in ((1, "sparsekern"), (2, "sparsekern"), (1, "sparsekern-lean"))
    ]
    dense = {r["rows"]: r for r in rows if r["pattern"] == "dense" and r["engine"] == "sparsekern"}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["ttft_ms_16"] > 0 and r["peak_rss_mb"] > 0
        assert r["gbs"] == pytest.approx(r["bytes_per_step"] / (r["decode_ms_per_step"] / 1e3) / 1e9)
        assert r["roof_pct"] == pytest.approx(100 * r["gbs"] / ROOF.bandwidth_gbs)
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / dense[r["rows"]]["tokens_per_s"])
        if r["pattern"] != "dense":  # compressed weights: fewer bytes per step
            assert r["bytes_per_step"] < dense[r["rows"]]["bytes_per_step"]
    saved = json.loads((out / res["files"]["json"].rsplit("/", 1)[1]).read_text())
    assert len(saved["rows"]) == len(rows)
    with open(res["files"]["generate_png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_generate_suite_scores_each_variant_on_the_eval_windows(tiny_dir, monkeypatch):
    """Real weights (SmolLM2) get each variant's perplexity beside its speed, on the windows the
    llama.cpp peer scores; here the tiny model stands in, with random windows."""
    from sparsekern.bench import text

    windows = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(generate, "eval_windows", lambda ctx, name, who="": windows)
    monkeypatch.setattr(generate, "schedule", lambda quick: ((16,), 8, 1))
    res = runner.run(
        suites=("generate",), quick=True, device="cpu", out=None, model_path=str(tiny_dir),
        patterns=("2:4",), batches=(1,), progress=False, show=False, roofline=ROOF,
    )  # fmt: skip
    rows = res["rows"]
    assert {(r["pattern"], r["engine"]) for r in rows} >= {("dense", "sparsekern"), ("2:4", "sparsekern")}
    dense_ppl = text.perplexity(generate.load_model(str(tiny_dir), torch.float32), windows).ppl
    for r in rows:
        assert r["ppl_tokens"] == 3 * 11
        if r["pattern"] == "dense":
            assert r["ppl"] == pytest.approx(dense_ppl, rel=1e-5)
        else:  # the pruned weights' own score, not the dense one's
            assert r["ppl"] != pytest.approx(dense_ppl, rel=1e-3)


def test_unknown_model_is_a_note_not_a_crash(tmp_path):
    res = runner.run(
        suites=("generate",), quick=True, device="cpu", out=None, model_path=str(tmp_path / "nope"),
        progress=False, show=False, roofline=ROOF,
    )  # fmt: skip
    assert res["rows"] == []
    assert any("expected 'smollm2', 'tinyllama' or a local model directory" in n for n in res["notes"])


def test_cli_parses_generate_options():
    args = cli.build_parser().parse_args(
        ["bench", "--suite", "generate", "--model", "tinyllama", "--batch", "1,4", "--quick"]
    )
    assert args.suite == ["generate"] and args.batch == (1, 4) and args.model == "tinyllama"


def test_noisy_decode_is_nan_not_a_made_up_rate(monkeypatch):
    # t(1 + N) below t(1): only noise can do that; the rate must not be invented from it.
    monkeypatch.setattr(generate, "_timed", lambda model, ids, new, reps, lean=False: 2.0 - 0.1 * new)
    m = generate.measure_variant(_tiny(), batch=1, prompts=(8,), new_tokens=3, reps=1)
    assert m["step_s"] != m["step_s"] and m["tokens_per_s"] != m["tokens_per_s"]


def test_lean_rows_time_the_decode_steps_themselves(monkeypatch):
    """The lean rows are timed step by step (prefill out of the difference), and the decoder is
    left as it was."""
    from sparsekern.lean.generate import decoder_for

    model = _tiny()
    dec = decoder_for(model)
    calls = []
    make = dec.stepper

    def counting(batch):
        step = make(batch)

        def run(*args):
            calls.append(args[1])
            return step(*args)

        return run

    monkeypatch.setattr(dec, "stepper", counting)
    s = generate.lean_decode_s(model, torch.randint(0, 128, (1, 5)), 6)
    assert s > 0 and calls == [5, 6, 7, 8, 9, 10]  # one decode step per new token after the first
    assert vars(dec)["stepper"] is counting  # what was there before the call
    monkeypatch.undo()
    generate.lean_decode_s(model, torch.randint(0, 128, (1, 5)), 2)
    assert "stepper" not in vars(dec)  # the method again
    monkeypatch.setattr(generate, "lean_decode_s", lambda model, ids, new: 0.05)
    monkeypatch.setattr(generate, "_timed", lambda model, ids, new, reps, lean=False: 1.0)
    m = generate.measure_variant(model, batch=1, prompts=(8,), new_tokens=3, reps=3, lean=True)
    assert m["step_s"] == pytest.approx(0.05) and m["tokens_per_s"] == pytest.approx(20.0)
