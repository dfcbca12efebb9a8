"""`sparsekern bench`: a tiny run writes the JSON and real PNG plots; --compare matches rows."""

import json

import pytest
import torch

from sparsekern import cli
from sparsekern.bench import attention, layer, report, runner
from sparsekern.bench.common import Context
from sparsekern.bench.roofline import Roofline, measure_roofline
from sparsekern.bench.timing import Budget, measure, quantile

TINY = Budget(seconds=0.01, min_reps=3, max_reps=5)
ROOF = Roofline(bandwidth_gbs=10.0, peak_tflops=0.1, dtype="float32", matmul_n=0, copy_mib=0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEKERN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSEKERN_DISPATCH", "measured")
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    return tmp_path


def _tiny_run(out, rows=(1, 8), patterns=("2:4", "block32x32:0.9"), **kw):
    return runner.run(
        suites=("layer",),
        quick=True,
        device="cpu",
        out=out,
        shapes=("vit-b.attn",),
        rows=rows,
        patterns=patterns,
        progress=False,
        budget=TINY,
        roofline=ROOF,
        **kw,
    )


def test_tiny_run_writes_json_and_plots(env):
    res = _tiny_run(env / "results", show=False)
    data = json.loads((env / "results" / f"{runner.result_stem(res['meta'])}.json").read_text())
    for field in ("device", "device_name", "torch", "sparsekern", "git_sha", "date", "dtype"):
        assert data["meta"][field], field
    assert data["meta"]["torch"] == torch.__version__
    assert data["roofline"]["bandwidth_gbs"] == 10.0
    rows = data["rows"]
    assert {(r["rows"], r["pattern"]) for r in rows} == {
        (r, p) for r in (1, 8) for p in ("dense", "2:4", "block32x32:0.9")
    }
    for r in rows:
        for field in ("case", "backend", "median_ms", "p20_ms", "p80_ms", "speedup", "gbs", "tflops", "roof_pct"):
            assert r[field] is not None, (field, r)
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    backends = {r["backend"] for r in rows}
    assert {"torch-dense", "dense", "torch-csr", "torch-bsr", "auto"} <= backends
    autos = [r for r in rows if r["kind"] == "auto"]
    assert len(autos) == 4 and all(r["auto_pick"] and isinstance(r["promise_ok"], bool) for r in autos)
    for key in ("speedup_png", "roofline_png"):
        png = env / "results" / data["files"][key].rsplit("/", 1)[-1]
        blob = png.read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 8_000, (key, len(blob))
        import matplotlib.image

        assert matplotlib.image.imread(png).shape[0] > 200


def test_compare_prints_ratios(env, capsys):
    first = _tiny_run(env / "a", rows=(1,), patterns=("2:4",), show=False, plots=False)
    old = first["files"]["json"]
    second = _tiny_run(None, rows=(1,), patterns=("2:4",), show=True, compare=old)
    printed = capsys.readouterr().out
    assert "compare with" in printed and "new/old" in printed
    diffs = report.compare_rows(second, runner.load(old))
    assert len(diffs) == len(first["rows"]) >= 4 and all(d["time_ratio"] > 0 for d in diffs)


def test_cli_bench_and_bad_compare_file(env, capsys, monkeypatch):
    monkeypatch.setattr(runner, "measure_roofline", lambda *a, **k: ROOF)
    monkeypatch.setattr(runner, "QUICK", TINY)
    out = env / "cli"
    argv = ["bench", "--quick", "--device", "cpu", "--suite", "layer", "--shapes", "vit-b.attn", "--rows", "1",
            "--patterns", "2:4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "layer suite" in printed and "promise" in printed
    (json_file,) = out.glob("*.json")
    assert cli.main([*argv, "--no-out", "--compare", str(json_file)]) == 0
    assert "compare with" in capsys.readouterr().out
    bogus = env / "bogus.json"
    bogus.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a sparsekern bench results file"):
        runner.load(bogus)
    with pytest.raises(ValueError, match="suites: expected"):
        runner.run(suites=("layers",), out=None, show=False)
    with pytest.raises(ValueError, match="shapes: expected"):
        layer.cases(Context(torch.device("cpu"), torch.float32, TINY, ROOF), shapes=("llama99b",))
    with pytest.raises(ValueError, match="pattern: expected"):
        layer.parse_pattern("half")


def test_quantized_patterns_run_with_their_real_bytes(env):
    patterns = ("2:4", "2:4+int8", "2:4+int4g128z", "block32x32:0.5+int4g16z")
    res = _tiny_run(None, rows=(1,), patterns=patterns, show=False)
    rows = {(r["pattern"], r["backend"]): r for r in res["rows"]}
    cpu8, cpu4, cpu16 = rows[("2:4+int8", "cpu")], rows[("2:4+int4g128z", "cpu")], rows[("2:4", "cpu")]
    # 768x768 at 2:4: kept 768*384; meta 2 bits each; scales per row (int8) / per group (int4, + zeros)
    kept, meta = 768 * 384, 768 * 384 // 4
    io = (768 + 768) * 4
    assert cpu8["bytes"] == kept + meta + 768 * 4 + io
    assert cpu4["bytes"] == kept // 2 + meta + 768 * 6 * (4 + 1) + io
    assert cpu16["bytes"] == kept * 4 + meta + io
    assert rows[("2:4+int8", "auto")]["auto_pick"]
    # block 32x32 at 50%: 288 of 576 blocks, int4 (512 bytes each); per 16 columns of a block row
    # an fp32 scale and an int8 zero; crow 25 + col 288 int32
    blk = rows[("block32x32:0.5+int4g16z", "cpu")]
    assert blk["bytes"] == 288 * 512 + 288 * 32 * 2 * (4 + 1) + 4 * (25 + 288) + io
    assert rows[("block32x32:0.5+int4g16z", "auto")]["auto_pick"]
    with pytest.raises(ValueError, match="quant suffix"):
        layer.parse_pattern("2:4+int3")
    with pytest.raises(ValueError, match="N:M only"):
        layer.parse_pattern("block32x32:0.9+int8a32")
    with pytest.raises(ValueError, match="need an N:M or block pattern"):
        layer.parse_pattern("dense+int8")


def test_attention_case_small(env):
    ctx = Context(torch.device("cpu"), torch.float32, TINY, ROOF)
    rows = attention._run_case(ctx, "decode", 2, 1, 256, 64, 0.25)
    by = {r["backend"]: r for r in rows}
    assert {"sdpa", "gather+sdpa", "reference", "auto"} <= set(by)
    assert by["sdpa"]["speedup"] == 1.0 and by["auto"]["auto_pick"] in by
    assert all(r["kept"] == 64 for r in rows)


def test_timing_and_roofline_measure_something():
    assert quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.5) == 3.0
    assert quantile([1.0, 2.0], 0.2) == pytest.approx(1.2)
    a = torch.randn(64, 64)
    t = measure(torch.mm, [(a, a), (a.clone(), a)], torch.device("cpu"), TINY)
    assert t.reps >= 3 and 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    roof = measure_roofline(torch.device("cpu"), torch.float32, copy_mib=8, n=128)
    assert 0 < roof.bandwidth_gbs < 1e5 and 0 < roof.peak_tflops < 1e4  # positive, finite, plausible
    assert roof.percent(flops=1e6, nbytes=0, seconds=1e6 / (roof.peak_tflops * 1e12)) == pytest.approx(100.0)


def test_model_suite_tiny_llama(env, monkeypatch):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig

    from sparsekern.bench import model

    tiny = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=256,
    )  # fmt: skip
    monkeypatch.setattr(model, "_config", lambda ctx: tiny)
    ctx = Context(torch.device("cpu"), torch.float32, TINY, ROOF, quick=True)
    (case,) = model.cases(ctx)
    rows = case.run(ctx)
    assert not [n for n in ctx.notes if "failed" in n], ctx.notes
    assert [r["pattern"] for r in rows] == ["dense", "2:4"]
    dense, sparse = rows
    assert sparse["weights_mb"] < dense["weights_mb"]
    assert sparse["decode_tokens_per_s"] > 0 and sparse["speedup"] > 0 and "promise_ok" in sparse
