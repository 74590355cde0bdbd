//! Prometheus metrics, named in the style of vLLM and TGI with the `lmstack_` prefix, served in
//! the text exposition format at `GET /metrics`.
//!
//! Latency histograms (seconds): time to first token (`ttft`), inter-token latency, end-to-end
//! request latency, queue time, and forward-step durations split into steps that prefilled
//! prompt tokens (possibly with decode tokens beside them) and decode-only steps.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// Requests waiting for a slot.
    pub queue_length: IntGauge,
    /// Sequences being prefilled or decoded.
    pub running: IntGauge,
    /// Sequences per forward step.
    pub batch_size: Histogram,
    /// Tokens per forward step.
    pub batch_tokens: Histogram,
    /// Time to first token.
    pub ttft: Histogram,
    /// Time between consecutive generated tokens of one sequence.
    pub itl: Histogram,
    /// Arrival to last token.
    pub e2e: Histogram,
    /// Arrival to admission.
    pub queue_time: Histogram,
    /// Duration of steps that prefilled prompt tokens.
    pub prefill_step: Histogram,
    /// Duration of decode-only steps.
    pub decode_step: Histogram,
    /// Forward steps run as two halves on two threads.
    pub split_steps: IntCounter,
    /// Prompt tokens prefilled.
    pub prompt_tokens: IntCounter,
    /// Prompt tokens run through the model.
    pub prompt_tokens_computed: IntCounter,
    /// Tokens generated.
    pub generation_tokens: IntCounter,
    /// Generated tokens an output constraint forced (fed without sampling: fast-forward).
    pub forced_tokens: IntCounter,
    /// Finished sequences by finish reason.
    pub finished: IntCounterVec,
    /// Sequences cancelled because their client went away.
    pub cancelled: IntCounter,
    /// KV-cache tokens in use over all sequences.
    pub kv_cache_used_tokens: IntGauge,
    /// KV-cache bytes in use.
    pub kv_cache_used_bytes: IntGauge,
    /// KV-cache tokens reserved by admitted sequences (prompt + max_tokens).
    pub kv_cache_reserved_tokens: IntGauge,
    /// The KV-cache budget in tokens.
    pub kv_cache_capacity_tokens: IntGauge,
    /// Used / capacity.
    pub kv_cache_usage: prometheus::Gauge,
    /// Prompt tokens looked up in the prefix cache (all but each prompt's last).
    pub prefix_cache_queries: IntCounter,
    /// Prompt tokens found there: copied, not computed.
    pub prefix_cache_hits: IntCounter,
    /// Tokens of room held by finished sequences' caches kept for prefix caching.
    pub prefix_cache_tokens: IntGauge,
}

const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    40.0, 80.0,
];
const STEP: &[f64] = &[0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 4.0];
const COUNTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
            r.register(Box::new(m.clone())).expect("metric names are unique");
            m
        }
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            reg(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid"),
            )
        };
        let gauge = |name: &str, help: &str| reg(&registry, IntGauge::new(name, help).expect("valid"));
        let counter = |name: &str, help: &str| reg(&registry, IntCounter::new(name, help).expect("valid"));
        Self {
            requests: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("lmstack_requests_total", "HTTP requests by endpoint and status code"),
                    &["endpoint", "status"],
                )
                .expect("valid"),
            ),
            queue_length: gauge("lmstack_queue_length", "Requests waiting for a slot"),
            running: gauge("lmstack_running_sequences", "Sequences being prefilled or decoded"),
            batch_size: hist("lmstack_batch_size", "Sequences per forward step", COUNTS),
            batch_tokens: hist("lmstack_batch_tokens", "Tokens per forward step", COUNTS),
            ttft: hist("lmstack_time_to_first_token_seconds", "Arrival to first generated token", LATENCY),
            itl: hist("lmstack_inter_token_latency_seconds", "Time between generated tokens of a sequence", LATENCY),
            e2e: hist("lmstack_e2e_request_latency_seconds", "Arrival to the end of generation", LATENCY),
            queue_time: hist("lmstack_queue_time_seconds", "Arrival to admission into the running batch", LATENCY),
            prefill_step: hist(
                "lmstack_prefill_step_duration_seconds",
                "Forward steps that prefilled prompt tokens (decode tokens may ride along)",
                STEP,
            ),
            decode_step: hist("lmstack_decode_step_duration_seconds", "Decode-only forward steps", STEP),
            split_steps: counter("lmstack_split_steps_total", "Forward steps run as two halves on two threads"),
            prompt_tokens: counter(
                "lmstack_prompt_tokens_total",
                "Prompt tokens of admitted requests, as received (computed + copied from the prefix cache)",
            ),
            prompt_tokens_computed: counter(
                "lmstack_prompt_tokens_computed_total",
                "Prompt tokens run through the model (the rest were copied from the prefix cache: prefix_cache_hits_total)",
            ),
            generation_tokens: counter("lmstack_generation_tokens_total", "Tokens generated"),
            forced_tokens: counter(
                "lmstack_forced_tokens_total",
                "Generated tokens an output constraint forced, fed without sampling (fast-forward; counted in generation_tokens_total too)",
            ),
            finished: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new("lmstack_request_finished_total", "Finished sequences by finish reason"),
                    &["finish_reason"],
                )
                .expect("valid"),
            ),
            cancelled: counter("lmstack_request_cancelled_total", "Sequences cancelled because the client went away"),
            kv_cache_used_tokens: gauge("lmstack_kv_cache_used_tokens", "KV-cache tokens in use"),
            kv_cache_used_bytes: gauge("lmstack_kv_cache_used_bytes", "KV-cache bytes in use"),
            kv_cache_reserved_tokens: gauge(
                "lmstack_kv_cache_reserved_tokens",
                "KV-cache tokens reserved by admitted sequences (prompt + max_tokens)",
            ),
            kv_cache_capacity_tokens: gauge("lmstack_kv_cache_capacity_tokens", "KV-cache budget in tokens"),
            kv_cache_usage: reg(
                &registry,
                prometheus::Gauge::new("lmstack_kv_cache_usage_ratio", "KV-cache tokens in use / budget")
                    .expect("valid"),
            ),
            prefix_cache_queries: counter(
                "lmstack_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache (every token of each prompt, as vLLM counts them)",
            ),
            prefix_cache_hits: counter(
                "lmstack_prefix_cache_hits_total",
                "Prompt tokens whose keys and values were copied from the prefix cache instead of computed",
            ),
            prefix_cache_tokens: gauge(
                "lmstack_prefix_cache_tokens",
                "KV-cache tokens held by finished sequences kept for prefix caching (evicted when the budget needs them)",
            ),
            registry,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to memory cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
