//! Model-graded scoring: a judge model behind an OpenAI-compatible server grades `llm-rubric`
//! assertions ([`crate::assertions`]).

use serde_json::{json, Value};

use crate::assertions::{Assertion, Outcome};
use crate::backend::Backend;
use crate::endpoint::EndpointBackend;

/// A judge model behind an OpenAI-compatible `/v1/chat/completions` endpoint.
pub struct Judge {
    endpoint: EndpointBackend,
}

impl Judge {
    /// A judge on `endpoint` (its answers cached like any endpoint's).
    pub fn new(endpoint: EndpointBackend) -> Self {
        Self { endpoint }
    }

    /// Grades each (assertion, output, document variables); greedy, bounded concurrency.
    pub fn grade(&self, items: &[(&Assertion, String, Value)]) -> anyhow::Result<Vec<Outcome>> {
        self.endpoint.map(items, |(a, output, vars)| {
            let prompt = a.rubric_request(output, vars).map_err(|e| anyhow::anyhow!("rubric_prompt: {e}"))?;
            let reply = self.endpoint.chat(&[json!({"role": "user", "content": prompt})], 512, 0.0, &[])?;
            Ok(a.verdict(&reply))
        })
    }

    /// The judge's name for reports.
    pub fn name(&self) -> String {
        self.endpoint.name()
    }
}
