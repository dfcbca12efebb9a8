"""Child process for the vLLM tests: greedy generation with ``vllm.LLM``, one request at a time.

Reads ``{"model", "prompts", "max_tokens", "llm": {extra LLM kwargs}}`` as JSON on stdin and
prints one line ``RESULT {"tokens": [[...], ...], "decode_tok_s": [...]}``. The engine starts
its own processes, hence the ``__main__`` guard. ``decode_tok_s``: each prompt also runs with
``max_tokens=1`` (prefill and the first token); the difference in wall time is the time of the
other ``max_tokens - 1`` tokens, one client, after a warm-up request.
"""

import json
import sys
import time


def main() -> None:
    req = json.load(sys.stdin)
    from vllm import LLM, SamplingParams

    kwargs = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "seed": 0, **req["llm"]}
    llm = LLM(model=req["model"], **kwargs)
    n = req["max_tokens"]
    greedy = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    tokens, rates = [], []
    for p in req["prompts"]:
        prompt = {"prompt_token_ids": p}
        llm.generate([prompt], first, use_tqdm=False)  # warm-up: plans, caches, allocator
        t0 = time.perf_counter()
        llm.generate([prompt], first, use_tqdm=False)
        t1 = time.perf_counter()
        out = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0]
        t2 = time.perf_counter()
        tokens.append(list(out.token_ids))
        rates.append((n - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    print("RESULT " + json.dumps({"tokens": tokens, "decode_tok_s": rates}), flush=True)


if __name__ == "__main__":
    main()
