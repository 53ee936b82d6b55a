//! Text generation with a KV cache: greedy, or temperature + top-p sampling from a seeded generator.

use crate::llama::{AdapterChoice, KvCache, LlamaModel};
use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to at least `top_p` (1 keeps all).
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after producing any of these (typically the config's `eos_token_id`s).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is not part of `tokens`).
    StopToken(u32),
    MaxTokens,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Continues `prompt` with `choice`'s weights (`PolicyNoGrad` or `Reference`).
pub fn generate(
    model: &LlamaModel,
    prompt: &[u32],
    options: &GenerationOptions,
    choice: AdapterChoice,
) -> Result<Generation> {
    if prompt.is_empty() {
        bail!("generation needs a non-empty prompt");
    }
    if !(options.top_p > 0.0 && options.top_p <= 1.0) {
        bail!("top_p must be in (0, 1], got {}", options.top_p);
    }
    if options.temperature < 0.0 {
        bail!("temperature must be >= 0, got {}", options.temperature);
    }
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut cache = KvCache::default();
    let mut tokens = Vec::new();
    let mut next_input = prompt.to_vec();
    while tokens.len() < options.max_new_tokens {
        let ids = Tensor::from_slice(&next_input, (1, next_input.len()), model.device())?;
        let logits: Vec<f32> = model.forward_cached(&ids, &mut cache, choice)?.to_vec1()?;
        let token = if options.temperature == 0.0 {
            argmax(&logits)
        } else {
            sample_top_p(&logits, options.temperature, options.top_p, &mut rng)
        };
        if options.stop_tokens.contains(&token) {
            return Ok(Generation {
                tokens,
                stop: StopReason::StopToken(token),
            });
        }
        tokens.push(token);
        next_input = vec![token];
    }
    Ok(Generation {
        tokens,
        stop: StopReason::MaxTokens,
    })
}

/// The first index of the maximum.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from softmax(logits / temperature) restricted to the top-p nucleus.
fn sample_top_p(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i, ((z as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let mut u = rng.random::<f64>() * mass;
    for &(i, p) in nucleus {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    nucleus[kept - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_nucleus_only() {
        let logits = [0.0f32, 3.0, 2.9, -5.0];
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..200 {
            let t = sample_top_p(&logits, 1.0, 0.5, &mut rng);
            assert!(t == 1 || t == 2, "sampled {t} outside the nucleus");
        }
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[sample_top_p(&logits, 1.0, 1.0, &mut rng) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > seen[0]);
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }
}
