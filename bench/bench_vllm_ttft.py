"""Time to first token and decode step under vLLM (offline ``vllm.LLM``), one folder per process.

    .venv-vllm/bin/python bench/bench_vllm_ttft.py DIR [--sparse] [--requests 8]

Runs fp32, ``enforce_eager``, a 41-token prompt: ``max_tokens=1`` (prefill and the first token)
and ``max_tokens=17`` in alternation, medians over ``--requests`` pairs after 3 warm-ups; the
decode step is their difference over 16. Then ``max_tokens=1`` on fresh prompts (no prefix-cache
hit). ``--sparse`` serves with ``quantization="sparsekern"``. Folders:
``tests/vllm/vllm_folders.py DIR PATTERN LAYERS``. Run alone on the machine.
"""

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--sparse", action="store_true")
    ap.add_argument("--requests", type=int, default=8)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams

    kw = dict(dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    if args.sparse:
        kw["quantization"] = "sparsekern"
    llm = LLM(model=args.folder, **kw)
    prompt = {"prompt_token_ids": [1, *range(700, 740)]}
    one = SamplingParams(temperature=0.0, max_tokens=1)
    many = SamplingParams(temperature=0.0, max_tokens=17, min_tokens=17)

    def timed(p, params) -> float:
        start = time.perf_counter()
        llm.generate([p], params, use_tqdm=False)
        return time.perf_counter() - start

    for _ in range(3):
        timed(prompt, one)
    t1, t17 = [], []
    for _ in range(args.requests):
        t1.append(timed(prompt, one))
        t17.append(timed(prompt, many))
    m1, m17 = statistics.median(t1) * 1e3, statistics.median(t17) * 1e3
    fresh = [timed({"prompt_token_ids": [1, *range(1000 + 50 * i, 1040 + 50 * i)]}, one) for i in range(6)]
    print(f"{args.folder}: first token {m1:.1f} ms (same prompt), {statistics.median(fresh) * 1e3:.1f} ms "
          f"(fresh prompts); decode step {(m17 - m1) / 16:.1f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
