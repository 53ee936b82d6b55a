//! Parity with transformers 5.17's own loading of the real SmolLM2-135M-Instruct Q4_1 GGUF
//! (`tests/fixtures/gguf-parity/smollm2.json`, made by `scripts/make-gguf-parity-fixture.py`): token ids of stress
//! strings, logits of a few prompts and their greedy continuations.
//!
//! The 93 MB file is not in the repository: `scripts/get-smollm2.sh` puts it in ~/.cache/kto/ (or set
//! KTO_SMOLLM2_GGUF). Without it these tests print a skip line and pass, unless KTO_SMOLLM2_GGUF is set: then a
//! missing file fails them.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use kto_data::testing::fixture;
use kto_model::{generate, AdapterChoice, GenerationOptions, LlamaModel, ModelFiles};
use serde_json::Value;

/// The parity data of `tests/fixtures/gguf-parity/smollm2.json`.
fn smollm2_parity() -> Result<Value> {
    let path = fixture("gguf-parity/smollm2.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_transformers() -> Result<()> {
    let Some(path) = kto_model::testing::smollm2_gguf() else {
        return Ok(());
    };
    let bundle = ModelFiles::from_gguf(&path)?.tokenizer()?;
    let fixture = smollm2_parity()?;
    for case in fixture["stress"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let encoding = bundle.tokenizer.encode(text, true).unwrap();
        assert_eq!(encoding.get_ids(), ids(&case["ids"]), "{text:?}");
    }
    // The chat template renders as transformers renders it.
    let render = &fixture["chat_template_render"];
    let messages: Vec<kto_data::sample::Message> =
        serde_json::from_value(render["messages"].clone())?;
    let template = bundle
        .chat_template
        .as_ref()
        .expect("the file has a chat template");
    assert_eq!(
        template.render(&messages, true)?,
        render["text"].as_str().unwrap()
    );
    // BOS as transformers; EOS deliberately the file's eos_token_id (transformers copies BOS there).
    assert_eq!(
        bundle.special_tokens.bos_token.as_deref(),
        fixture["special_tokens"]["bos"].as_str()
    );
    assert_eq!(bundle.eos_token(), "<|im_end|>");
    Ok(())
}

#[test]
fn logits_and_greedy_text_match_transformers() -> Result<()> {
    let Some(path) = kto_model::testing::smollm2_gguf() else {
        return Ok(());
    };
    let checkpoint = ModelFiles::from_gguf(&path)?;
    let config = &checkpoint.config;
    assert_eq!(
        (
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert!(config.tie_word_embeddings);
    let model = LlamaModel::load(&checkpoint, DType::F32, &Device::Cpu)?;
    for prompt in smollm2_parity()?["prompts"].as_array().unwrap() {
        let input = ids(&prompt["ids"]);
        let tensor = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model
            .forward_logits(&tensor, &[input.len()], AdapterChoice::Reference)?
            .squeeze(0)?;
        let argmax: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        assert_eq!(argmax, ids(&prompt["argmax"]), "{}", prompt["text"]);
        let last: Vec<f32> = logits.get(input.len() - 1)?.to_vec1()?;
        let top_ids = ids(&prompt["last_top_ids"]);
        for (rank, (id, expected)) in top_ids
            .iter()
            .zip(prompt["last_top_logits"].as_array().unwrap())
            .enumerate()
        {
            let expected = expected.as_f64().unwrap() as f32;
            let got = last[*id as usize];
            assert!(
                (got - expected).abs() < 2e-3,
                "{}: top {rank} logit {got} vs {expected}",
                prompt["text"]
            );
        }
        let options = GenerationOptions {
            max_new_tokens: 24,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop_tokens: Vec::new(),
        };
        let generation = generate(&model, &input, &options, AdapterChoice::Reference)?;
        assert_eq!(
            generation.tokens,
            ids(&prompt["greedy_24"]),
            "{}",
            prompt["text"]
        );
    }
    Ok(())
}
