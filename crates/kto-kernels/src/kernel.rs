//! What a kernel is to the Rust side: its name, module, dtype variants, parameter list and launch limits
//! ([`Kernel`]), and one launch of it ([`Launch`]) that runs unchanged on CUDA ([`crate::cuda`]) or under the CPU
//! emulation ([`crate::emulation`]).
//!
//! Each op module declares its kernels with [`kernels!`]. The parameter list written there is checked three ways:
//! every [`Launch`] against it (count and kind), the emulated entry against the C++ signature at every emulated
//! launch, and the PTX `.entry` parameter list against it in `tests/ptx.rs`.

use candle_core::{bail, DType, Result};

/// The kind of a kernel parameter: its C type, and its PTX width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A device pointer (`const T*` / `T*`): `.u64` in PTX.
    Ptr,
    I32,
    U32,
    F32,
    I64,
    U64,
}

impl ArgKind {
    /// The code `kernels/simt.hpp` gives the same C type (`simt::ParamKind`).
    pub fn emulation_code(self) -> i32 {
        match self {
            ArgKind::Ptr => 0,
            ArgKind::I32 => 1,
            ArgKind::U32 => 2,
            ArgKind::F32 => 3,
            ArgKind::I64 => 4,
            ArgKind::U64 => 5,
        }
    }

    /// (bytes, is a float) as PTX declares the parameter.
    pub fn ptx_width(self) -> (usize, bool) {
        match self {
            ArgKind::Ptr | ArgKind::I64 | ArgKind::U64 => (8, false),
            ArgKind::I32 | ArgKind::U32 => (4, false),
            ArgKind::F32 => (4, true),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub kind: ArgKind,
}

/// An emulated entry: the kernel called with its arguments unpacked from an array of pointers.
pub type EmulatedEntry = unsafe extern "C" fn(args: *const *mut std::ffi::c_void);
/// Writes the kinds of the C++ parameters; returns their count.
pub type EmulatedSignature = unsafe extern "C" fn(kinds: *mut i32, max: i32) -> i32;

/// One `extern "C"` kernel family of a `.cu` file: `<name>_<dtype>` for each dtype it is instantiated for.
#[derive(Debug)]
pub struct Kernel {
    /// The `.cu` file (without extension) that defines it: one PTX module per file.
    pub module: &'static str,
    pub name: &'static str,
    /// The dtypes it is instantiated for, as suffixes of the entry names.
    pub dtypes: &'static [DType],
    pub params: &'static [Param],
    /// The largest block the Rust side launches it with (checked against ptxas' register count in `tests/ptx.rs`).
    pub max_block_threads: u32,
    /// The most dynamic shared memory a launch asks for, in bytes.
    pub max_dynamic_shared: u32,
    #[cfg(feature = "emulation")]
    #[doc(hidden)]
    pub emulated: &'static [(DType, EmulatedEntry, EmulatedSignature)],
}

/// The entry-name suffix of a dtype.
pub fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        DType::U32 => "u32",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
        _ => "other",
    }
}

impl Kernel {
    /// The `extern "C"` name of the variant for `dtype`.
    pub fn entry_name(&self, dtype: DType) -> String {
        format!("{}_{}", self.name, dtype_suffix(dtype))
    }

    pub fn supports(&self, dtype: DType) -> bool {
        self.dtypes.contains(&dtype)
    }
}

/// One argument of a launch. Pointers are addresses: device addresses on CUDA, host addresses under emulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    I64(i64),
    U64(u64),
}

impl Arg {
    pub fn kind(&self) -> ArgKind {
        match self {
            Arg::Ptr(_) => ArgKind::Ptr,
            Arg::I32(_) => ArgKind::I32,
            Arg::U32(_) => ArgKind::U32,
            Arg::F32(_) => ArgKind::F32,
            Arg::I64(_) => ArgKind::I64,
            Arg::U64(_) => ArgKind::U64,
        }
    }

    /// The argument's bytes, as the kernel reads them.
    pub fn as_ptr(&self) -> *const std::ffi::c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *const _,
            Arg::I32(v) => v as *const i32 as *const _,
            Arg::U32(v) => v as *const u32 as *const _,
            Arg::F32(v) => v as *const f32 as *const _,
            Arg::I64(v) => v as *const i64 as *const _,
        }
    }
}

/// One launch: which kernel variant, the grid, and the arguments in the kernel's parameter order.
#[derive(Debug, Clone)]
pub struct Launch {
    pub kernel: &'static Kernel,
    pub dtype: DType,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
}

impl Launch {
    /// A launch of `kernel` for `dtype`; checks the arguments and limits against the declaration.
    pub fn new(
        kernel: &'static Kernel,
        dtype: DType,
        grid: [u32; 3],
        block: [u32; 3],
        shared_bytes: u32,
        args: Vec<Arg>,
    ) -> Result<Self> {
        if !kernel.supports(dtype) {
            bail!(
                "{}: no {dtype:?} variant (has {:?})",
                kernel.name,
                kernel.dtypes
            );
        }
        if args.len() != kernel.params.len() {
            bail!(
                "{}: {} arguments for {} parameters",
                kernel.name,
                args.len(),
                kernel.params.len()
            );
        }
        for (arg, param) in args.iter().zip(kernel.params) {
            if arg.kind() != param.kind {
                bail!(
                    "{}: argument `{}` is {:?}, the kernel takes {:?}",
                    kernel.name,
                    param.name,
                    arg.kind(),
                    param.kind
                );
            }
        }
        let threads = block.iter().map(|&b| b as u64).product::<u64>();
        if threads == 0 || threads > kernel.max_block_threads as u64 {
            bail!(
                "{}: a block of {threads} threads (declared at most {})",
                kernel.name,
                kernel.max_block_threads
            );
        }
        if shared_bytes > kernel.max_dynamic_shared {
            bail!(
                "{}: {shared_bytes} bytes of dynamic shared memory (declared at most {})",
                kernel.name,
                kernel.max_dynamic_shared
            );
        }
        if grid.contains(&0) {
            bail!("{}: empty grid {grid:?}", kernel.name);
        }
        Ok(Self {
            kernel,
            dtype,
            grid,
            block,
            shared_bytes,
            args,
        })
    }

    pub fn entry_name(&self) -> String {
        self.kernel.entry_name(self.dtype)
    }
}

/// Declares the kernels of one `.cu` module:
/// ```ignore
/// kernels! {
///     module "rmsnorm";
///     /// doc
///     pub RMSNORM_FWD = rmsnorm_fwd [F32 f32, BF16 bf16] (x: Ptr, ...) max_threads 1024, shared 0;
/// }
/// ```
/// Each dtype is given as the candle `DType` variant and the entry suffix.
#[macro_export]
#[doc(hidden)]
macro_rules! kernels {
    (module $module:literal; $(
        $(#[$doc:meta])*
        $vis:vis $konst:ident = $name:ident [$($dtype:ident $suffix:ident),+ $(,)?]
            ($($param:ident : $kind:ident),* $(,)?) max_threads $threads:literal, shared $shared:expr;
    )*) => {
        $(
            $(#[$doc])*
            $vis static $konst: $crate::kernel::Kernel = $crate::kernel::Kernel {
                module: $module,
                name: stringify!($name),
                dtypes: &[$(candle_core::DType::$dtype),+],
                params: &[$($crate::kernel::Param { name: stringify!($param), kind: $crate::kernel::ArgKind::$kind }),*],
                max_block_threads: $threads,
                max_dynamic_shared: $shared,
                #[cfg(feature = "emulation")]
                emulated: &[$(
                    $crate::__emulated_variant!($name $dtype $suffix)
                ),+],
            };
        )*
    };
}

#[cfg(feature = "emulation")]
#[macro_export]
#[doc(hidden)]
macro_rules! __emulated_variant {
    ($name:ident $dtype:ident $suffix:ident) => {
        paste::paste! {{
            extern "C" {
                fn [<kto_simt_entry_ $name _ $suffix>](args: *const *mut std::ffi::c_void);
                fn [<kto_simt_signature_ $name _ $suffix>](kinds: *mut i32, max: i32) -> i32;
            }
            (
                candle_core::DType::$dtype,
                [<kto_simt_entry_ $name _ $suffix>] as $crate::kernel::EmulatedEntry,
                [<kto_simt_signature_ $name _ $suffix>] as $crate::kernel::EmulatedSignature,
            )
        }}
    };
}
