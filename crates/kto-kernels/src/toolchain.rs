// Where the CUDA compiler is and how the kernels are compiled: shared by build.rs (`include!`d there) and the PTX
// checks of `tests/ptx.rs`, so both compile exactly the same way.

/// nvcc from `$NVCC`, `$CUDA_ROOT/bin`, `$CUDA_PATH/bin`, `$CUDA_HOME/bin`, /opt/cuda13/bin (scripts/cuda-toolchain.sh),
/// /usr/local/cuda/bin or `PATH`.
pub fn find_nvcc() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(std::path::PathBuf::from(p));
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(dir) = std::env::var_os(var) {
            let p = std::path::PathBuf::from(dir).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    for dir in ["/opt/cuda13/bin/nvcc", "/usr/local/cuda/bin/nvcc"] {
        let p = std::path::PathBuf::from(dir);
        if p.exists() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.exists())
    })
}

/// The nvcc flags, shared with tests/ptx.rs: `kernels/nvcc.flags`, one per line.
pub fn nvcc_flags(root: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(root.join("kernels/nvcc.flags"))
        .expect("kernels/nvcc.flags")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}
