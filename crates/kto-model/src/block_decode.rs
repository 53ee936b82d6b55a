//! Quantized blocks to f32 on the CPU for the block types a base is held in (`[model] quantize`, llama.cpp's
//! files): the values candle's `GgmlType::to_float` gives, bit for bit (the same f32 operations in the same order,
//! never fused), written over fixed-size chunks so that the compiler vectorizes them. candle's loops write through a
//! running output index that keeps them scalar: on the TinyLlama-1.1B shape held as q4_k, every product
//! dequantizes its weight again, and that scalar decoding was most of the 1.4x s/step over the f32 base.
//! Types without a decoder here go through candle's.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Decodes whole blocks: `bytes` is a multiple of the type's block bytes and `out` holds their values.
pub(crate) type Decoder = fn(&[u8], &mut [f32]);

/// This module's decoder for `block_type`, where it has one: AVX2 where the CPU has it, else the same code for the
/// build's baseline (SSE2 on x86-64).
pub(crate) fn decoder(block_type: GgmlDType) -> Option<Decoder> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return match block_type {
            GgmlDType::Q4_0 => Some(avx2::q4_0),
            GgmlDType::Q4_1 => Some(avx2::q4_1),
            GgmlDType::Q8_0 => Some(avx2::q8_0),
            GgmlDType::Q4K => Some(avx2::q4_k),
            GgmlDType::Q5K => Some(avx2::q5_k),
            GgmlDType::Q6K => Some(avx2::q6_k),
            _ => None,
        };
    }
    baseline(block_type)
}

/// The decoders compiled for the build's baseline target (also what the tests compare on every machine).
pub(crate) fn baseline(block_type: GgmlDType) -> Option<Decoder> {
    match block_type {
        GgmlDType::Q4_0 => Some(q4_0),
        GgmlDType::Q4_1 => Some(q4_1),
        GgmlDType::Q8_0 => Some(q8_0),
        GgmlDType::Q4K => Some(q4_k),
        GgmlDType::Q5K => Some(q5_k),
        GgmlDType::Q6K => Some(q6_k),
        _ => None,
    }
}

#[inline(always)]
fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_0: 18 bytes, f16 scale `d` then 16 bytes of nibbles; value `j` is the low nibble of byte `j`, value `16 + j`
/// its high one, each `(q - 8) · d`.
#[inline(always)]
fn q4_0_body(bytes: &[u8], out: &mut [f32]) {
    for (block, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = half_at(block, 0);
        let (low, high) = y.split_at_mut(16);
        for ((l, h), q) in low.iter_mut().zip(high).zip(&block[2..18]) {
            *l = ((q & 0x0F) as i16 - 8) as f32 * d;
            *h = ((q >> 4) as i16 - 8) as f32 * d;
        }
    }
}

/// Q4_1: 20 bytes, f16 `d` and `m`, 16 bytes of nibbles as Q4_0's, each `q · d + m`.
#[inline(always)]
fn q4_1_body(bytes: &[u8], out: &mut [f32]) {
    for (block, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let (d, m) = (half_at(block, 0), half_at(block, 2));
        let (low, high) = y.split_at_mut(16);
        for ((l, h), q) in low.iter_mut().zip(high).zip(&block[4..20]) {
            *l = (q & 0x0F) as f32 * d + m;
            *h = (q >> 4) as f32 * d + m;
        }
    }
}

/// Q8_0: 34 bytes, f16 `d` then 32 signed bytes, each `q · d`.
#[inline(always)]
fn q8_0_body(bytes: &[u8], out: &mut [f32]) {
    for (block, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = half_at(block, 0);
        for (y, &q) in y.iter_mut().zip(&block[2..34]) {
            *y = q as i8 as f32 * d;
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) packed in a K-quant's 12 scale bytes (llama.cpp's
/// `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The (scale, min) of a K-quant group's low and high sub-blocks: `d·scale` and `dmin·min`, candle's products.
#[inline(always)]
fn group_scales(group: usize, d: f32, min: f32, scales: &[u8]) -> ((f32, f32), (f32, f32)) {
    let (sc, m) = scale_min_k4(2 * group, scales);
    let low = (d * sc as f32, min * m as f32);
    let (sc, m) = scale_min_k4(2 * group + 1, scales);
    (low, (d * sc as f32, min * m as f32))
}

/// Q4_K: 144 bytes, f16 `d` and `dmin`, 12 scale bytes, 128 bytes of nibbles; 4 groups of 64 values, the 32 low
/// nibbles of a group's bytes then the 32 high ones, sub-block `s` being `d·scale_s · q − dmin·min_s`.
#[inline(always)]
fn q4_k_body(bytes: &[u8], out: &mut [f32]) {
    for (block, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let (d, min) = (half_at(block, 0), half_at(block, 2));
        let scales = &block[4..16];
        for (group, (qs, y)) in block[16..144]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let ((d1, m1), (d2, m2)) = group_scales(group, d, min, scales);
            let (low, high) = y.split_at_mut(32);
            for ((l, h), q) in low.iter_mut().zip(high).zip(qs) {
                *l = d1 * (q & 0x0F) as f32 - m1;
                *h = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

/// Q5_K: 176 bytes, Q4_K's header, 32 bytes of fifth bits (`qh`), 128 bytes of nibbles; value `l` of a group's low
/// (high) half takes bit `2·group` (`2·group + 1`) of `qh[l]` as its 16. candle adds 16.0 to the nibble as f32:
/// the same exact integer as or-ing the bit in.
#[inline(always)]
fn q5_k_body(bytes: &[u8], out: &mut [f32]) {
    for (block, y) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
        let (d, min) = (half_at(block, 0), half_at(block, 2));
        let scales = &block[4..16];
        let qh = &block[16..48];
        for (group, (qs, y)) in block[48..176]
            .chunks_exact(32)
            .zip(y.chunks_exact_mut(64))
            .enumerate()
        {
            let ((d1, m1), (d2, m2)) = group_scales(group, d, min, scales);
            let (low, high) = y.split_at_mut(32);
            for (((l, h), q), bits) in low.iter_mut().zip(high).zip(qs).zip(qh) {
                let bits = bits >> (2 * group);
                *l = d1 * ((q & 0x0F) | ((bits & 1) << 4)) as f32 - m1;
                *h = d2 * ((q >> 4) | ((bits & 2) << 3)) as f32 - m2;
            }
        }
    }
}

/// Q6_K: 210 bytes, 128 bytes of low nibbles (`ql`), 64 of high bit pairs (`qh`), 16 signed scales, f16 `d`; two
/// halves of 128 values, each four runs of 32 (`ql` low nibbles, `ql[32..]` low, `ql` high, `ql[32..]` high, with
/// `qh`'s bit pairs 0-1, 2-3, 4-5, 6-7), value `(d · scale) · (q − 32)`, a scale per 16 values.
#[inline(always)]
fn q6_k_body(bytes: &[u8], out: &mut [f32]) {
    for (block, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let d = half_at(block, 208);
        let scales = &block[192..208];
        for (half, y) in y.chunks_exact_mut(128).enumerate() {
            let ql = &block[64 * half..64 * half + 64];
            let qh = &block[128 + 32 * half..128 + 32 * half + 32];
            let sc = &scales[8 * half..8 * half + 8];
            let (run1, rest) = y.split_at_mut(32);
            let (run2, rest) = rest.split_at_mut(32);
            let (run3, run4) = rest.split_at_mut(32);
            // Each run of 32 is two scales' worth of 16.
            for part in 0..2 {
                let at = 16 * part..16 * part + 16;
                let scale = |k: usize| d * sc[part + 2 * k] as i8 as f32;
                let (s1, s2, s3, s4) = (scale(0), scale(1), scale(2), scale(3));
                let outs = run1[at.clone()]
                    .iter_mut()
                    .zip(&mut run2[at.clone()])
                    .zip(&mut run3[at.clone()])
                    .zip(&mut run4[at.clone()]);
                let ins = ql[at.clone()]
                    .iter()
                    .zip(&ql[32 + at.start..32 + at.end])
                    .zip(&qh[at]);
                for ((((y1, y2), y3), y4), ((&lo, &hi), &bits)) in outs.zip(ins) {
                    let q1 = ((lo & 0x0F) | ((bits & 3) << 4)) as i8 - 32;
                    let q2 = ((hi & 0x0F) | (((bits >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((lo >> 4) | (((bits >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((hi >> 4) | (((bits >> 6) & 3) << 4)) as i8 - 32;
                    *y1 = s1 * q1 as f32;
                    *y2 = s2 * q2 as f32;
                    *y3 = s3 * q3 as f32;
                    *y4 = s4 * q4 as f32;
                }
            }
        }
    }
}

/// The baseline-target decoders.
macro_rules! decoders {
    ($($name:ident => $body:ident),*) => {
        $(fn $name(bytes: &[u8], out: &mut [f32]) { $body(bytes, out) })*
    };
}
decoders!(q4_0 => q4_0_body, q4_1 => q4_1_body, q8_0 => q8_0_body, q4_k => q4_k_body, q5_k => q5_k_body,
          q6_k => q6_k_body);

/// The same bodies compiled for AVX2 (called only where the CPU has it). FMA is not enabled, and Rust never fuses a
/// multiply and an add on its own, so the values stay candle's.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    macro_rules! avx2_decoders {
        ($($name:ident => $body:ident),*) => {
            $(
                pub(super) fn $name(bytes: &[u8], out: &mut [f32]) {
                    #[target_feature(enable = "avx2")]
                    unsafe fn inner(bytes: &[u8], out: &mut [f32]) {
                        super::$body(bytes, out)
                    }
                    // SAFETY: `decoder` hands these out only where `is_x86_feature_detected!("avx2")`.
                    unsafe { inner(bytes, out) }
                }
            )*
        };
    }
    avx2_decoders!(q4_0 => q4_0_body, q4_1 => q4_1_body, q8_0 => q8_0_body, q4_k => q4_k_body,
                   q5_k => q5_k_body, q6_k => q6_k_body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{QStorage, QTensor};
    use candle_core::Device;
    use std::borrow::Cow;

    /// Random blocks: random bytes, with every f16 field a random finite value (so that a NaN's payload, which
    /// vector and scalar code may carry differently, never decides the comparison).
    fn random_blocks(block_type: GgmlDType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let size = block_type.type_size();
        let halves: &[usize] = match block_type {
            GgmlDType::Q4_0 | GgmlDType::Q8_0 => &[0],
            GgmlDType::Q4_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
            GgmlDType::Q6K => &[208],
            other => panic!("no decoder for {other:?}"),
        };
        let mut bytes: Vec<u8> = (0..blocks * size).map(|_| next() as u8).collect();
        for block in bytes.chunks_exact_mut(size) {
            for &at in halves {
                let value = (next() as f32 / u32::MAX as f32 - 0.5) * 0.02;
                block[at..at + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
            }
        }
        bytes
    }

    fn candle_values(block_type: GgmlDType, bytes: &[u8]) -> Vec<f32> {
        let values = bytes.len() / block_type.type_size() * block_type.block_size();
        let storage = QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, block_type).unwrap();
        QTensor::new(storage, (values,))
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn decoders_give_candles_values_bit_for_bit() {
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        for (seed, block_type) in types.into_iter().enumerate() {
            let bytes = random_blocks(block_type, 64, seed as u64);
            let want = candle_values(block_type, &bytes);
            assert!(want.iter().any(|v| *v != 0.0), "{block_type:?}: all zero");
            for (which, decode) in [
                ("baseline", baseline(block_type)),
                ("runtime", decoder(block_type)),
            ] {
                let decode = decode.unwrap_or_else(|| panic!("{block_type:?}: no {which} decoder"));
                let mut got = vec![f32::NAN; want.len()];
                decode(&bytes, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{block_type:?} {which}: value {i} is {g}, candle's {w}"
                    );
                }
            }
        }
    }
}
