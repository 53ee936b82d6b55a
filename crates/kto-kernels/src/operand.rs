//! What a kernel (or a CPU twin) reads of an operand: its elements packed row-major from the layout's start offset,
//! inside the storage. Both faces of every op go through [`packed`] — the twins through `Float::slice`, the CUDA
//! launches through `cuda::address` — so a strided, broadcast or out-of-range operand is refused with the op and
//! the layout named, instead of the GPU reading the wrong elements.

use candle_core::{bail, Layout, Result};
use std::ops::Range;

/// The storage elements of `layout` when they are packed row-major from its start offset and lie inside a storage
/// of `storage_len` elements; otherwise an error naming `what` (the op and the operand) and the layout.
pub fn packed(what: &str, layout: &Layout, storage_len: usize) -> Result<Range<usize>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!(
            "{what}: the kernel reads its elements packed row-major, but the layout is shape {:?}, stride {:?}, \
             start offset {} (make it contiguous first)",
            layout.dims(),
            layout.stride(),
            layout.start_offset()
        );
    };
    if end > storage_len {
        bail!(
            "{what}: the layout (shape {:?}, start offset {start}) ends at element {end}, past the {storage_len} \
             elements of its storage",
            layout.dims()
        );
    }
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    fn message(r: Result<Range<usize>>) -> String {
        format!("{}", r.unwrap_err())
    }

    #[test]
    fn a_contiguous_layout_gives_its_range_from_the_start_offset() -> Result<()> {
        let t = Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?;
        assert_eq!(packed("op x", t.layout(), 24)?, 0..24);
        // rows 1..3 of a row-major matrix are still packed, from element 6
        let rows = t.narrow(0, 1, 2)?;
        assert_eq!(packed("op x", rows.layout(), 24)?, 6..18);
        // a size-1 dimension's stride does not matter
        let one = t.narrow(0, 3, 1)?.narrow(1, 2, 4)?;
        assert_eq!(packed("op x", one.layout(), 24)?, 20..24);
        Ok(())
    }

    #[test]
    fn strided_and_broadcast_layouts_are_refused_naming_the_op_and_layout() -> Result<()> {
        let t = Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?;
        let columns = t.narrow(1, 2, 3)?;
        let m = message(packed("lora epilogue h", columns.layout(), 24));
        assert!(m.contains("lora epilogue h"), "{m}");
        assert!(
            m.contains("stride [6, 1]") && m.contains("start offset 2"),
            "{m}"
        );
        let transposed = t.t()?;
        let m = message(packed("rms_norm x", transposed.layout(), 24));
        assert!(
            m.contains("rms_norm x") && m.contains("stride [1, 6]"),
            "{m}"
        );
        let broadcast = Tensor::zeros(6, DType::F32, &Device::Cpu)?.broadcast_as((3, 6))?;
        let m = message(packed("swiglu gate_up", broadcast.layout(), 6));
        assert!(m.contains("stride [0, 1]"), "{m}");
        Ok(())
    }

    #[test]
    fn a_layout_past_its_storage_is_refused() -> Result<()> {
        let t = Tensor::zeros((4, 6), DType::F32, &Device::Cpu)?.narrow(0, 2, 2)?;
        assert_eq!(packed("op x", t.layout(), 24)?, 12..24);
        let m = message(packed("logprobs logits", t.layout(), 20));
        assert!(
            m.contains("logprobs logits") && m.contains("ends at element 24, past the 20"),
            "{m}"
        );
        Ok(())
    }
}
