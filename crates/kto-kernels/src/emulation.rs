//! Runs a [`Launch`] on the CPU through the fiber runtime (`emulation/runtime.cpp`): the same `.cu` source the GPU
//! runs, compiled as C++. Test builds only (the `emulation` feature).
//!
//! The threads of a block run one at a time between synchronisation points, in [`Order::Ascending`] or
//! [`Order::Descending`] thread (and block) order; a kernel whose result depends on the order has a race. Buffers
//! come from [`GuardedBuffer`], which ends flush against an inaccessible page, so a read or write past the end
//! faults, and is framed by canaries that catch a write before the start.

use crate::kernel::{Arg, Launch};
use candle_core::{bail, Result};
use std::ffi::c_void;

extern "C" {
    fn kto_simt_launch(
        entry: unsafe extern "C" fn(*const *mut c_void),
        args: *const *mut c_void,
        grid: *const u32,
        block: *const u32,
        shared_bytes: usize,
        descending: i32,
        error: *mut u8,
        error_len: usize,
    ) -> i32;
}

/// The order the threads of a block (and the blocks of the grid) take turns in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

impl Order {
    pub const BOTH: [Order; 2] = [Order::Ascending, Order::Descending];
}

/// Runs `launch` to completion on this thread. Pointer arguments must be host addresses (see [`GuardedBuffer`]).
pub fn run(launch: &Launch, order: Order) -> Result<()> {
    let kernel = launch.kernel;
    let name = launch.entry_name();
    let Some(&(_, entry, signature)) = kernel.emulated.iter().find(|(d, _, _)| *d == launch.dtype)
    else {
        bail!("{name}: no emulated variant");
    };
    // The C++ signature must be the declared one, parameter for parameter.
    let mut kinds = [0i32; 64];
    let count = unsafe { signature(kinds.as_mut_ptr(), kinds.len() as i32) } as usize;
    let declared: Vec<i32> = kernel
        .params
        .iter()
        .map(|p| p.kind.emulation_code())
        .collect();
    if kinds[..count.min(64)] != declared[..] {
        bail!(
            "{name}: the C++ kernel takes parameters of kinds {:?}, the Rust declaration {:?} (0 pointer, 1 int, \
             2 unsigned, 3 float, 4 int64, 5 uint64)",
            &kinds[..count.min(64)],
            declared
        );
    }
    let args: Vec<*mut c_void> = launch
        .args
        .iter()
        .map(|a| a.as_ptr() as *mut c_void)
        .collect();
    let mut error = vec![0u8; 1024];
    let rc = unsafe {
        kto_simt_launch(
            entry,
            args.as_ptr(),
            launch.grid.as_ptr(),
            launch.block.as_ptr(),
            launch.shared_bytes as usize,
            (order == Order::Descending) as i32,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if rc != 0 {
        let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
        bail!(
            "{name} ({order:?}): {}",
            String::from_utf8_lossy(&error[..end])
        );
    }
    Ok(())
}

const CANARY: u8 = 0xA5;
const CANARY_BYTES: usize = 64;

/// A host buffer for emulated kernels: its end touches a `PROT_NONE` page (an access past the end faults at once)
/// and canary bytes before its start reveal a write before it ([`GuardedBuffer::check`]).
pub struct GuardedBuffer<T: Copy> {
    base: *mut u8,
    mapped: usize,
    data: *mut T,
    len: usize,
}

// The buffer owns its mapping.
unsafe impl<T: Copy + Send> Send for GuardedBuffer<T> {}

extern "C" {
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64)
        -> *mut c_void;
    fn munmap(addr: *mut c_void, len: usize) -> i32;
    fn mprotect(addr: *mut c_void, len: usize, prot: i32) -> i32;
}
const PROT_NONE: i32 = 0;
const PROT_READ_WRITE: i32 = 3;
const MAP_PRIVATE_ANONYMOUS: i32 = 0x02 | 0x20;
const PAGE: usize = 4096;

impl<T: Copy> GuardedBuffer<T> {
    pub fn from_slice(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        let data_pages = (bytes + CANARY_BYTES).div_ceil(PAGE);
        let mapped = (data_pages + 1) * PAGE;
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                mapped,
                PROT_READ_WRITE,
                MAP_PRIVATE_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            !base.is_null() && base as isize != -1,
            "mmap of a guarded buffer failed"
        );
        let base = base as *mut u8;
        unsafe {
            assert_eq!(
                mprotect(base.add(data_pages * PAGE) as *mut c_void, PAGE, PROT_NONE),
                0
            );
            std::ptr::write_bytes(base, CANARY, data_pages * PAGE);
        }
        // Flush against the guard page; element alignment holds because sizes are multiples of it.
        let data = unsafe { base.add(data_pages * PAGE - bytes) } as *mut T;
        assert_eq!(data as usize % std::mem::align_of::<T>(), 0);
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), data, values.len()) };
        Self {
            base,
            mapped,
            data,
            len: values.len(),
        }
    }

    pub fn filled(len: usize, value: T) -> Self {
        Self::from_slice(&vec![value; len])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address to pass as a kernel argument.
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.data as u64)
    }

    pub fn as_slice(&self) -> &[T] {
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }

    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }

    pub fn fill(&mut self, values: &[T]) {
        assert_eq!(values.len(), self.len);
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.data, self.len) };
    }

    /// Fails if anything wrote into the bytes before the buffer.
    pub fn check(&self) -> Result<()> {
        let start = self.data as usize - self.base as usize;
        let before = unsafe { std::slice::from_raw_parts(self.base, start) };
        if let Some(p) = before.iter().rposition(|&b| b != CANARY) {
            bail!(
                "a kernel wrote {} bytes before the start of a buffer",
                start - p
            );
        }
        Ok(())
    }
}

impl<T: Copy> Drop for GuardedBuffer<T> {
    fn drop(&mut self) {
        unsafe { munmap(self.base as *mut c_void, self.mapped) };
    }
}

/// Kernels of `emulation/harness.cu`, which exist to show that the harness catches the classic kernel bugs
/// (tests/harness.rs). Each broken kernel computes what its correct twin does, with one bug.
pub mod harness {
    use crate::kernels;

    kernels! {
        module "harness";
        /// Σx and Σx² per row (one block per row), two block reductions sharing a scratch buffer.
        pub TWO_SUMS = harness_two_sums [F32 f32] (x: Ptr, out: Ptr, dim: I32) max_threads 1024, shared 0;
        /// Bug: the reduction lacks its closing barrier.
        pub TWO_SUMS_MISSING_BARRIER = harness_two_sums_missing_barrier [F32 f32] (x: Ptr, out: Ptr, dim: I32)
            max_threads 1024, shared 0;
        /// Bug: reads one element past each row.
        pub TWO_SUMS_OFF_BY_ONE = harness_two_sums_off_by_one [F32 f32] (x: Ptr, out: Ptr, dim: I32)
            max_threads 1024, shared 0;
        /// Each lane takes its neighbour's value through shared memory, with or without `__syncwarp`.
        pub NEIGHBOUR_SWAP = harness_neighbour_swap [F32 f32] (x: Ptr, out: Ptr, sync: I32)
            max_threads 1024, shared 4096;
        /// Bug: only the first warp reaches the barrier.
        pub DIVERGENT_BARRIER = harness_divergent_barrier [F32 f32] (out: Ptr) max_threads 1024, shared 0;
        /// Bug: the halves of the block wait at different barriers.
        pub SPLIT_BARRIER = harness_split_barrier [F32 f32] (out: Ptr) max_threads 1024, shared 0;
        /// Bug: lane 0 exits before a shuffle it takes part in.
        pub SHUFFLE_AFTER_EXIT = harness_shuffle_after_exit [F32 f32] (out: Ptr) max_threads 1024, shared 0;
        /// Bug: only block 0 writes the static shared value every block reads.
        pub SHARED_FROM_ANOTHER_BLOCK = harness_shared_from_another_block [F32 f32] (out: Ptr)
            max_threads 1024, shared 0;
        /// Bug in the declaration, not the kernel: `dim` declared a float.
        pub MISDECLARED = harness_two_sums [F32 f32] (x: Ptr, out: Ptr, dim: F32) max_threads 1024, shared 0;
    }
}
