//! The TRL parity fixture's data, tokenized and batched as TRL did it: the per-step `num_tokens` of its log.
use kto_data::testing::trl_fixture;

use kto_data::batch::{BatchConfig, BatchOrder, KlPairing, MicroBatches};
use kto_data::formats::{read_file, ReadOptions};
use kto_data::tokenize::{tokenize_dataset, TokenizationConfig, TokenizerBundle};
use kto_data::Format;

fn logged_num_tokens(run: &str) -> Vec<f64> {
    let text =
        std::fs::read_to_string(trl_fixture().join("runs").join(run).join("log.json")).unwrap();
    let log: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = log
        .as_array()
        .cloned()
        .unwrap_or_else(|| log["log_history"].as_array().cloned().unwrap_or_default());
    rows.iter()
        .filter_map(|row| row.get("num_tokens").and_then(|v| v.as_f64()))
        .collect()
}

#[test]
fn fixture_num_tokens_per_step() {
    let bundle = TokenizerBundle::from_dir(&trl_fixture().join("model")).unwrap();
    assert_eq!(
        (bundle.eos_id, bundle.pad_id, bundle.bos_id),
        (2, 2, Some(1))
    );
    let data = read_file(&trl_fixture().join("data.jsonl"), &ReadOptions::default()).unwrap();
    assert_eq!(data.report.files[0].1, Format::Unpaired);
    assert_eq!((data.report.desirable, data.report.undesirable), (7, 5));
    let config = TokenizationConfig {
        max_length: Some(64),
        ..Default::default()
    };
    let (tokenized, report) = tokenize_dataset(&bundle, &data.samples, &config).unwrap();
    assert_eq!(report.kept, 12);
    assert_eq!(report.drops.total(), 0);
    // "w75 w111 w105 w100 w11" + " w18 w66 w100 w60 w63 </s>": no BOS (the fixture's post-processor adds none),
    // and no second EOS since the completion already ends with it.
    assert_eq!(tokenized[0].prompt_ids, vec![75, 111, 105, 100, 11]);
    assert_eq!(tokenized[0].completion_ids, vec![18, 66, 100, 60, 63, 2]);

    let batches = MicroBatches::new(
        &tokenized,
        BatchConfig {
            batch_size: 4,
            order: BatchOrder::Sequential,
            kl: KlPairing::Rotate { chunk_size: 4 },
            max_length: Some(64),
            pad_id: bundle.pad_id,
        },
    )
    .unwrap();
    let mut cumulative = 0;
    let num_tokens: Vec<f64> = batches
        .epoch(0)
        .map(|batch| {
            cumulative += batch.num_tokens;
            cumulative as f64
        })
        .collect();
    assert_eq!(num_tokens, vec![50.0, 120.0, 179.0]);
    for run in ["kto", "kto_weighted", "apo_zero_unpaired"] {
        assert_eq!(logged_num_tokens(run), num_tokens, "runs/{run}/log.json");
    }
    // Step 1's KL sequences: sample 0 with sample 3's completion.
    let first = batches.batch(0, 0).unwrap();
    let kl = first.kl.unwrap();
    assert_eq!(
        kl.row(0),
        [
            &tokenized[0].prompt_ids[..],
            &tokenized[3].completion_ids[..]
        ]
        .concat()
    );
    assert_eq!(first.labels, vec![true, false, true, true]);
}
