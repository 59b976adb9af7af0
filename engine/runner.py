"""The model runner: turns an IterationPlan into one packed forward and an IterationResult.

It owns the KV pool tensors and nothing else that changes: block tables come in the plan, so
the runner is stateless between iterations (which is what makes preemption and aborts cheap).
Only the worker thread calls ``execute``.
"""

from __future__ import annotations

import contextlib
import time

import torch

from engine import cpu_kernels
from engine.attention import PagedAttentionMetadata, PrefillSpan
from engine.decode_step import MAX_ROWS as WHOLE_STEP_ROWS
from engine.decode_step import DecodeStep
from engine.lora import MultiLora, segments_of
from engine.plan import IterationPlan, IterationResult, KvPrune, SequenceChunk, SequenceResult
from engine.sampling import sample, top_logprobs


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        decode_attention: str = "auto",
        collect_attention_scores: bool = False,
        finetune_executor=None,
    ) -> None:
        """``finetune_executor`` (``trainer.executor.FinetuneExecutor``) runs a plan's fine-tune
        chunk after its inference forward; None: plans carry no fine-tune work."""
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        num_kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Zeroed, not empty: padded decode slots are masked out, but 0 * NaN garbage is NaN.
        self.kv_pool = torch.zeros(
            config.num_hidden_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
            dtype=self.dtype, device=self.device,
        )  # (layers, K/V, blocks, block_size, Hkv, D)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_pool]
        # transformers returns an already-4D mask untouched; the paged path ignores it.
        self._placeholder_mask = torch.zeros(1, 1, 0, 0, dtype=torch.bool, device=self.device)
        self._scratch = torch.empty(0, device=self.device)
        # The C kernels (CPU, fp32): decode attention reads the pool in place (elsewhere the SDPA
        # path), and linear layers at a decode step's few rows read each weight once across the
        # threads (elsewhere torch's).
        self.decode_kernel = None
        if decode_attention == "auto" and self.device.type == "cpu" and self.dtype == torch.float32:
            self.decode_kernel = cpu_kernels.load()
            if self.decode_kernel is not None:
                cpu_kernels.install_fused_mlp(model, self.decode_kernel)
                cpu_kernels.install_small_linear(model, self.decode_kernel)
        # An iteration of one-token decodes only runs as one C call (engine/decode_step.py)
        # where the model is covered; heavy-hitter scores need the module path's attention.
        self.decode_step = None
        if self.decode_kernel is not None and not collect_attention_scores:
            self.decode_step = DecodeStep.build(model, self.decode_kernel, self.kv_caches, block_size)
        # Heavy-hitter pruning: attention each KV slot has received from prefill queries and
        # decodes since its token was written, per layer (summed over heads): (num_layers, num_blocks * block_size). Each
        # layer keeps its own heavy hitters, as H2O does.
        self.slot_scores = (
            torch.zeros(self.kv_pool.shape[0], num_blocks * block_size, dtype=torch.float32, device=self.device)
            if collect_attention_scores else None
        )
        self.finetune_executor = finetune_executor
        # Evaluation tools (bench cache's pruning quality) set this to read the next-token logits
        # of every sampled row after ``execute``: ``last_logits[seq_id]``, (vocab,) fp32.
        self.capture_logits = False
        self.last_logits: dict[int, torch.Tensor] = {}
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        # Requests on different adapters share one forward (engine/lora.py); None without LoRA.
        self.lora = MultiLora.install(model)

    def _default_adapter(self) -> str:
        return self.lora.default_adapter()

    def adapters_changed(self) -> None:
        """Adapters were added to or deleted from the model (between iterations)."""
        if self.decode_step is not None:
            self.decode_step.forget_adapters()

    def _adapter_names(self, chunks: list[SequenceChunk]) -> list[str] | None:
        """Each chunk's adapter by name, or None when every chunk reads the default one."""
        if self.lora is None or all(c.adapter is None for c in chunks):
            return None
        default = self._default_adapter()
        return [default if c.adapter is None else c.adapter for c in chunks]

    def _whole_step_covers(self, chunks: list[SequenceChunk], groups: list[str] | None) -> bool:
        if not (self.decode_step is not None and len(chunks) <= WHOLE_STEP_ROWS
                and all(len(c.token_ids) == 1 and not c.prompt_logprob_targets for c in chunks)):
            return False
        return self.decode_step.covers() if groups is None else self.decode_step.covers_adapters(groups)

    def _whole_step(self, chunks: list[SequenceChunk], names: list[str] | None, groups: list[str] | None) -> torch.Tensor:
        """Logits of the sampling chunks among ``chunks`` (all one-token decodes), in order;
        ``groups``: the distinct ``names`` in order of first use."""
        row_group = None
        if names is not None:
            index = {name: i for i, name in enumerate(groups)}
            row_group = [index[name] for name in names]
        bs = self.block_size
        lengths = [c.kv_offset + 1 for c in chunks]
        max_blocks = (max(lengths) - 1) // bs + 1
        table = torch.tensor([c.block_table[:max_blocks] + [0] * (max_blocks - len(c.block_table[:max_blocks]))
                              for c in chunks], dtype=torch.long)
        logits = self.decode_step(
            [c.token_ids[0] for c in chunks], [c.start_pos for c in chunks],
            [self._slot(c.block_table, c.kv_offset) for c in chunks], table, torch.tensor(lengths, dtype=torch.long),
            groups, row_group,
        )
        sampled = [i for i, c in enumerate(chunks) if c.sampling is not None]
        return logits if len(sampled) == len(chunks) else logits[sampled]

    def _module_forward(self, chunks: list[SequenceChunk], names: list[str] | None):
        """The model's modules over the packed chunks: (chunks in packed order, logits of the
        sampling rows then the prompt-logprob rows, time the forward began, those score rows).
        ``names``: each chunk's adapter, when they differ (the rows are then grouped by it)."""
        if names is not None:
            adapter_of = {c.seq_id: name for c, name in zip(chunks, names)}
            first = {name: i for i, name in reversed(list(enumerate(names)))}
            chunks = sorted(chunks, key=lambda c: first[adapter_of[c.seq_id]])  # stable: one run per adapter
        ordered, ids, pos_ids, meta = self._prepare(chunks)
        if self.slot_scores is not None:
            self.slot_scores[:, meta.slot_mapping] = 0.0  # fresh tokens start from nothing
        row_names = None
        if names is not None:
            row_names = [adapter_of[c.seq_id] for c in ordered for _ in c.token_ids]
        t1 = time.perf_counter()
        with self._segments(row_names):
            hidden = self._decoder(
                input_ids=ids,
                position_ids=pos_ids,
                attention_mask=self._placeholder_mask,
                use_cache=False,
                mace_meta=meta,
            ).last_hidden_state[0]  # (T, hidden)
        if meta.decode_scores is not None:  # padded entries point at slot 0 and add nothing
            self.slot_scores.index_add_(1, meta.decode_score_slots, meta.decode_scores.flatten(1))

        # Logits only where they are used: the last row of each sampling chunk, and the rows
        # whose prompt log-probs were asked for.
        sample_rows: list[int] = []
        score_rows: list[int] = []
        row = 0
        for c in ordered:
            if c.prompt_logprob_targets:
                first = row + c.prompt_logprob_start - c.start_pos
                score_rows.extend(range(first, first + len(c.prompt_logprob_targets)))
            row += len(c.token_ids)
            if c.sampling is not None:
                sample_rows.append(row - 1)
        rows = torch.tensor(sample_rows + score_rows, dtype=torch.long, device=self.device)
        with self._segments([row_names[r] for r in sample_rows + score_rows] if row_names is not None else None):
            logits = self._lm_head(hidden.index_select(0, rows)).float() if len(rows) else None
        return ordered, logits, t1, score_rows

    def _segments(self, row_names: list[str] | None):
        if row_names is None:
            return contextlib.nullcontext()
        return self.lora.segments(segments_of(row_names))

    def _prepare(self, chunks: list[SequenceChunk]):
        """Pack the chunks, decodes first, into (1, T) ids and positions plus attention metadata."""
        decodes = [c for c in chunks if len(c.token_ids) == 1]
        prefills = [c for c in chunks if len(c.token_ids) > 1]
        meta = PagedAttentionMetadata(kv_caches=self.kv_caches, slot_mapping=None, num_decode_tokens=len(decodes),
                                      prefill_scores=self.slot_scores, kernels=self.decode_kernel)
        input_ids = [c.token_ids[0] for c in decodes]
        positions = [c.start_pos for c in decodes]
        slots = [self._slot(c.block_table, c.kv_offset) for c in decodes]
        if decodes:
            self._decode_metadata(decodes, meta)
        row = len(decodes)
        for c in prefills:
            span, chunk_slots = self._prefill_span(c, row)
            meta.prefills.append(span)
            input_ids.extend(c.token_ids)
            positions.extend(range(c.start_pos, c.start_pos + len(c.token_ids)))
            slots.extend(chunk_slots)
            row += span.length
        gather_rows = [len(decodes) * meta.decode_max_len]
        gather_rows += [s.key_slots.numel() for s in meta.prefills if s.key_slots is not None]
        meta.k_scratch, meta.v_scratch = self._scratch_for(max(gather_rows))
        meta.slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)  # (1, T)
        pos_ids = torch.tensor([positions], dtype=torch.long, device=self.device)  # (1, T)
        return decodes + prefills, ids, pos_ids, meta

    def _slot(self, block_table: list[int], pos: int) -> int:
        return block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _decode_metadata(self, decodes: list[SequenceChunk], meta: PagedAttentionMetadata) -> None:
        """Block tables and lengths for the C kernel, or padded key slots and a mask for SDPA."""
        bs = self.block_size
        lengths = [c.kv_offset + 1 for c in decodes]
        max_len = max(lengths)
        max_blocks = (max_len - 1) // bs + 1
        rows = [c.block_table[:max_blocks] for c in decodes]
        table = torch.tensor([r + [0] * (max_blocks - len(r)) for r in rows], dtype=torch.long)  # (Bd, nb)
        if self.slot_scores is not None:
            meta.decode_scores = torch.zeros(self.slot_scores.shape[0], len(decodes), max_blocks * bs,
                                             device=self.device)  # (layers, Bd, nb * bs)
            meta.decode_score_slots = (table[:, :, None] * bs + torch.arange(bs)).view(-1).to(self.device)
        if self.decode_kernel is not None:
            meta.decode_block_tables = table.to(self.device)
            meta.decode_lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
            return
        key_slots = (table[:, :, None] * bs + torch.arange(bs)).view(len(decodes), -1)[:, :max_len]  # (Bd, L)
        if min(lengths) < max_len:
            mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]  # (Bd, L)
            key_slots = key_slots.masked_fill(~mask, 0)
            meta.decode_mask = mask[:, None, None, :].to(self.device)
        meta.decode_key_slots = key_slots.reshape(-1).to(self.device)
        meta.decode_max_len = max_len

    def _prefill_span(self, c: SequenceChunk, row: int) -> tuple[PrefillSpan, list[int]]:
        """The chunk's span in the packed batch, and the slots its tokens write to."""
        bs, n, start = self.block_size, len(c.token_ids), c.start_pos
        assert c.kv_offset == start, "a pruned sequence only decodes"
        table = torch.tensor(c.block_table[: (start + n - 1) // bs + 1], dtype=torch.long)
        key_slots = (table[:, None] * bs + torch.arange(bs)).view(-1)[: start + n]  # (L,) every key it sees
        span = PrefillSpan(start=row, length=n)
        if start > 0:  # attends over earlier chunks too: gather them, causal mask offset by start
            queries = torch.arange(start, start + n)
            span.key_slots = key_slots.to(self.device)
            span.mask = (torch.arange(start + n)[None, :] <= queries[:, None]).to(self.device)  # (c, L)
        elif self.slot_scores is not None:  # heavy-hitter scores: the spelled-out attention needs the mask
            span.mask = torch.ones(n, n, dtype=torch.bool).tril().to(self.device)
        return span, key_slots[start:].tolist()

    def _prune(self, op: KvPrune) -> None:
        """Keep ``op.num_keep`` of a sequence's private KV entries, compacted in order."""
        bs, start = self.block_size, op.private_start
        num_private = op.kv_len - start
        middle = num_private - op.num_sinks - op.num_recent  # candidates between sinks and recent
        num_heavy = op.num_keep - op.num_sinks - op.num_recent
        table = torch.tensor(op.block_table, dtype=torch.long)
        slots = (table[:, None] * bs + torch.arange(bs)).view(-1)[start : op.kv_len]  # (num_private,)
        sinks = torch.arange(op.num_sinks)
        recent = torch.arange(num_private - op.num_recent, num_private)
        num_layers = self.kv_pool.shape[0]
        if num_heavy > 0 and middle > 0:
            assert op.policy == "heavy-hitter" and self.slot_scores is not None
            scores = self.slot_scores[:, slots[op.num_sinks : op.num_sinks + middle].to(self.device)]  # (layers, middle)
            heavy = torch.topk(scores, min(num_heavy, middle), dim=1).indices.sort(dim=1).values.cpu() + op.num_sinks
            keep = torch.cat([sinks.expand(num_layers, -1), heavy, recent.expand(num_layers, -1)], dim=1)
        else:
            keep = torch.cat([sinks, recent]).expand(num_layers, -1)
        dst = slots[: keep.shape[1]].to(self.device)
        flat = self.kv_pool.view(num_layers, 2, -1, *self.kv_pool.shape[-2:])  # (layers, 2, NB * BS, Hkv, D)
        for layer in range(num_layers):  # each layer keeps its own entries
            src = slots[keep[layer]].to(self.device)
            flat[layer, :, dst] = flat[layer, :, src]  # the read is a copy: overlapping ranges are safe
            if self.slot_scores is not None:
                self.slot_scores[layer, dst] = self.slot_scores[layer, src]

    def _scratch_for(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V scratch of at least ``rows`` rows, kept between iterations and grown by half
        again when too small (so a slowly growing batch does not reallocate every step)."""
        _, _, _, _, num_kv_heads, head_dim = self.kv_pool.shape
        if self._scratch.numel() == 0 or self._scratch.shape[1] < rows:
            size = max(rows, int(self._scratch.shape[1] * 1.5) if self._scratch.numel() else rows)
            self._scratch = torch.empty(2, size, num_kv_heads, head_dim, dtype=self.dtype, device=self.device)
        return self._scratch[0], self._scratch[1]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def execute(self, plan: IterationPlan) -> IterationResult:
        """The inference forward, then (with grad enabled) the plan's fine-tune chunk."""
        result = self._infer(plan)
        if plan.finetune is not None:
            if self.finetune_executor is None:
                raise RuntimeError("a fine-tune chunk reached a runner without a fine-tune executor")
            result.finetune = self.finetune_executor.run(plan.finetune)
            result.total_s += result.finetune.elapsed_s
        return result

    @torch.inference_mode()
    def _infer(self, plan: IterationPlan) -> IterationResult:
        t0 = time.perf_counter()
        for op in plan.kv_prunes:
            self._prune(op)
        if not plan.chunks:
            return IterationResult(plan.iteration, [], 0)
        names = self._adapter_names(plan.chunks)
        groups = list(dict.fromkeys(names)) if names is not None else None
        if self._whole_step_covers(plan.chunks, groups):
            t1 = time.perf_counter()
            logits = self._whole_step(plan.chunks, names, groups)
            ordered, score_rows, num_tokens = plan.chunks, [], len(plan.chunks)
        else:
            ordered, logits, t1, score_rows = self._module_forward(plan.chunks, names)
            num_tokens = sum(len(c.token_ids) for c in ordered)
        self._sync()
        t2 = time.perf_counter()

        results = {c.seq_id: SequenceResult(c.seq_id) for c in ordered}
        sampling = [c for c in ordered if c.sampling is not None]
        if self.capture_logits:
            self.last_logits = {c.seq_id: logits[i].cpu() for i, c in enumerate(sampling)}
        if sampling:
            tokens, logprobs = sample(
                logits[: len(sampling)],
                [c.sampling for c in sampling],
                [c.seed for c in sampling],
                [c.output_index for c in sampling],
            )
            for c, tok, lp in zip(sampling, tokens, logprobs):
                results[c.seq_id].token_id = tok
                results[c.seq_id].logprob = lp
        if score_rows:
            scoring = [c for c in ordered if c.prompt_logprob_targets]
            lp = torch.log_softmax(logits[len(sampling):], dim=-1)
            targets = torch.tensor(
                [t for c in scoring for t in c.prompt_logprob_targets], device=lp.device
            )
            num_top = [c.num_prompt_top_logprobs for c in scoring for _ in c.prompt_logprob_targets]
            entries = top_logprobs(lp, targets, num_top)
            i = 0
            for c in scoring:
                n = len(c.prompt_logprob_targets)
                results[c.seq_id].prompt_logprobs = entries[i : i + n]
                i += n
        t3 = time.perf_counter()
        return IterationResult(
            iteration=plan.iteration,
            outputs=list(results.values()),
            num_tokens=num_tokens,
            prepare_s=t1 - t0,
            forward_s=t2 - t1,
            sample_s=t3 - t2,
            total_s=t3 - t0,
        )
