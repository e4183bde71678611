"""GET /metrics: Prometheus metrics of the server and the engine.

Counters and histograms are updated as requests run; the engine's figures
(queue, running sequences, KV blocks and waste, prefix-cache hits,
preemptions and swaps, token rate) are read from ``Runtime.stats()`` at
each scrape.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    def __init__(self, rt, dispatcher):
        self.rt, self.dispatcher = rt, dispatcher

    def collect(self):
        s = self.rt.stats()
        yield GaugeMetricFamily("pagedrt_requests_waiting", "Requests waiting for their first step", s.num_waiting)
        yield GaugeMetricFamily("pagedrt_requests_running", "Sequences in the running batch", s.num_running)
        yield GaugeMetricFamily("pagedrt_requests_open", "Requests the server is answering", self.dispatcher.active())
        yield GaugeMetricFamily("pagedrt_kv_blocks_total", "KV-cache blocks in the pool", s.num_blocks)
        yield GaugeMetricFamily("pagedrt_kv_blocks_used", "KV-cache blocks held by sequences", s.blocks_used)
        yield GaugeMetricFamily("pagedrt_kv_waste_ratio",
                                "Fraction of the used blocks' slots that hold no token", s.waste)
        hit = s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0
        yield GaugeMetricFamily("pagedrt_prefix_cache_hit_ratio", "Prompt blocks found in the prefix cache", hit)
        yield CounterMetricFamily("pagedrt_preemptions", "Sequences preempted for KV space", s.num_preemptions)
        yield CounterMetricFamily("pagedrt_preemptions_swapped",
                                  "Of the preemptions, those that swapped the request's KV blocks to host memory",
                                  s.num_swapped_out)
        yield GaugeMetricFamily("pagedrt_requests_swapped", "Requests whose KV blocks are in host memory now",
                                s.num_swapped)
        swap = CounterMetricFamily("pagedrt_swap_blocks", "KV blocks copied to and from host memory",
                                   labels=["direction"])
        swap.add_metric(["out"], s.swap_out_blocks)
        swap.add_metric(["in"], s.swap_in_blocks)
        yield swap
        yield CounterMetricFamily("pagedrt_prompt_tokens", "Prompt tokens processed", s.prompt_tokens)
        yield CounterMetricFamily("pagedrt_generation_tokens", "Tokens generated", s.generated_tokens)
        yield GaugeMetricFamily("pagedrt_generation_tokens_per_second", "Recent generation rate", s.tokens_per_s)
        yield CounterMetricFamily("pagedrt_spec_proposed_tokens", "Speculative proposals verified", s.spec_proposed)
        yield CounterMetricFamily("pagedrt_spec_accepted_tokens", "Speculative proposals accepted", s.spec_accepted)
        cons = self.rt._structured  # None until the first structured-output request
        c = cons.counters() if cons else {"fill_seconds": 0.0, "fill_rows": 0}
        yield CounterMetricFamily("pagedrt_structured_mask_seconds",
                                  "Time spent computing structured-output token masks (beside the forward)",
                                  c["fill_seconds"])
        yield CounterMetricFamily("pagedrt_structured_mask_rows", "Structured-output token-mask rows computed",
                                  c["fill_rows"])


class Metrics:
    def __init__(self, rt, dispatcher):
        self.registry = CollectorRegistry()
        self.requests = Counter("pagedrt_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("pagedrt_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("pagedrt_inter_token_latency_seconds", "Between two token events of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(rt, dispatcher))

    def render(self) -> bytes:
        return generate_latest(self.registry)
