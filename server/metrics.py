"""Prometheus metrics of one server (``GET /metrics``), on a registry of its own.

Latencies follow DESIGN.md: TTFT from arrival to the first token, inter-token latency between
streamed tokens, end-to-end from arrival to the last. Gauges read the engine when scraped, so they
are never stale.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.async_engine import IterationRecord
from scheduler.core import EngineCore

# Seconds; fine below 100 ms where decode gaps live, coarse up to minutes for long generations.
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                      1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
OUTCOMES = ("stop", "length", "abort", "error", "rejected")


class ServerMetrics:
    """Built before the engine, over its core; the engine calls ``observe_iteration`` after
    each iteration (an ``AsyncEngine`` observer)."""

    def __init__(self, core: EngineCore) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft_s = Histogram("mace_time_to_first_token_seconds", "Arrival to first token.",
                                buckets=_LATENCY_BUCKETS_S, registry=r)
        self.itl_s = Histogram("mace_inter_token_latency_seconds", "Gap between consecutive tokens of a request.",
                               buckets=_LATENCY_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("mace_e2e_request_latency_seconds", "Arrival to the last token.",
                               buckets=_LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("mace_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("mace_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("mace_requests", "Finished requests (one per choice) by outcome.",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every series exists from the start, at 0
        self.slo_attained = Counter("mace_slo_attained", "Finished requests within their TTFT and TBT SLOs.", registry=r)
        self.slo_violated = Counter("mace_slo_violated", "Finished requests past their TTFT or TBT SLO.", registry=r)
        self.late_requests = Counter(
            "mace_requests_late", "Requests whose first token was predicted past their TTFT SLO at arrival, by "
            "what became of them (queued, or refused with --refuse-late-requests).", ["action"], registry=r)
        for action in ("queued", "refused"):
            self.late_requests.labels(action)
        Gauge("mace_slo_ttft_ms", "The default TTFT SLO (learned from the load when none was given).",
              registry=r).set_function(lambda: core.policy.default_slos_ms()[0])
        Gauge("mace_slo_tbt_ms", "The default TBT SLO (learned from the load when none was given).",
              registry=r).set_function(lambda: core.policy.default_slos_ms()[1])
        Gauge("mace_slo_infeasible", "1 while inference alone takes longer than the TBT SLO set allows.",
              registry=r).set_function(lambda: float(core.policy.slo_infeasible))
        self.plan_s = Histogram("mace_scheduler_plan_seconds", "Time to build one iteration's plan.",
                                buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1), registry=r)
        self.iteration_s = Histogram("mace_iteration_seconds", "One iteration on the worker (inference and fine-tune).",
                                     buckets=_LATENCY_BUCKETS_S, registry=r)
        self.num_iterations = 0  # run by the worker, failed ones included
        Gauge("mace_requests_running", "Sequences being computed.", registry=r).set_function(
            lambda: len(core.queues.running))
        Gauge("mace_requests_waiting", "Sequences waiting for admission.", registry=r).set_function(
            lambda: len(core.queues.waiting))
        Gauge("mace_kv_blocks_total", "KV-cache blocks in the pool.", registry=r).set_function(
            lambda: core.pool.num_blocks)
        Gauge("mace_kv_blocks_used", "KV-cache blocks held by live sequences.", registry=r).set_function(
            lambda: core.pool.num_used_blocks)
        Gauge("mace_kv_blocks_cached", "KV-cache blocks no sequence holds, kept for prefix reuse.",
              registry=r).set_function(lambda: core.pool.num_cached_blocks)
        Gauge("mace_engine_iterations", "Iterations run by the worker.", registry=r).set_function(
            lambda: self.num_iterations)
        Gauge("mace_cost_model_error_ratio", "Running mean of |predicted - measured| / measured iteration time.",
              registry=r).set_function(lambda: core.cost_model.error_ratio)
        r.register(_EngineCounters(core))
        self._store = core.training.store if core.training is not None else None
        self.feedback_pairs = None
        if self._store is not None:
            self.feedback_pairs = Gauge("mace_feedback_pairs", "Stored feedback pairs by state.", ["state"], registry=r)

    def observe_iteration(self, record: IterationRecord) -> None:
        self.num_iterations += 1
        if record.result is not None:
            self.plan_s.observe(record.plan_s)
            self.iteration_s.observe(record.result.total_s)

    async def render(self) -> bytes:
        """The text exposition; the feedback store's counts are read off the event loop."""
        if self._store is not None:
            for state, count in (await asyncio.to_thread(self._store.stats)).items():
                if state != "received":
                    self.feedback_pairs.labels(state).set(count)
        return generate_latest(self.registry)


class _EngineCounters(Collector):
    """Counters the engine keeps itself, read at scrape time."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core

    def collect(self):
        s = self._core.queues
        yield CounterMetricFamily("mace_prefix_cache_queries", "Tokens of admitted sequences looked up in the prefix cache.",
                                  value=s.num_prefix_query_tokens)
        yield CounterMetricFamily("mace_prefix_cache_hits", "Of those, tokens found there and not recomputed.",
                                  value=s.num_prefix_hit_tokens)
        yield CounterMetricFamily("mace_preemptions", "Sequences preempted for memory (recomputed later).",
                                  value=s.num_preemptions)
        training = self._core.training
        if training is None:
            return
        trainer = training.trainer
        yield CounterMetricFamily("mace_train_steps", "Optimizer steps taken (published to the serving adapter).",
                                  value=trainer.num_steps)
        yield CounterMetricFamily("mace_train_pairs", "Feedback pairs in the optimizer steps taken (this process).",
                                  value=trainer.num_pairs_stepped)
        yield CounterMetricFamily("mace_train_tokens", "Tokens run through fine-tune chunks (reference and gradient).",
                                  value=trainer.num_tokens)
        yield GaugeMetricFamily("mace_adapter_version", "Version of the adapter inference reads.",
                                value=training.adapter_version)
        loss = trainer.mean_recent_loss
        yield GaugeMetricFamily("mace_dpo_loss", "Mean DPO loss of the recent pairs.", value=loss if loss is not None else float("nan"))
        if not self._core.tenants:
            return
        # each tenant's adapter (--tenants), labelled; the families above are the default adapter's
        steps = CounterMetricFamily("mace_tenant_train_steps", "Optimizer steps taken on a tenant's adapter.",
                                    labels=["tenant"])
        versions = GaugeMetricFamily("mace_tenant_adapter_version", "Version of a tenant's adapter.", labels=["tenant"])
        losses = GaugeMetricFamily("mace_tenant_dpo_loss", "Mean DPO loss of a tenant's recent pairs.", labels=["tenant"])
        for tenant, t in sorted(self._core.tenants.items()):
            steps.add_metric([tenant], t.trainer.num_steps)
            versions.add_metric([tenant], t.adapter_version)
            loss = t.trainer.mean_recent_loss
            losses.add_metric([tenant], loss if loss is not None else float("nan"))
        yield steps
        yield versions
        yield losses
