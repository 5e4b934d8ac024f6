"""Policy backends: what turns rendered prompts into sampled token ids for the difficulty rollouts.

:class:`PolicyBackend` is the interface; :func:`make_backend` picks one by name. ``torch`` (the default, CPU,
extra ``policy``) runs :class:`TorchDecoder`; ``vllm`` (extra ``vllm``, for a GPU) runs :class:`VllmBackend`. Both
are imported lazily, so selecting one never imports the other.

The torch decoder batches prompts x K samples through one KV-cached decode loop, and its token ids do not depend
on the batch: the same ids come out whether a prompt is decoded alone or next to any other prompts. That takes
three things, because CPU GEMM kernels give a row different low bits depending on how many rows share the call:

- every linear layer runs on fixed tiles of :data:`ROW_TILE` rows (the last tile zero-padded): a row's result
  then depends only on its own input, whatever its position in the tile or the other rows (checked on this
  machine's kernels by ``test_rollouts.py``);
- attention runs per prompt over that prompt's own cache (the K samples of one prompt always have the same
  length), so there is no padding and no cross-prompt attention arithmetic;
- each prompt draws from its own generator K uniforms per step (a finished row's is drawn and unused), so its
  random stream does not depend on which of its rows are still running or on the other prompts; the token is
  the uniform's inverse CDF over the row's nucleus (:func:`nucleus_draw`).

A prompt is prefilled alone (its own length, batch 1) and its cache copied to K rows. Finished rows leave the
batch at once (per-row stopping) and waiting prompts take their place, so the batch stays full.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from posttrain_assets.rl.rollouts import SamplingParams

BACKENDS = ("torch", "vllm")
# Rows per linear-layer call. Changing it changes the low bits of every logit, hence the sampled ids: it is part
# of the rollout procedure (rollouts.ROLLOUT_VERSION).
ROW_TILE = 16
# Rows decoded together by default (prompts x K): 64 keeps the 2-core machines busy without swapping.
DEFAULT_MAX_ROWS = 64


class PolicyBackendError(RuntimeError):
    """A backend was selected that is unknown or not installed."""


class PolicyBackend(Protocol):
    """Samples K continuations of each prompt.

    ``prompts`` are token ids (chat template applied, generation prompt included); ``prompt_seeds`` one integer
    seed per prompt. Returns ``[prompt][sample] -> new token ids``, cut after the first id in ``end_ids`` (kept)
    or at ``sampling.max_new_tokens``. The same prompt and seed must give the same ids whatever else is batched.
    """

    name: str

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_seeds: Sequence[int],
        sampling: SamplingParams,
        end_ids: Sequence[int],
    ) -> list[list[list[int]]]: ...


def make_backend(name: str, model_loader: object, *, max_rows: int = DEFAULT_MAX_ROWS) -> PolicyBackend:
    """The backend called ``name``. ``model_loader`` is a no-argument callable returning the torch model (torch
    backend) or the policy's GGUF path and tokenizer directory (vLLM backend, see :class:`VllmBackend`)."""
    if name == "torch":
        return TorchDecoder(model_loader, max_rows=max_rows)  # type: ignore[arg-type]
    if name == "vllm":
        return VllmBackend(model_loader)  # type: ignore[arg-type]
    raise PolicyBackendError(f"unknown policy backend {name!r}: choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- torch (CPU)


def tiled_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a 2-D ``x``, computed :data:`ROW_TILE` rows at a time so each row's result is the same
    whatever the other rows are (the last tile is zero-padded)."""
    import torch

    rows = x.shape[0]
    padded = -rows % ROW_TILE
    if padded:
        x = torch.cat([x, x.new_zeros(padded, x.shape[1])])
    out = torch.cat([torch.nn.functional.linear(tile, layer.weight, layer.bias) for tile in x.split(ROW_TILE)])
    return out[:rows]


# Tokens looked at before sorting the whole vocabulary: the nucleus of almost every row is inside them.
NUCLEUS_CANDIDATES = 1024


def nucleus_draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits``, by inverse CDF with ``uniforms`` (one in [0, 1) per row) over the row's
    nucleus: the most likely tokens, in descending order, each kept while the tokens ranked above it hold less
    than ``top_p`` of the probability (``logits / temperature``). Every row is computed on its own: the same row
    and uniform give the same token whatever the other rows are."""

    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p >= 1.0:
        cdf = probs.cumsum(dim=-1)
        order = None
    else:
        candidates = min(NUCLEUS_CANDIDATES, probs.shape[-1])
        values, order = probs.topk(candidates, dim=-1, sorted=True)
        before = values.cumsum(dim=-1) - values
        overflow = (before[:, -1] < top_p).nonzero().flatten()
        if overflow.numel():
            # The nucleus may reach past the candidates: sort those rows' whole vocabulary.
            full_values, full_order = probs[overflow].sort(dim=-1, descending=True)
            full_before = full_values.cumsum(dim=-1) - full_values
            full_values = full_values.masked_fill(full_before >= top_p, 0.0)
            picked = _inverse_cdf(full_values.cumsum(dim=-1), uniforms[overflow])
            values = values.masked_fill(before >= top_p, 0.0)
            drawn = order.gather(-1, _inverse_cdf(values.cumsum(dim=-1), uniforms)[:, None]).squeeze(-1)
            drawn[overflow] = full_order.gather(-1, picked[:, None]).squeeze(-1)
            return drawn
        cdf = values.masked_fill(before >= top_p, 0.0).cumsum(dim=-1)
    picked = _inverse_cdf(cdf, uniforms)
    return picked if order is None else order.gather(-1, picked[:, None]).squeeze(-1)


def _inverse_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative mass exceeds ``uniform * total`` (clamped to the last
    position with mass, so rounding can never pick a token outside the nucleus)."""
    import torch

    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf.contiguous(), target, right=True).squeeze(-1)
    last = (cdf < cdf[:, -1:]).sum(dim=-1)  # the last position that adds mass
    return torch.minimum(picked, last)


@dataclass
class _Group:
    """One prompt being decoded: its K rows, the ones still running, and its per-layer KV cache."""

    index: int
    generator: torch.Generator
    k: int
    length: int  # tokens in the cache (prompt + generated so far)
    running: list[int]  # sample indices still decoding, in order
    keys: list[torch.Tensor]  # per layer: [running, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    outputs: list[list[int]] = field(default_factory=list)


class TorchDecoder:
    """The torch backend: a Llama-architecture ``model`` decoded on CPU, batch-invariant (see the module doc).

    ``model_loader`` returns the model (loaded once per process by :func:`rollouts.load_policy_model`).
    ``max_rows``: rows (prompts x K) decoded together; a prompt is admitted only when all its K rows fit, and
    always when nothing else is running. It changes speed and memory, never the ids.
    """

    name = "torch"

    def __init__(self, model_loader: object, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self._loader = model_loader
        self.max_rows = max_rows

    def model(self) -> PreTrainedModel:
        return self._loader()  # type: ignore[operator]

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_seeds: Sequence[int],
        sampling: SamplingParams,
        end_ids: Sequence[int],
    ) -> list[list[list[int]]]:
        import torch

        if len(prompts) != len(prompt_seeds):
            raise ValueError("one seed per prompt is needed")
        if not prompts:
            return []
        model = self.model()
        results: list[list[list[int]] | None] = [None] * len(prompts)
        waiting = list(range(len(prompts)))
        running: list[_Group] = []
        ends = set(int(i) for i in end_ids)
        with torch.inference_mode():
            while waiting or running:
                while waiting and (not running or sum(len(g.running) for g in running) + sampling.k <= self.max_rows):
                    index = waiting.pop(0)
                    group = self._prefill(model, index, prompts[index], prompt_seeds[index], sampling, ends)
                    if group.running:
                        running.append(group)
                    else:
                        results[index] = group.outputs
                for group in [g for g in running if not g.running]:
                    running.remove(group)
                    results[group.index] = group.outputs
                if not running:
                    continue
                self._step(model, running, sampling, ends)
                for group in [g for g in running if not g.running]:
                    running.remove(group)
                    results[group.index] = group.outputs
        return [r for r in results if r is not None]

    # One prompt alone through the model: its cache, copied to K rows, and the first token of each sample.
    def _prefill(
        self,
        model: PreTrainedModel,
        index: int,
        prompt: Sequence[int],
        seed: int,
        sampling: SamplingParams,
        ends: set[int],
    ) -> _Group:
        import torch

        ids = torch.tensor([list(prompt)], dtype=torch.long)
        out = model(input_ids=ids, use_cache=True)
        capacity = len(prompt) + sampling.max_new_tokens
        keys, values = [], []
        for layer in out.cache.layers:
            for store, cached in ((keys, layer.keys), (values, layer.values)):
                full = cached.new_zeros(sampling.k, cached.shape[1], capacity, cached.shape[3])
                full[:, :, : len(prompt)] = cached[0]
                store.append(full)
        group = _Group(
            index=index,
            generator=torch.Generator().manual_seed(seed),
            k=sampling.k,
            length=len(prompt),
            running=list(range(sampling.k)),
            keys=keys,
            values=values,
            outputs=[[] for _ in range(sampling.k)],
        )
        logits = out.logits[0, -1:].expand(sampling.k, -1)
        self._draw(group, logits, sampling, ends)
        return group

    # Draw the next token of each running row of ``group`` from ``logits`` ([running, vocab]); retire finished rows.
    def _draw(self, group: _Group, logits: torch.Tensor, sampling: SamplingParams, ends: set[int]) -> None:
        import torch

        # K uniforms per prompt and step, finished rows included, so the prompt's random stream is the same
        # whichever of its rows are still running.
        uniforms = torch.rand(group.k, generator=group.generator, dtype=torch.float64)[group.running]
        drawn = nucleus_draw(logits, uniforms, sampling.temperature, sampling.top_p)
        keep = []
        for position, (sample, token) in enumerate(zip(group.running, drawn.tolist(), strict=True)):
            group.outputs[sample].append(token)
            if token not in ends and len(group.outputs[sample]) < sampling.max_new_tokens:
                keep.append(position)
        if len(keep) < len(group.running):
            group.running = [group.running[p] for p in keep]
            rows = torch.tensor(keep, dtype=torch.long)
            group.keys = [k.index_select(0, rows) for k in group.keys]
            group.values = [v.index_select(0, rows) for v in group.values]

    # One decode step for every running row: each row feeds its last token.
    def _step(self, model: PreTrainedModel, groups: list[_Group], sampling: SamplingParams, ends: set[int]) -> None:
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        base = model.model
        config = model.config
        heads = config.num_attention_heads
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        sizes = [len(g.running) for g in groups]
        last = [g.outputs[s][-1] for g in groups for s in g.running]
        positions = torch.tensor([[g.length] for g in groups for _ in g.running], dtype=torch.long)
        hidden = base.embed_tokens(torch.tensor(last, dtype=torch.long))  # [rows, hidden]
        cos, sin = base.rotary_emb(hidden[:, None, :], positions)
        for number, layer in enumerate(base.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = tiled_linear(attn.q_proj, x).view(-1, 1, heads, head_dim).transpose(1, 2)
            k = tiled_linear(attn.k_proj, x).view(-1, 1, kv_heads, head_dim).transpose(1, 2)
            v = tiled_linear(attn.v_proj, x).view(-1, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outputs = []
            for group, gq, gk, gv in zip(groups, q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
                cache_k, cache_v = group.keys[number], group.values[number]
                cache_k[:, :, group.length : group.length + 1] = gk
                cache_v[:, :, group.length : group.length + 1] = gv
                span = group.length + 1
                outputs.append(
                    torch.nn.functional.scaled_dot_product_attention(
                        gq, cache_k[:, :, :span], cache_v[:, :, :span], scale=attn.scaling, enable_gqa=True
                    )
                )
            attended = torch.cat(outputs).transpose(1, 2).reshape(-1, heads * head_dim)
            hidden = hidden + tiled_linear(attn.o_proj, attended)
            x = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            gated = mlp.act_fn(tiled_linear(mlp.gate_proj, x)) * tiled_linear(mlp.up_proj, x)
            hidden = hidden + tiled_linear(mlp.down_proj, gated)
        logits = tiled_linear(model.lm_head, base.norm(hidden))
        for group, group_logits in zip(groups, logits.split(sizes), strict=True):
            group.length += 1
            self._draw(group, group_logits, sampling, ends)


# --------------------------------------------------------------------------- vLLM (GPU, optional)


class VllmBackend:
    """The vLLM backend (extra ``vllm``; needs a GPU): ``model_loader`` returns ``(gguf_path, tokenizer_dir)``.

    Each prompt is one request with ``n = K`` and its own ``seed``, so its samples do not depend on the batch;
    they differ from the torch backend's (another sampler), which is why the backend is part of the lineage.
    """

    name = "vllm"

    def __init__(self, model_loader: object) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise PolicyBackendError(
                "policy backend 'vllm' is selected but vLLM is not installed: install the optional extra "
                "(pip install 'posttrain-assets[vllm]', on a machine with a GPU) or choose the 'torch' backend"
            ) from exc
        self._loader = model_loader
        self._llm: object | None = None

    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        prompt_seeds: Sequence[int],
        sampling: SamplingParams,
        end_ids: Sequence[int],
    ) -> list[list[list[int]]]:
        import vllm
        from vllm.inputs import TokensPrompt

        if self._llm is None:
            gguf_path, tokenizer_dir = self._loader()  # type: ignore[operator]
            self._llm = vllm.LLM(model=str(gguf_path), tokenizer=str(tokenizer_dir), seed=0)
        params = [
            vllm.SamplingParams(
                n=sampling.k,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=seed % (2**31),
                stop_token_ids=list(end_ids),
                skip_special_tokens=False,
            )
            for seed in prompt_seeds
        ]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self._llm.generate(requests, params, use_tqdm=False)  # type: ignore[attr-defined]
        return [[list(sample.token_ids) for sample in out.outputs] for out in outputs]


def default_backend_name() -> str:
    """The backend named by ``POSTTRAIN_POLICY_BACKEND`` (default ``torch``)."""
    return os.environ.get("POSTTRAIN_POLICY_BACKEND") or "torch"
