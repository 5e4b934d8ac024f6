"""Policy backends: what turns rendered prompts into sampled token ids for the difficulty rollouts.

:class:`PolicyBackend` is the interface; :func:`make_backend` picks one by name. ``torch`` (the default, CPU,
extra ``policy``) runs :class:`TorchDecoder`; ``vllm`` (extra ``vllm``, for a GPU) runs :class:`VllmBackend`. Both
are imported lazily, so selecting one never imports the other.

The torch decoder batches prompts x K samples through one KV-cached decode loop, and its token ids do not depend
on the batch: the same ids come out whether a prompt is decoded alone or next to any other prompts. That takes
three things, because CPU GEMM kernels give a row different low bits depending on how many rows share the call:

- every matrix product runs on fixed tiles of :data:`ROW_TILE` rows (the last tile zero-padded): a row's result
  then depends only on its own input, whatever its position in the tile or the other rows (checked on this
  machine's kernels, in float32 and bfloat16, by ``test_rollouts.py``);
- attention never mixes prompts' arithmetic: in the prefill it runs per prompt over the prompt alone; in a decode
  step, the prompts whose caches have the same padded length (the prompt's own length rounded up to
  :data:`PREFIX_BUCKET`, the padding masked) and the same generated length share one set of products, each prompt
  its own batch entries of them (its keys read once for its K rows, then each row's own generated keys), so every
  shape a row's scores, softmax and sums see depends on its own prompt alone;
- each prompt draws from its own generator K uniforms per step (a finished row's is drawn and unused), so its
  random stream does not depend on which of its rows are still running or on the other prompts; the token is
  the uniform's inverse CDF over the row's nucleus (:func:`nucleus_draw`).

The prompts admitted together are prefilled together (their tokens share the matrix products' tiles). Finished
rows leave the batch at once (per-row stopping) and waiting prompts take their place, so the batch stays full.
The model's own forward is not used: the decoder runs one weight layout (:class:`_Stack`: q/k/v and gate/up
fused, matrices in :data:`MATMUL_DTYPE`) for both the prefill and the decode step, with the residual stream,
norms, rotary embedding, attention and sampling in float32 (the logits are the bfloat16 products' output, as in
bf16 inference engines). The ids do not depend on torch's thread count either (checked on the real model).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from posttrain_assets.rl.rollouts import SamplingParams

BACKENDS = ("torch", "vllm")
# Rows per linear-layer call (as many as DEFAULT_MAX_ROWS: the weights are read once per step; a 128-row product
# runs at 350-400 GFLOP/s here, two 64-row ones at 250-330). Changing it changes the low bits of every logit, hence
# the sampled ids: it is part of the rollout procedure (rollouts.ROLLOUT_VERSION).
ROW_TILE = 128
# Rows decoded together by default (prompts x K).
DEFAULT_MAX_ROWS = 128
# The dtype of every matrix product's operands (float32 accumulation): bfloat16 runs on the CPUs' AVX-512 BF16
# units (several times float32's rate here). Part of the rollout procedure like ROW_TILE.
MATMUL_DTYPE = "bfloat16"


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

    def model_eos_ids(self) -> int | list[int] | None:
        """The end-of-sequence id(s) the model's own config names (None: the tokenizer's are used alone)."""
        ...


def make_backend(name: str, model_loader: object, *, max_rows: int = DEFAULT_MAX_ROWS) -> PolicyBackend:
    """The backend called ``name``. ``model_loader`` is a no-argument callable returning the torch model (torch
    backend) or the policy's GGUF path and tokenizer directory (vLLM backend, see :class:`VllmBackend`)."""
    if name == "torch":
        return TorchDecoder(model_loader, max_rows=max_rows)  # type: ignore[arg-type]
    if name == "vllm":
        return VllmBackend(model_loader)  # type: ignore[arg-type]
    raise PolicyBackendError(f"unknown policy backend {name!r}: choose one of {', '.join(BACKENDS)}")


# --------------------------------------------------------------------------- torch (CPU)


def tiled_matmul(x: torch.Tensor, weight: torch.Tensor, tile: int = ROW_TILE) -> torch.Tensor:
    """``x @ weight.T`` (``weight`` is ``[out, in]``, ``x`` is cast to its dtype), computed ``tile`` rows at a time so
    each row's result is the same whatever the other rows are (the last tile is zero-padded)."""
    import torch

    x = x.to(weight.dtype)
    rows = x.shape[0]
    padded = -rows % tile
    if padded:
        x = torch.cat([x, x.new_zeros(padded, x.shape[1])])
    if x.shape[0] == tile:
        return torch.nn.functional.linear(x, weight)[:rows]
    return torch.cat([torch.nn.functional.linear(part, weight) for part in x.split(tile)])[:rows]


# Positions a prompt's cache is padded to a multiple of (masked): prompts whose padded lengths and generated
# lengths are equal share one set of attention products in a decode step. Part of the rollout procedure (the
# softmax's length changes a row's low bits).
PREFIX_BUCKET = 64

# Probability floors tried, largest first, before a row's whole vocabulary is sorted: a row's nucleus is inside the
# tokens at or above a floor when they hold at least top_p + NUCLEUS_MARGIN of its probability (any token below the
# floor has that much above it, so it cannot be kept). The margin covers the rounding between this sum and the
# sorted cumulative sum. Sorting a few hundred candidates instead of a full top-k of 49k keeps sampling cheap.
NUCLEUS_FLOORS = (1e-4, 1e-6)
NUCLEUS_MARGIN = 1e-4


def nucleus_draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits``, by inverse CDF with ``uniforms`` (one in [0, 1) per row) over the row's
    nucleus: the most likely tokens, in descending order (ties by token id), each kept while the tokens ranked
    above it hold less than ``top_p`` of the probability (``logits / temperature``). Every row is computed on its
    own: the same row and uniform give the same token whatever the other rows are (a stable sort's order is
    unique, and the zeros a row is padded with sort after its candidates and add nothing to its sums)."""
    import torch

    probs = logits.float()
    if temperature != 1.0:
        probs = probs / temperature
    probs = probs.softmax(dim=-1)
    if top_p >= 1.0:
        return _inverse_cdf(probs.cumsum(dim=-1), uniforms)
    rows = probs.shape[0]
    drawn = torch.empty(rows, dtype=torch.long)
    pending = torch.arange(rows)
    # Each floor in turn, largest first, takes the rows whose tokens at or above it hold enough mass; the rows no
    # floor takes (flat ones) sort their whole vocabulary. Which floor takes a row does not change its token: the
    # nucleus is inside the candidates of every floor that takes it, and its sorted prefix sums are the same.
    for floor in sorted(NUCLEUS_FLOORS, reverse=True):
        part = probs if len(pending) == rows else probs[pending]
        where = (part >= floor).nonzero()  # (row, token) of every candidate, row by row, tokens ascending
        candidates = part[where[:, 0], where[:, 1]]
        mass = torch.zeros(len(part), dtype=part.dtype).index_add_(0, where[:, 0], candidates)
        taken = mass >= top_p + NUCLEUS_MARGIN
        if taken.any():
            kept = taken[where[:, 0]]
            rank = taken.cumsum(0) - 1  # a taken row's number among the taken rows
            row, token, candidates = rank[where[kept, 0]], where[kept, 1], candidates[kept]
            counts = torch.bincount(row, minlength=int(taken.sum()))
            slot = torch.arange(len(row)) - (counts.cumsum(0) - counts)[row]
            values = torch.zeros(len(counts), int(counts.max()))
            values[row, slot] = candidates
            tokens = torch.zeros(values.shape, dtype=torch.long)
            tokens[row, slot] = token
            drawn[pending[taken]] = _nucleus_pick(values, tokens, uniforms[pending[taken]], top_p)
        pending = pending[~taken]
        if not len(pending):
            return drawn
    vocabulary = torch.arange(probs.shape[1])[None]
    for row in pending.tolist():
        drawn[row] = _nucleus_pick(probs[row : row + 1], vocabulary, uniforms[row : row + 1], top_p)[0]
    return drawn


def _nucleus_pick(values: torch.Tensor, tokens: torch.Tensor, uniforms: torch.Tensor, top_p: float) -> torch.Tensor:
    """The drawn token of each row of ``values`` (probabilities, zero-padded) and their ``tokens``."""
    values, order = values.sort(dim=-1, descending=True, stable=True)
    before = values.cumsum(dim=-1) - values
    cdf = values.masked_fill(before >= top_p, 0.0).cumsum(dim=-1)
    return tokens.gather(-1, order.gather(-1, _inverse_cdf(cdf, uniforms)[:, None])).squeeze(-1)


def _inverse_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative mass exceeds ``uniform * total`` (clamped to the last
    position with mass, so rounding can never pick a token outside the nucleus)."""
    import torch

    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf.contiguous(), target, right=True).squeeze(-1)
    last = (cdf < cdf[:, -1:]).sum(dim=-1)  # the last position that adds mass
    return torch.minimum(picked, last)


@dataclass
class _Layer:
    """One decoder layer's weights as the decode loop uses them: the RMSNorm scales in float32, the projections in
    the matmul dtype, q/k/v fused into one matrix and gate/up into another (one tiled matmul each)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


@dataclass
class _Stack:
    """A Llama-architecture model laid out for :class:`TorchDecoder` (built once per model and matmul dtype)."""

    embed: torch.Tensor  # float32 [vocab, hidden]
    layers: list[_Layer]
    norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    cos: torch.Tensor  # float32 [positions, head_dim]: the rotary table, looked up by position
    sin: torch.Tensor

    @classmethod
    def of(cls, model: PreTrainedModel, dtype: torch.dtype) -> _Stack:
        import torch

        base = model.model
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if getattr(config, "hidden_act", "silu") != "silu":
            raise PolicyBackendError(f"the torch decoder needs a SiLU MLP, the model has {config.hidden_act!r}")
        layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
                raise PolicyBackendError("the torch decoder needs attention projections without bias")
            layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight.detach().float(),
                    qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().to(dtype),
                    o=attn.o_proj.weight.detach().to(dtype),
                    post_norm=layer.post_attention_layernorm.weight.detach().float(),
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().to(dtype),
                    down=mlp.down_proj.weight.detach().to(dtype),
                )
            )
        positions = torch.arange(config.max_position_embeddings)[None]
        probe = torch.zeros(1, 1, head_dim)
        cos, sin = base.rotary_emb(probe, positions)
        return cls(
            embed=base.embed_tokens.weight.detach().float(),
            layers=layers,
            norm=base.norm.weight.detach().float(),
            lm_head=model.lm_head.weight.detach().to(dtype),
            eps=float(config.rms_norm_eps),
            heads=heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            scaling=head_dim**-0.5,
            cos=cos[0].float(),
            sin=sin[0].float(),
        )

    def rms_norm(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), weight, self.eps)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary position embedding of ``x`` ([rows, heads, head_dim], float32) at ``positions`` ([rows])."""
        import torch

        cos = self.cos[positions][:, None]
        sin = self.sin[positions][:, None]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def qkv(self, layer: _Layer, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries [rows, heads, head_dim], keys and values [rows, kv_heads, head_dim] of ``hidden``, rotated
        (float32: attention runs in float32, where the CPU kernels are fast for its small per-prompt products)."""
        fused = tiled_matmul(self.rms_norm(hidden, layer.input_norm), layer.qkv).float()
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = fused.split([q_width, kv_width, kv_width], dim=-1)
        q = self.rotate(q.reshape(-1, self.heads, self.head_dim), positions)
        k = self.rotate(k.reshape(-1, self.kv_heads, self.head_dim), positions)
        return q, k, v.reshape(-1, self.kv_heads, self.head_dim)

    def finish_layer(self, layer: _Layer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of a layer after attention: output projection, residual, MLP, residual (float32 residual)."""
        import torch

        hidden = hidden + tiled_matmul(attended, layer.o).float()
        gate, up = tiled_matmul(self.rms_norm(hidden, layer.post_norm), layer.gate_up).chunk(2, dim=-1)
        return hidden + tiled_matmul(torch.nn.functional.silu(gate) * up, layer.down).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return tiled_matmul(self.rms_norm(hidden, self.norm), self.lm_head).float()


@dataclass
class _Group:
    """One prompt being decoded: its K rows, the ones still running, and where its KV cache is (``place`` in a
    :class:`_Block`): the prompt's keys and values once for all K rows, zero-padded to a multiple of
    :data:`PREFIX_BUCKET` positions, and each row's own generated ones (a finished row keeps its slot, unused)."""

    index: int
    generator: torch.Generator
    k: int
    length: int  # tokens in the cache (prompt + generated so far)
    prefix_length: int  # the prompt's tokens
    running: list[int]  # sample indices still decoding, in order
    block: _Block  # where its caches are
    place: int  # its position in the block
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def keys(self) -> torch.Tensor:
        """The rows' own keys, [layers, kv_heads, K, max_new_tokens, head_dim] (a view into the block)."""
        return self.block.keys[:, self.place]

    @property
    def values(self) -> torch.Tensor:
        return self.block.values[:, self.place]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """This step's keys and values of the running rows ([rows, kv_heads, head_dim]) into their own caches."""
        import torch

        written = self.length - self.prefix_length
        rows = slice(None) if len(self.running) == self.k else torch.tensor(self.running, dtype=torch.long)
        self.keys[layer][:, rows, written] = keys.transpose(0, 1)
        self.values[layer][:, rows, written] = values.transpose(0, 1)

    @property
    def bucket(self) -> tuple[int, int]:
        """What the prompts whose attention runs together share: padded prompt length and generated length."""
        return self.block.width, self.length - self.prefix_length


class _Block:
    """The caches of prompts prefilled together with the same padded length, side by side: the prompts' keys and
    values [layers, prompts, kv_heads, padded length, head_dim] (zero padding) and their rows' own generated ones
    [layers, prompts, kv_heads, K, max_new_tokens, head_dim]."""

    def __init__(self, prompts: int, width: int, stack: _Stack, sampling: SamplingParams) -> None:
        import torch

        layers, kv_heads, head_dim = len(stack.layers), stack.kv_heads, stack.head_dim
        self.width = width
        self.prefix_keys = torch.zeros(layers, prompts, kv_heads, width, head_dim)
        self.prefix_values = torch.zeros(layers, prompts, kv_heads, width, head_dim)
        rows = (layers, prompts, kv_heads, sampling.k, sampling.max_new_tokens, head_dim)
        self.keys = torch.zeros(rows)
        self.values = torch.zeros(rows)


_STACKS: dict[tuple[int, str], tuple[object, _Stack]] = {}


class TorchDecoder:
    """The torch backend: a Llama-architecture ``model`` decoded on CPU, batch-invariant (see the module doc).

    ``model_loader`` returns the model (loaded once per process by :func:`rollouts.load_policy_model`).
    ``max_rows``: rows (prompts x K) decoded together; a prompt is admitted only when all its K rows fit, and
    always when nothing else is running. It changes speed and memory, never the ids. ``matmul_dtype``: the dtype
    of the weights and activations in every matrix product (float32 accumulation; the residual stream, norms,
    rotary embedding and sampling stay float32). It changes the ids (:data:`MATMUL_DTYPE` is rollout version 5's).
    """

    name = "torch"

    def __init__(
        self, model_loader: object, *, max_rows: int = DEFAULT_MAX_ROWS, matmul_dtype: str = MATMUL_DTYPE
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        if matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"matmul_dtype must be float32 or bfloat16, got {matmul_dtype!r}")
        self._loader = model_loader
        self.max_rows = max_rows
        self.matmul_dtype = matmul_dtype

    def model(self) -> PreTrainedModel:
        return self._loader()  # type: ignore[operator]

    def model_eos_ids(self) -> int | list[int] | None:
        return self.model().config.eos_token_id

    def stack(self) -> _Stack:
        """The model's weights laid out for decoding, built once per process (per model and matmul dtype)."""
        import torch

        model = self.model()
        key = (id(model), self.matmul_dtype)
        cached = _STACKS.get(key)
        if cached is None or cached[0] is not model:
            with torch.inference_mode():
                cached = (model, _Stack.of(model, getattr(torch, self.matmul_dtype)))
            _STACKS[key] = cached
        return cached[1]

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
        stack = self.stack()
        results: list[list[list[int]] | None] = [None] * len(prompts)
        waiting = list(range(len(prompts)))
        running: list[_Group] = []
        ends = set(int(i) for i in end_ids)
        with torch.inference_mode():
            while waiting or running:
                # Admit every waiting prompt whose K rows fit (the first one always, when nothing runs), and
                # prefill them together.
                admitted: list[int] = []
                rows = sum(len(g.running) for g in running)
                while waiting and (not (running or admitted) or rows + sampling.k <= self.max_rows):
                    admitted.append(waiting.pop(0))
                    rows += sampling.k
                if admitted:
                    groups, logits = self._prefill(
                        stack, admitted, [prompts[i] for i in admitted], [prompt_seeds[i] for i in admitted], sampling
                    )
                    running.extend(groups)
                    self._draw(groups, logits, sampling, ends)
                    self._retire(running, results)
                if running:
                    self._step(stack, running, sampling, ends)
                    self._retire(running, results)
        return [r for r in results if r is not None]

    @staticmethod
    def _retire(running: list[_Group], results: list[list[list[int]] | None]) -> None:
        for group in [g for g in running if not g.running]:
            running.remove(group)
            results[group.index] = group.outputs

    # The prompts through the model together (their tokens share the matrix products' tiles, each prompt attends
    # causally to itself alone): each prompt's cache and the logits of its next token, repeated for its K rows.
    def _prefill(
        self,
        stack: _Stack,
        indices: list[int],
        prompts: list[Sequence[int]],
        seeds: list[int],
        sampling: SamplingParams,
    ) -> tuple[list[_Group], torch.Tensor]:
        import torch

        lengths = [len(prompt) for prompt in prompts]
        for length in lengths:
            if length + sampling.max_new_tokens > stack.cos.shape[0]:
                raise PolicyBackendError(
                    f"prompt of {length} tokens + {sampling.max_new_tokens} new ones exceeds the model's "
                    f"{stack.cos.shape[0]} positions"
                )
        # One block of cache per padded length, holding its prompts side by side (in admission order), so the
        # prompts of a bucket are usually one slice of a block and a step reads their caches without a copy.
        padded = [-(-n // PREFIX_BUCKET) * PREFIX_BUCKET for n in lengths]
        blocks: dict[int, _Block] = {}
        places: list[tuple[_Block, int]] = []
        for width in padded:
            block = blocks.get(width)
            if block is None:
                block = blocks[width] = _Block(padded.count(width), width, stack, sampling)
            places.append((block, sum(1 for b, _ in places if b is block)))
        prefix_keys = [block.prefix_keys[:, position] for block, position in places]
        prefix_values = [block.prefix_values[:, position] for block, position in places]
        positions = torch.cat([torch.arange(n) for n in lengths])
        hidden = stack.embed[torch.tensor([t for prompt in prompts for t in prompt], dtype=torch.long)]
        for number, layer in enumerate(stack.layers):
            q, k, v = stack.qkv(layer, hidden, positions)
            attended = []
            for slot, (pq, pk, pv) in enumerate(zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)):
                length = len(pq)
                prefix_keys[slot][number, :, :length] = pk.transpose(0, 1)
                prefix_values[slot][number, :, :length] = pv.transpose(0, 1)
                out = torch.nn.functional.scaled_dot_product_attention(
                    pq.transpose(0, 1)[None],
                    prefix_keys[slot][number, :, :length][None],
                    prefix_values[slot][number, :, :length][None],
                    is_causal=True,
                    scale=stack.scaling,
                    enable_gqa=True,
                )
                attended.append(out[0].transpose(0, 1).reshape(len(pq), -1))
            hidden = stack.finish_layer(layer, hidden, torch.cat(attended))
        last = torch.tensor(lengths).cumsum(0) - 1
        logits = stack.logits(hidden[last])
        groups = [
            _Group(
                index=index,
                generator=torch.Generator().manual_seed(seed),
                k=sampling.k,
                length=length,
                prefix_length=length,
                running=list(range(sampling.k)),
                block=block,
                place=position,
                outputs=[[] for _ in range(sampling.k)],
            )
            for index, seed, length, (block, position) in zip(indices, seeds, lengths, places, strict=True)
        ]
        return groups, logits.repeat_interleave(sampling.k, dim=0)

    # Draw the next token of each running row of ``groups`` from ``logits`` (one row each, in order); retire
    # finished rows.
    def _draw(self, groups: list[_Group], logits: torch.Tensor, sampling: SamplingParams, ends: set[int]) -> None:
        import torch

        # K uniforms per prompt and step, finished rows included, so the prompt's random stream is the same
        # whichever of its rows are still running.
        uniforms = torch.cat([torch.rand(g.k, generator=g.generator, dtype=torch.float64)[g.running] for g in groups])
        drawn = nucleus_draw(logits, uniforms, sampling.temperature, sampling.top_p).tolist()
        offset = 0
        for group in groups:
            keep = []
            for position, sample in enumerate(group.running):
                token = drawn[offset + position]
                group.outputs[sample].append(token)
                if token not in ends and len(group.outputs[sample]) < sampling.max_new_tokens:
                    keep.append(position)
            offset += len(group.running)
            if len(keep) < len(group.running):
                group.running = [group.running[p] for p in keep]

    # One decode step for every running row: each row feeds its last token. The prompts are ordered by bucket, so
    # each bucket's rows are one slice of the batch (the order of rows never changes a row's result).
    def _step(self, stack: _Stack, groups: list[_Group], sampling: SamplingParams, ends: set[int]) -> None:
        import torch

        groups.sort(key=lambda g: (g.bucket, id(g.block), g.place))
        buckets: list[_Bucket] = []
        for _, members in itertools.groupby(groups, key=lambda g: g.bucket):
            buckets.append(_Bucket.of(list(members), sum(b.rows for b in buckets)))
        sizes = [len(g.running) for g in groups]
        last = [g.outputs[s][-1] for g in groups for s in g.running]
        positions = torch.tensor([g.length for g in groups for _ in g.running], dtype=torch.long)
        hidden = stack.embed[torch.tensor(last, dtype=torch.long)]  # [rows, hidden] float32
        for number, layer in enumerate(stack.layers):
            q, k, v = stack.qkv(layer, hidden, positions)
            for group, rows_k, rows_v in zip(groups, k.split(sizes), v.split(sizes), strict=True):
                group.write(number, rows_k, rows_v)
            attended = [bucket.attend(stack, number, q) for bucket in buckets]
            hidden = stack.finish_layer(layer, hidden, torch.cat(attended))
        logits = stack.logits(hidden)
        for group in groups:
            group.length += 1
        self._draw(groups, logits, sampling, ends)


@dataclass
class _Bucket:
    """Prompts whose decode-step attention runs in one set of products: same padded prompt length P and generated
    length S, so every row's scores, softmax and sums have shapes that depend on its own prompt alone (the padding
    it sees is its own prompt's, masked). Each prompt takes K query slots (a finished row's are zeros, dropped)."""

    groups: list[_Group]
    first: int  # the bucket's first row in the step's batch
    rows: int
    slots: torch.Tensor  # each running row's query slot: prompt number * K + sample index
    mask: torch.Tensor  # [prompts, 1, 1, 1, P]: 0 on a prompt's tokens, -inf on its padding

    @classmethod
    def of(cls, groups: list[_Group], first: int) -> _Bucket:
        import torch

        k = groups[0].k
        padded = groups[0].block.width
        slots = torch.tensor([n * k + s for n, g in enumerate(groups) for s in g.running], dtype=torch.long)
        mask = torch.zeros(len(groups), 1, 1, 1, padded)
        for n, group in enumerate(groups):
            mask[n, ..., group.prefix_length :] = float("-inf")
        return cls(groups, first, len(slots), slots, mask)

    def attend(self, stack: _Stack, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The attention output [rows, heads * head_dim] of the bucket's running rows (queries: their rows of
        ``q``, [batch rows, heads, head_dim]), over each prompt's keys (once for its K rows: one product per
        prompt and kv head, query heads and rows stacked) and each row's own generated keys. Query head h
        attends with kv head h // (heads / kv_heads), as in the model."""
        import torch

        groups, kv_heads, head_dim = self.groups, stack.kv_heads, stack.head_dim
        per_kv, k, prompts = stack.heads // kv_heads, groups[0].k, len(groups)
        padded, written = groups[0].bucket
        span = written + 1
        queries = q.new_zeros(prompts * k, stack.heads, head_dim)
        queries.index_copy_(0, self.slots, q[self.first : self.first + self.rows])
        # [prompts, kv, K * per_kv, head_dim]: a prompt's queries of one kv head, row by row.
        queries = (
            queries.view(prompts, k, kv_heads, per_kv, head_dim)
            .transpose(1, 2)
            .reshape(prompts, kv_heads, k * per_kv, head_dim)
        )
        block, first = groups[0].block, groups[0].place
        if all(g.block is block and g.place == first + n for n, g in enumerate(groups)):  # one slice of a block
            places = slice(first, first + prompts)
            prefix_keys = block.prefix_keys[layer, places]  # [prompts, kv, P, head_dim]
            prefix_values = block.prefix_values[layer, places]
            own_keys = block.keys[layer, places, :, :, :span]  # [prompts, kv, K, S, head_dim]
            own_values = block.values[layer, places, :, :, :span]
        else:
            prefix_keys = torch.stack([g.block.prefix_keys[layer, g.place] for g in groups])
            prefix_values = torch.stack([g.block.prefix_values[layer, g.place] for g in groups])
            own_keys = torch.stack([g.block.keys[layer, g.place, :, :, :span] for g in groups])
            own_values = torch.stack([g.block.values[layer, g.place, :, :, :span] for g in groups])
        scores_prefix = torch.matmul(queries, prefix_keys.transpose(-1, -2))  # [prompts, kv, K * per_kv, P]
        scores_prefix = scores_prefix.view(prompts, kv_heads, k, per_kv, padded) + self.mask
        scores_own = torch.matmul(
            queries.view(prompts, kv_heads, k, per_kv, head_dim), own_keys.transpose(-1, -2)
        )  # [prompts, kv, K, per_kv, S]
        weights = torch.cat([scores_prefix, scores_own], dim=-1).mul_(stack.scaling).softmax(dim=-1)
        out = torch.matmul(weights[..., :padded].reshape(prompts, kv_heads, k * per_kv, padded), prefix_values)
        out = out.view(prompts, kv_heads, k, per_kv, head_dim) + torch.matmul(weights[..., padded:], own_values)
        out = out.transpose(1, 2).reshape(prompts * k, stack.heads * head_dim)
        return out.index_select(0, self.slots)


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

    def model_eos_ids(self) -> int | list[int] | None:
        return None  # vLLM stops at the model's own eos by itself; the tokenizer's end ids are passed as well

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
    """The backend named by ``POSTTRAIN_POLICY_BACKEND`` (default ``torch``): what ``RolloutConfig.backend``
    uses when it is left empty."""
    from posttrain_assets.settings import policy_backend

    return policy_backend()
