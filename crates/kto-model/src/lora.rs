//! LoRA adapters: configuration, PEFT-style initialisation, and the low-rank update added to a base linear.
//!
//! Weights are f32 `Var`s whatever the base dtype; the input is cast to f32 around the two small matmuls and the sum
//! is cast back, as PEFT does (`x` cast to `lora_A.weight.dtype`, result back to the base output dtype).

use crate::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The seven linears of a Llama decoder layer that can carry an adapter, in PEFT's parameter order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];
    pub const ALLOWED: &'static str =
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj";

    /// The module name in Hugging Face checkpoints and PEFT's `target_modules`.
    pub fn module_name(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }

    /// The submodule holding it: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            Self::Q | Self::K | Self::V | Self::O => "self_attn",
            Self::Gate | Self::Up | Self::Down => "mlp",
        }
    }

    /// Accepts `q_proj` or the short `q`.
    pub fn parse(name: &str) -> Result<Self> {
        let name = name.trim();
        Self::ALL
            .into_iter()
            .find(|t| {
                t.module_name() == name || t.module_name().strip_suffix("_proj") == Some(name)
            })
            .with_context(|| {
                format!(
                    "unknown LoRA target module \"{name}\" (allowed: {})",
                    Self::ALLOWED
                )
            })
    }

    /// (in_features, out_features) of this linear in `config`'s model.
    pub fn shape(self, config: &ModelConfig) -> (usize, usize) {
        let h = config.hidden_size;
        let q = config.num_attention_heads * config.head_dim;
        let kv = config.num_key_value_heads * config.head_dim;
        let i = config.intermediate_size;
        match self {
            Self::Q => (h, q),
            Self::K | Self::V => (h, kv),
            Self::O => (q, h),
            Self::Gate | Self::Up => (h, i),
            Self::Down => (i, h),
        }
    }
}

/// One adapted linear: decoder layer index and module.
pub type LoraSite = (usize, LoraTarget);

/// `r`, `alpha`, dropout and targets, with PEFT's meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Sorted, without duplicates.
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    pub fn new(
        r: usize,
        alpha: f64,
        dropout: f64,
        use_rslora: bool,
        targets: &[LoraTarget],
    ) -> Result<Self> {
        if r == 0 {
            bail!("LoRA `r` must be positive");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("LoRA `lora_dropout` must be in [0, 1), got {dropout}");
        }
        if targets.is_empty() {
            bail!(
                "LoRA `target_modules` is empty (allowed: {})",
                LoraTarget::ALLOWED
            );
        }
        let mut targets = targets.to_vec();
        targets.sort_unstable();
        targets.dedup();
        Ok(Self {
            r,
            alpha,
            dropout,
            use_rslora,
            targets,
        })
    }

    /// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// `A` [r, in] and `B` [out, r], f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// A set of LoRA pairs over a model's layers.
#[derive(Debug)]
pub struct LoraAdapter {
    config: LoraConfig,
    pairs: BTreeMap<LoraSite, LoraPair>,
}

impl LoraAdapter {
    /// PEFT's default init: `A` kaiming-uniform with a = √5 (uniform in ±1/√in, torch's `nn.Linear` default), `B`
    /// zero, so the adapted model starts equal to the base. Values come from `seed` (not torch's RNG stream).
    pub fn init(
        config: LoraConfig,
        model: &ModelConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            for &target in &config.targets {
                let (fan_in, fan_out) = target.shape(model);
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a: Vec<f32> = (0..config.r * fan_in)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (config.r, fan_in), device)?;
                let b = Tensor::zeros((fan_out, config.r), DType::F32, device)?;
                pairs.insert(
                    (layer, target),
                    LoraPair {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                    },
                );
            }
        }
        Ok(Self { config, pairs })
    }

    /// Builds an adapter from `A`/`B` tensors keyed by site; every configured site must be present with the shapes
    /// `model` implies (errors name the PEFT key).
    pub fn from_pairs(
        config: LoraConfig,
        model: &ModelConfig,
        tensors: BTreeMap<LoraSite, (Tensor, Tensor)>,
        device: &Device,
    ) -> Result<Self> {
        let mut pairs = BTreeMap::new();
        for layer in 0..model.num_hidden_layers {
            for &target in &config.targets {
                let site = (layer, target);
                let Some((a, b)) = tensors.get(&site) else {
                    bail!("adapter has no tensor {}", peft_key(site, LoraMatrix::A));
                };
                let (fan_in, fan_out) = target.shape(model);
                for (tensor, matrix, expected) in [
                    (a, LoraMatrix::A, [config.r, fan_in]),
                    (b, LoraMatrix::B, [fan_out, config.r]),
                ] {
                    if tensor.dims() != expected {
                        bail!(
                            "tensor {} has shape {:?}, the base model needs {:?} (r = {})",
                            peft_key(site, matrix),
                            tensor.dims(),
                            expected,
                            config.r
                        );
                    }
                }
                let a = a.to_dtype(DType::F32)?.to_device(device)?;
                let b = b.to_dtype(DType::F32)?.to_device(device)?;
                pairs.insert(
                    site,
                    LoraPair {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                    },
                );
            }
        }
        if let Some(site) = tensors.keys().find(|s| !pairs.contains_key(s)) {
            bail!(
                "tensor {} does not fit the base model ({} layers, targets {})",
                peft_key(*site, LoraMatrix::A),
                model.num_hidden_layers,
                config
                    .targets
                    .iter()
                    .map(|t| t.module_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Self { config, pairs })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn pair(&self, site: LoraSite) -> Option<&LoraPair> {
        self.pairs.get(&site)
    }

    pub fn sites(&self) -> impl Iterator<Item = LoraSite> + '_ {
        self.pairs.keys().copied()
    }

    /// Every trainable tensor with its PEFT key, in PEFT's parameter order (layer, q..down, A before B).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.pairs
            .iter()
            .flat_map(|(&site, pair)| {
                [
                    (peft_key(site, LoraMatrix::A), pair.a.clone()),
                    (peft_key(site, LoraMatrix::B), pair.b.clone()),
                ]
            })
            .collect()
    }

    /// An independent copy (new storage), e.g. to freeze the starting adapter as the reference.
    pub fn deep_copy(&self) -> Result<Self> {
        let pairs = self
            .pairs
            .iter()
            .map(|(&site, p)| {
                let a = Var::from_tensor(&p.a.as_tensor().copy()?)?;
                let b = Var::from_tensor(&p.b.as_tensor().copy()?)?;
                Ok((site, LoraPair { a, b }))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config: self.config.clone(),
            pairs,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMatrix {
    A,
    B,
}

/// PEFT's key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key((layer, target): LoraSite, matrix: LoraMatrix) -> String {
    let m = match matrix {
        LoraMatrix::A => "lora_A",
        LoraMatrix::B => "lora_B",
    };
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.{m}.weight",
        target.block(),
        target.module_name()
    )
}

/// Parses a PEFT key back into its site and matrix.
pub fn parse_peft_key(key: &str) -> Option<(LoraSite, LoraMatrix)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let parts: Vec<&str> = rest.split('.').collect();
    let [block, module, matrix, "weight"] = parts[..] else {
        return None;
    };
    let target = LoraTarget::parse(module).ok()?;
    if target.block() != block || !module.ends_with("_proj") {
        return None;
    }
    let matrix = match matrix {
        "lora_A" => LoraMatrix::A,
        "lora_B" => LoraMatrix::B,
        _ => return None,
    };
    Some(((layer, target), matrix))
}

/// Seeded inverted-dropout masks for the LoRA input.
///
/// On the CPU the mask comes from a seeded `StdRng`; on CUDA from the device generator, seeded once here (candle's
/// CPU generator cannot be seeded, and moving CPU-made masks to the GPU would cost a transfer per linear).
#[derive(Debug)]
pub struct DropoutSource {
    rng: Mutex<StdRng>,
}

impl DropoutSource {
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        Ok(Self {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    /// A seed for a derived source (gradient checkpointing replays a layer's masks from it).
    pub fn next_seed(&self) -> u64 {
        self.rng.lock().expect("dropout rng poisoned").random()
    }

    /// 0 with probability `p`, else `1 / (1 - p)`, f32.
    pub fn keep_mask(&self, dims: &[usize], p: f64, device: &Device) -> Result<Tensor> {
        let scale = 1.0 / (1.0 - p);
        if device.is_cpu() {
            let n: usize = dims.iter().product();
            let mut rng = self.rng.lock().expect("dropout rng poisoned");
            let mask: Vec<f32> = (0..n)
                .map(|_| {
                    if rng.random::<f64>() < p {
                        0.0
                    } else {
                        scale as f32
                    }
                })
                .collect();
            Ok(Tensor::from_vec(mask, dims, device)?)
        } else {
            let u = Tensor::rand(0f32, 1f32, dims, device)?;
            Ok((u.ge(p)?.to_dtype(DType::F32)? * scale)?)
        }
    }
}

/// The adapter's contribution `scale · B A x` in f32 for `x` [..., in]; `grad` keeps `A` and `B` in the graph.
pub fn lora_delta(
    x: &Tensor,
    pair: &LoraPair,
    config: &LoraConfig,
    grad: bool,
    dropout: Option<&DropoutSource>,
) -> Result<Tensor> {
    let (a, b) = if grad {
        (pair.a.as_tensor().clone(), pair.b.as_tensor().clone())
    } else {
        (pair.a.as_tensor().detach(), pair.b.as_tensor().detach())
    };
    let dims = x.dims().to_vec();
    let fan_in = *dims.last().context("LoRA input has no feature dimension")?;
    let rows = x.elem_count() / fan_in.max(1);
    let mut x = x.to_dtype(DType::F32)?.reshape((rows, fan_in))?;
    if let Some(source) = dropout.filter(|_| config.dropout > 0.0) {
        let mask = source.keep_mask(&[rows, fan_in], config.dropout, x.device())?;
        x = (x * mask)?;
    }
    let h = x.matmul(&a.t()?)?;
    let y = (h.matmul(&b.t()?)? * config.scale())?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = y.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"model_type":"llama","vocab_size":16,"hidden_size":8,"intermediate_size":12,
                "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1}"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn peft_keys_round_trip() {
        for target in LoraTarget::ALL {
            for matrix in [LoraMatrix::A, LoraMatrix::B] {
                let key = peft_key((3, target), matrix);
                assert_eq!(parse_peft_key(&key), Some(((3, target), matrix)));
            }
        }
        assert_eq!(
            peft_key((0, LoraTarget::Q), LoraMatrix::A),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            parse_peft_key("base_model.model.model.layers.0.mlp.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_peft_key("base_model.model.lm_head.lora_A.weight"),
            None
        );
    }

    #[test]
    fn init_is_peft_like_and_seeded() -> Result<()> {
        let cfg = LoraConfig::new(4, 8.0, 0.0, false, &LoraTarget::ALL)?;
        assert_eq!(cfg.scale(), 2.0);
        let rs = LoraConfig::new(4, 8.0, 0.0, true, &[LoraTarget::Q])?;
        assert_eq!(rs.scale(), 4.0);
        let model = tiny();
        let a1 = LoraAdapter::init(cfg.clone(), &model, 7, &Device::Cpu)?;
        let a2 = LoraAdapter::init(cfg.clone(), &model, 7, &Device::Cpu)?;
        let a3 = LoraAdapter::init(cfg, &model, 8, &Device::Cpu)?;
        let vars = a1.trainable_vars();
        assert_eq!(vars.len(), 2 * 7 * 2);
        assert_eq!(
            vars[0].0,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            vars[1].0,
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        );
        let down_a = a1.pair((1, LoraTarget::Down)).unwrap().a.as_tensor();
        assert_eq!(down_a.dims(), [4, 12]);
        let max = down_a.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max > 0.0 && max <= 1.0 / 12f32.sqrt());
        assert_eq!(
            a1.pair((1, LoraTarget::Down))
                .unwrap()
                .b
                .as_tensor()
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        let same = |x: &LoraAdapter, y: &LoraAdapter| -> Result<bool> {
            let (p, q) = (
                x.pair((0, LoraTarget::K)).unwrap(),
                y.pair((0, LoraTarget::K)).unwrap(),
            );
            Ok((p.a.as_tensor() - q.a.as_tensor())?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?
                == 0.0)
        };
        assert!(same(&a1, &a2)?);
        assert!(!same(&a1, &a3)?);
        Ok(())
    }

    #[test]
    fn dropout_masks_are_seeded_and_scaled() -> Result<()> {
        let d1 = DropoutSource::new(3, &Device::Cpu)?;
        let d2 = DropoutSource::new(3, &Device::Cpu)?;
        let m1 = d1
            .keep_mask(&[64, 64], 0.25, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let m2 = d2
            .keep_mask(&[64, 64], 0.25, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(m1, m2);
        let zeros = m1.iter().filter(|&&v| v == 0.0).count() as f64 / m1.len() as f64;
        assert!((zeros - 0.25).abs() < 0.03, "dropped fraction {zeros}");
        assert!(m1.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(LoraConfig::new(0, 8.0, 0.0, false, &LoraTarget::ALL).is_err());
        assert!(LoraConfig::new(4, 8.0, 1.0, false, &LoraTarget::ALL).is_err());
        assert!(LoraConfig::new(4, 8.0, 0.0, false, &[]).is_err());
        assert!(
            format!("{:#}", LoraTarget::parse("lm_head").unwrap_err()).contains("allowed: q_proj")
        );
    }
}
