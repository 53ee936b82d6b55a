//! Attention over per-query key ranges: the mask constructors, the masked-softmax kernels (emulated) against their
//! CPU twins, the twin's backward against finite differences, and the candle ops against the stock formulation
//! (repeated K/V, a dense additive mask, softmax from candle ops).

use candle_core::{DType, Device, Tensor, Var, D};
use kto_kernels::attention::{
    attention, backward_launch, backward_twin, forward_launch, forward_twin, masked_softmax,
    AttentionMask, RowMap,
};
use kto_kernels::emulation::GuardedBuffer;
use kto_kernels::float::Float;
use kto_kernels::testing::emulated::assert_emulated_matches_twin;
use kto_kernels::testing::{
    assert_close, cast, check_gradient, flat, gemm_attention_tolerance, probe_gradients,
    probe_loss, widen, Normal, Tolerance, LONG_KEYS, MODEL_SHAPES, STOCK_F32,
};
use kto_kernels::tests_per_dtype;

type Ranges = Vec<[u32; 2]>;

#[test]
fn causal_and_packed_ranges_are_as_documented() -> candle_core::Result<()> {
    // Row 1 has 2 keys: its third query is padding.
    let causal = AttentionMask::causal_ranges(&[3, 2], 3, 0, None)?;
    assert_eq!(causal, vec![[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [0, 0]]);
    let windowed = AttentionMask::causal_ranges(&[4], 4, 0, Some(2))?;
    assert_eq!(windowed, vec![[0, 1], [0, 2], [1, 3], [2, 4]]);
    // A KV cache: 2 new queries after 5 cached keys; row 1 holds one real query.
    let cached = AttentionMask::causal_ranges(&[7, 6], 2, 5, Some(3))?;
    assert_eq!(cached, vec![[3, 6], [4, 7], [3, 6], [0, 0]]);
    // Sequences [0, 2) and [2, 5), then padding.
    let packed = AttentionMask::packed_ranges(&[vec![0, 2, 5]], 6, None)?;
    assert_eq!(packed, vec![[0, 1], [0, 2], [2, 3], [2, 4], [2, 5], [0, 0]]);
    let packed = AttentionMask::packed_ranges(&[vec![0, 2, 5]], 5, Some(2))?;
    assert_eq!(packed, vec![[0, 1], [0, 2], [2, 3], [2, 4], [3, 5]]);
    assert!(AttentionMask::packed_ranges(&[vec![0, 3, 2]], 5, None).is_err());
    assert!(AttentionMask::packed_ranges(&[vec![0, 6]], 5, None).is_err());
    let mask = AttentionMask::causal(&[3, 2], 3, 0, None, &Device::Cpu)?;
    assert_eq!(mask.key_ranges().dims(), [2, 3, 2]);
    assert_eq!(mask.ranges()?, causal);
    Ok(())
}

/// One masked-softmax problem: scores [rows, groups, n_rep · queries, keys] under `ranges` [rows, queries].
struct Case {
    name: String,
    rows: usize,
    groups: usize,
    n_rep: usize,
    queries: usize,
    keys: usize,
    ranges: Ranges,
}

impl Case {
    fn score_rows(&self) -> usize {
        self.rows * self.groups * self.n_rep * self.queries
    }

    fn map(&self) -> RowMap {
        RowMap {
            batch_rows: self.groups * self.n_rep * self.queries,
            queries: self.queries,
        }
    }
}

/// Awkward key counts (one key, below a warp, not multiples of 32, the block path, a long cache) with n_rep 1 and 3: padded
/// causal rows (fully masked queries), a KV-cache chunk, sliding windows, packed rows and arbitrary ranges (some
/// empty, some reversed, some past the end).
fn cases() -> candle_core::Result<Vec<Case>> {
    let mut cases = Vec::new();
    let mut rng = Normal::new(23);
    for keys in [1, 5, 33, 100, 300] {
        for n_rep in [1, 3] {
            let case = |name: &str, rows, groups, queries, ranges| Case {
                name: format!("{name} keys {keys} n_rep {n_rep}"),
                rows,
                groups,
                n_rep,
                queries,
                keys,
                ranges,
            };
            // The last `queries` positions of `keys`; row 1 is two keys short (padded queries see nothing).
            let queries = keys.min(6);
            let lengths = [keys, keys.saturating_sub(2)];
            let offset = keys - queries;
            cases.push(case(
                "causal padded",
                2,
                2,
                queries,
                AttentionMask::causal_ranges(&lengths, queries, offset, None)?,
            ));
            let window = Some(keys.div_ceil(3));
            cases.push(case(
                "sliding window",
                2,
                1,
                queries,
                AttentionMask::causal_ranges(&lengths, queries, offset, window)?,
            ));
            let random: Ranges = (0..2 * queries)
                .map(|_| [rng.below(keys as u32 + 3), rng.below(keys as u32 + 3)])
                .collect();
            cases.push(case("arbitrary ranges", 2, 1, queries, random));
            if keys * n_rep <= 100 {
                // Queries and keys are the same positions: sequences of 1, 2, … keys, then padding.
                let mut bounds = vec![0];
                while bounds.last().unwrap() + bounds.len() <= keys.saturating_sub(1) {
                    bounds.push(bounds.last().unwrap() + bounds.len());
                }
                let rows = vec![bounds, vec![0, keys]];
                cases.push(case(
                    "packed",
                    2,
                    1,
                    keys,
                    AttentionMask::packed_ranges(&rows, keys, None)?,
                ));
                cases.push(case(
                    "packed windowed",
                    2,
                    1,
                    keys,
                    AttentionMask::packed_ranges(&rows, keys, Some(4))?,
                ));
            }
        }
    }
    // Decoding: 1 query over a cache of 4099 keys (a block of 544 threads, 8 keys each).
    cases.push(Case {
        name: "one query over a cache of 4099".into(),
        rows: 1,
        groups: 2,
        n_rep: 1,
        queries: 1,
        keys: 4099,
        ranges: AttentionMask::causal_ranges(&[4099], 1, 4098, None)?,
    });
    // The real models' heads over LONG_KEYS keys: the last 4 queries of a full-length causal sequence.
    for m in MODEL_SHAPES {
        cases.push(Case {
            name: format!("{} heads, 4 queries over {LONG_KEYS} keys", m.name),
            rows: 1,
            groups: m.kv_heads,
            n_rep: m.heads / m.kv_heads,
            queries: 4,
            keys: LONG_KEYS,
            ranges: AttentionMask::causal_ranges(&[LONG_KEYS], 4, LONG_KEYS - 4, None)?,
        });
    }
    // Decoding with a cache: 1 query over 20 keys.
    cases.push(Case {
        name: "one query over a cache of 20".into(),
        rows: 2,
        groups: 2,
        n_rep: 3,
        queries: 1,
        keys: 20,
        ranges: AttentionMask::causal_ranges(&[20, 20], 1, 19, Some(8))?,
    });
    Ok(cases)
}

fn emulated_matches_twin<T: Float>() -> candle_core::Result<()> {
    let mut rng = Normal::new(7);
    let scale = 0.37f32;
    for case in cases()? {
        let (rows, keys) = (case.score_rows(), case.keys);
        let scores: Vec<T> = cast(&rng.vec(rows * keys, 3.0));
        let grad: Vec<T> = cast(&rng.vec(rows * keys, 1.0));
        let mut p_twin = vec![T::default(); rows * keys];
        forward_twin(&scores, &case.ranges, &mut p_twin, keys, case.map(), scale);
        let mut ds_twin = vec![T::default(); rows * keys];
        backward_twin(&p_twin, &grad, &mut ds_twin, keys, scale);
        // The twin itself: rows sum to 1 or are all 0, and nothing is NaN.
        for (row, p) in widen(&p_twin).chunks(keys).enumerate() {
            let [first, end] = case.ranges[case.map().range_index(row)];
            let total: f32 = p.iter().sum();
            let sees = first < end.min(keys as u32);
            assert!(
                if sees {
                    (total - 1.0).abs() < 0.02
                } else {
                    p.iter().all(|&v| v == 0.0)
                },
                "{}: row {row} sums to {total}",
                case.name
            );
        }
        let ranges: Vec<u32> = case.ranges.iter().flatten().copied().collect();
        let (sb, rb, pb, gb) = (
            GuardedBuffer::from_slice(&scores),
            GuardedBuffer::from_slice(&ranges),
            GuardedBuffer::from_slice(&p_twin),
            GuardedBuffer::from_slice(&grad),
        );
        let what = format!("{} {:?}", case.name, T::DTYPE);
        let tol = Tolerance::for_dtype(T::DTYPE);
        assert_emulated_matches_twin::<T>(&format!("forward {what}"), &widen(&p_twin), tol, |p| {
            forward_launch(
                T::DTYPE,
                rows,
                keys,
                case.map(),
                scale,
                sb.arg(),
                rb.arg(),
                p,
            )
        })?;
        assert_emulated_matches_twin::<T>(
            &format!("backward {what}"),
            &widen(&ds_twin),
            tol,
            |ds| backward_launch(T::DTYPE, rows, keys, scale, pb.arg(), gb.arg(), ds),
        )?;
    }
    Ok(())
}

tests_per_dtype!(emulated_kernels_match_the_twin, emulated_matches_twin);

#[test]
fn twin_backward_matches_finite_differences() -> candle_core::Result<()> {
    let mut rng = Normal::new(11);
    let scale = 0.6f32;
    for keys in [1, 5, 40] {
        // 2 rows × 2 groups × (n_rep 2 · 3 queries); row 1 pads its last query.
        let queries = 3;
        let ranges = AttentionMask::causal_ranges(
            &[keys + 2, keys + 1],
            queries,
            keys - 1,
            Some(keys.div_ceil(2) + 1),
        )?;
        let map = RowMap {
            batch_rows: 2 * 2 * queries,
            queries,
        };
        let rows = 2 * map.batch_rows;
        let scores = rng.vec(rows * (keys + 2), 2.0);
        let probe = rng.vec(rows * (keys + 2), 1.0);
        let forward = |s: &[f32]| {
            let mut p = vec![0f32; s.len()];
            forward_twin(s, &ranges, &mut p, keys + 2, map, scale);
            p
        };
        let mut ds = vec![0f32; scores.len()];
        backward_twin(&forward(&scores), &probe, &mut ds, keys + 2, scale);
        let loss = |s: &[f32]| probe_loss(&forward(s), &probe);
        check_gradient(
            &format!("masked softmax keys {}", keys + 2),
            &scores,
            &ds,
            loss,
            1e-2,
            2e-3,
            200,
        )?;
    }
    Ok(())
}

/// transformers' eager attention from stock candle ops: K/V heads repeated (`repeat_kv`), scores `q kᵀ · scale`,
/// an additive 0 / -inf mask, softmax in f32, times v.
fn stock_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    additive_mask: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (rows, heads, _, _) = q.dims4()?;
    let (_, kv_heads, keys, d) = k.dims4()?;
    let n_rep = heads / kv_heads;
    let repeat = |t: &Tensor| -> candle_core::Result<Tensor> {
        Tensor::cat(&vec![t.unsqueeze(2)?; n_rep], 2)?.reshape((rows, heads, keys, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(additive_mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.to_dtype(v.dtype())?.matmul(&v)
}

/// The dense additive mask [rows, 1, queries, keys] of `ranges`. `see_something` gives a query that sees nothing
/// key 0 instead (the stock softmax of an all -inf row is NaN, which its backward spreads to every dK and dV).
fn dense_mask(
    ranges: &Ranges,
    rows: usize,
    queries: usize,
    keys: usize,
    see_something: bool,
) -> candle_core::Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; rows * queries * keys];
    for (i, &[first, end]) in ranges.iter().enumerate() {
        let end = (end as usize).min(keys);
        let first = (first as usize).min(end);
        let range = if first == end && see_something {
            0..1
        } else {
            first..end
        };
        m[i * keys..][range].fill(0.0);
    }
    Tensor::from_vec(m, (rows, 1, queries, keys), &Device::Cpu)
}

/// 1 where the query sees at least one key, else 0: [rows, 1, queries, 1].
fn sees_keys(ranges: &Ranges, rows: usize, queries: usize) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = ranges
        .iter()
        .map(|&[f, e]| if f < e { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(v, (rows, 1, queries, 1), &Device::Cpu)
}

/// q [2, 6, n, 8] over k, v [2, 2, n, 8] (n_rep 3) under `mask`: the fused op against the stock formulation.
fn matches_stock(mask: &AttentionMask, queries: usize, keys: usize) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(31);
    let (rows, heads, kv_heads, d, scale) = (2, 6, 2, 8, 0.35);
    let ranges = mask.ranges()?;
    let var = |n: usize, shape: (usize, usize, usize, usize), rng: &mut Normal| {
        Var::from_vec(rng.vec(n, 1.0), shape, &dev)
    };
    let q = var(
        rows * heads * queries * d,
        (rows, heads, queries, d),
        &mut rng,
    )?;
    let k = var(
        rows * kv_heads * keys * d,
        (rows, kv_heads, keys, d),
        &mut rng,
    )?;
    let v = var(
        rows * kv_heads * keys * d,
        (rows, kv_heads, keys, d),
        &mut rng,
    )?;
    let live = sees_keys(&ranges, rows, queries)?;
    let probe = Tensor::from_vec(
        rng.vec(rows * heads * queries * d, 1.0),
        (rows, heads, queries, d),
        &dev,
    )?
    .broadcast_mul(&live)?;

    let fused = attention(&q, &k, &v, mask, scale)?;
    let stock = stock_attention(
        &q,
        &k,
        &v,
        &dense_mask(&ranges, rows, queries, keys, false)?,
        scale,
    )?;
    // Queries that see keys agree with the stock op; the others are 0 (the stock op gives NaN there).
    let (f, s, l) = (
        flat(&fused)?,
        flat(&stock)?,
        flat(&live.broadcast_as(fused.shape())?)?,
    );
    let visible = |x: &[f32]| -> Vec<f32> {
        x.iter()
            .zip(&l)
            .filter(|(_, &l)| l > 0.0)
            .map(|(&x, _)| x)
            .collect()
    };
    assert!(
        l.iter().any(|&l| l > 0.0) && l.contains(&0.0),
        "the mask should pad some queries"
    );
    assert_close("attention forward", &visible(&f), &visible(&s), STOCK_F32)?;
    assert!(
        f.iter().zip(&l).all(|(&f, &l)| l > 0.0 || f == 0.0),
        "a query that sees nothing gives 0"
    );

    // Gradients: the probe is 0 at the padded queries, so the stock op may let them see key 0 without effect.
    let stock = stock_attention(
        &q,
        &k,
        &v,
        &dense_mask(&ranges, rows, queries, keys, true)?,
        scale,
    )?;
    let g_fused = probe_gradients(&fused, &probe, [&q, &k, &v].map(|x| x.as_tensor()))?;
    let g_stock = probe_gradients(&stock, &probe, [&q, &k, &v].map(|x| x.as_tensor()))?;
    for (name, (a, b)) in ["q", "k", "v"]
        .into_iter()
        .zip(g_fused.iter().zip(&g_stock))
    {
        let (a, b) = (flat(a)?, flat(b)?);
        assert!(b.iter().any(|&b| b != 0.0));
        assert_close(&format!("attention d{name}"), &a, &b, STOCK_F32)?;
    }
    // One node over q, k, v: no [rows, heads, queries, keys] intermediate is part of the graph.
    assert_eq!(fused.sorted_nodes().len(), 4);
    Ok(())
}

#[test]
fn attention_matches_stock_gqa_with_padding() -> candle_core::Result<()> {
    // 7 queries; row 1 has 4 real queries; with and without a sliding window.
    for window in [None, Some(3)] {
        matches_stock(
            &AttentionMask::causal(&[7, 4], 7, 0, window, &Device::Cpu)?,
            7,
            7,
        )?;
    }
    // A chunk of 3 queries after 6 cached keys (row 1 pads one query).
    matches_stock(
        &AttentionMask::causal(&[9, 8], 3, 6, None, &Device::Cpu)?,
        3,
        9,
    )
}

#[test]
fn attention_matches_stock_with_packed_rows() -> candle_core::Result<()> {
    let boundaries = [vec![0, 3, 4, 8], vec![0, 5, 7]];
    matches_stock(
        &AttentionMask::packed(&boundaries, 9, None, &Device::Cpu)?,
        9,
        9,
    )?;
    matches_stock(
        &AttentionMask::packed(&boundaries, 9, Some(2), &Device::Cpu)?,
        9,
        9,
    )
}

#[test]
fn masked_softmax_matches_stock_softmax_in_value_and_gradient() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(5);
    let (rows, groups, n_rep, queries, keys, scale) = (2, 2, 3, 4, 6, 0.5);
    let mask = AttentionMask::causal(&[6, 5], queries, 2, Some(3), &dev)?;
    let ranges = mask.ranges()?;
    let shape = (rows, groups, n_rep * queries, keys);
    let s = Var::from_vec(
        rng.vec(shape.0 * shape.1 * shape.2 * shape.3, 2.0),
        shape,
        &dev,
    )?;
    let probe = Tensor::from_vec(rng.vec(s.elem_count(), 1.0), shape, &dev)?;
    let fused = masked_softmax(&s, &mask, scale)?;
    // The stock formula on [rows, groups, n_rep, queries, keys] so the mask broadcasts over groups and n_rep.
    let additive =
        dense_mask(&ranges, rows, queries, keys, true)?.reshape((rows, 1, 1, queries, keys))?;
    let x = (s.reshape((rows, groups, n_rep, queries, keys))? * scale)?.broadcast_add(&additive)?;
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    let stock = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .reshape(shape)?;
    // Row 1's last query sees nothing: the fused op gives zeros, the stock op (seeing key 0) a one-hot row.
    let live = sees_keys(&ranges, rows, queries)?.reshape((rows, 1, 1, queries, 1))?;
    let live = live
        .broadcast_as((rows, groups, n_rep, queries, keys))?
        .reshape(shape)?;
    let tol = Tolerance::for_dtype(DType::F32);
    assert_close(
        "masked softmax",
        &flat(&fused)?,
        &flat(&(&stock * &live)?)?,
        tol,
    )?;
    let probe = (probe * &live)?;
    let [a] = probe_gradients(&fused, &probe, [s.as_tensor()])?;
    let [b] = probe_gradients(&stock, &probe, [s.as_tensor()])?;
    assert_close(
        "masked softmax gradient",
        &flat(&a)?,
        &flat(&b)?,
        Tolerance {
            rel: 1e-4,
            abs: 1e-6,
        },
    )?;
    assert_eq!(fused.sorted_nodes().len(), 2);
    Ok(())
}

#[test]
fn detached_inputs_give_no_graph() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 4, 3, 8), &dev)?;
    let kv = Tensor::randn(0f32, 1., (1, 2, 3, 8), &dev)?;
    let mask = AttentionMask::causal(&[3], 3, 0, None, &dev)?;
    let out = attention(&q, &kv, &kv, &mask, 0.5)?;
    assert!(!out.track_op());
    assert_eq!(out.dims(), [1, 4, 3, 8]);
    Ok(())
}

#[test]
fn bf16_attention_stays_close_to_f32() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let mut rng = Normal::new(17);
    let (rows, heads, kv_heads, n, d) = (2, 6, 2, 24, 16);
    let mask = AttentionMask::causal(&[24, 17], n, 0, None, &dev)?;
    // Inputs representable in bf16, so the two runs differ only by the op's own roundings.
    let input = |shape: (usize, usize, usize, usize), rng: &mut Normal| {
        Tensor::from_vec(
            rng.vec(shape.0 * shape.1 * shape.2 * shape.3, 1.0),
            shape,
            &dev,
        )?
        .to_dtype(DType::BF16)
    };
    let q = input((rows, heads, n, d), &mut rng)?;
    let k = input((rows, kv_heads, n, d), &mut rng)?;
    let v = input((rows, kv_heads, n, d), &mut rng)?;
    let probe = input((rows, heads, n, d), &mut rng)?;
    let run = |dtype: DType| -> candle_core::Result<Vec<Vec<f32>>> {
        let vars = [&q, &k, &v].map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
        let out = attention(&vars[0], &vars[1], &vars[2], &mask, 0.25)?;
        let grads = (&out * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
        let mut all = vec![flat(&out)?];
        for var in &vars {
            all.push(flat(grads.get(var).unwrap())?);
        }
        Ok(all)
    };
    let (low, high) = (run(DType::BF16)?, run(DType::F32)?);
    for (name, (a, b)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(low.iter().zip(&high))
    {
        // bf16 keeps 8 bits: each value within a few roundings of its row's scale.
        let size = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_close(
            &format!("bf16 {name}"),
            a,
            b,
            Tolerance {
                rel: 0.02,
                abs: 0.02 * size,
            },
        )?;
    }
    Ok(())
}

/// The GPU's formulation (score and output GEMMs around the masked softmax), run on the CPU, against the CPU twin that
/// computes only the visible scores: values and q, k, v gradients, f32 and bf16, GQA, padding, a cache offset,
/// windows, packed rows.
#[test]
fn gemm_formulation_matches_the_cpu_twin() -> candle_core::Result<()> {
    use kto_kernels::attention::gemm_attention;
    let dev = Device::Cpu;
    let masks = [
        (AttentionMask::causal(&[7, 4], 7, 0, Some(3), &dev)?, 7),
        (AttentionMask::causal(&[9, 8], 3, 6, None, &dev)?, 9),
        (
            AttentionMask::packed(&[vec![0, 3, 4, 8], vec![0, 5, 7]], 9, None, &dev)?,
            9,
        ),
    ];
    let mut rng = Normal::new(23);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (mask, keys) in &masks {
            let (rows, heads, kv_heads, d, queries) = (2, 6, 2, 40, mask.queries());
            let make = |n: usize, rng: &mut Normal| rng.vec(n, 1.0);
            let q0 = Tensor::from_vec(
                make(rows * heads * queries * d, &mut rng),
                (rows, heads, queries, d),
                &dev,
            )?;
            let k0 = Tensor::from_vec(
                make(rows * kv_heads * keys * d, &mut rng),
                (rows, kv_heads, *keys, d),
                &dev,
            )?;
            let v0 = Tensor::from_vec(
                make(rows * kv_heads * keys * d, &mut rng),
                (rows, kv_heads, *keys, d),
                &dev,
            )?;
            let probe = Tensor::from_vec(
                make(rows * heads * queries * d, &mut rng),
                (rows, heads, queries, d),
                &dev,
            )?;
            let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
                let vars =
                    [&q0, &k0, &v0].map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
                let y = f(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                )?;
                let grads = (y.to_dtype(DType::F32)? * &probe)?.sum_all()?.backward()?;
                let mut out = vec![flat(&y)?];
                for v in &vars {
                    out.push(flat(grads.get(v.as_tensor()).unwrap())?);
                }
                Ok::<_, candle_core::Error>(out)
            };
            let twin = run(&|q, k, v| attention(q, k, v, mask, 0.2))?;
            let gemms = run(&|q, k, v| gemm_attention(q, k, v, mask, 0.2))?;
            let tol = gemm_attention_tolerance(dtype);
            for (i, (a, b)) in twin.iter().zip(&gemms).enumerate() {
                assert_close(
                    &format!("{dtype:?} output {i} (value, dq, dk, dv)"),
                    a,
                    b,
                    tol,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn cpu_twin_backward_matches_finite_differences() -> candle_core::Result<()> {
    use kto_kernels::attention_cpu::{backward_twin, forward_twin, AttentionDims};
    let dims = AttentionDims {
        rows: 2,
        heads: 4,
        kv_heads: 2,
        queries: 5,
        keys: 7,
        d: 6,
    };
    let mask = AttentionMask::causal(&[7, 5], 5, 2, Some(4), &Device::Cpu)?;
    let ranges = mask.ranges()?;
    let mut rng = Normal::new(29);
    let nq = dims.rows * dims.heads * dims.queries * dims.d;
    let nk = dims.rows * dims.kv_heads * dims.keys * dims.d;
    let (q, k, v, probe) = (
        rng.vec(nq, 1.0),
        rng.vec(nk, 1.0),
        rng.vec(nk, 1.0),
        rng.vec(nq, 1.0),
    );
    let (mut dq, mut dk, mut dv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
    backward_twin(
        &q, &k, &v, &probe, &ranges, dims, 0.4, &mut dq, &mut dk, &mut dv,
    );
    let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
        let mut out = vec![0f32; nq];
        forward_twin(q, k, v, &ranges, dims, 0.4, &mut out);
        probe_loss(&out, &probe)
    };
    check_gradient("attention dq", &q, &dq, |x| loss(x, &k, &v), 1e-2, 2e-3, 60)?;
    check_gradient("attention dk", &k, &dk, |x| loss(&q, x, &v), 1e-2, 2e-3, 60)?;
    check_gradient("attention dv", &v, &dv, |x| loss(&q, &k, x), 1e-2, 2e-3, 60)
}
