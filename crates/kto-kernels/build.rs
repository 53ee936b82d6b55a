//! Builds the kernels in `kernels/*.cu` two ways, each only when its feature asks for it:
//! - `cuda`: nvcc 13.0 compiles every source to `compute_80` PTX (the 580 driver JITs it for A100, H100 and H200),
//!   embedded in the crate through `$OUT_DIR/ptx.rs`.
//! - `emulation`: the C++ compiler builds the same sources against `kernels/simt.hpp` and the fiber runtime in
//!   `emulation/`, so tests run every kernel on the CPU (the test builds enable it; a user build never does).

use std::path::{Path, PathBuf};
use std::process::Command;

// find_nvcc and nvcc_flags, shared with the PTX checks of tests/ptx.rs.
include!("src/toolchain.rs");

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=emulation");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let sources = cuda_sources(&root.join("kernels"));
    if std::env::var_os("CARGO_FEATURE_EMULATION").is_some() {
        build_emulation(&root, &sources);
    }
    // `kto_kernels::BUILD`, which `kto --version` shows: which kernels this build carries.
    let build = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_ptx(&root, &out, &sources)
    } else {
        "cpu only".into()
    };
    println!("cargo:rustc-env=KTO_KERNELS_BUILD={build}");
}

/// `kernels/*.cu`, sorted (headers are `.cuh` / `.hpp`).
fn cuda_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
}

fn build_emulation(root: &Path, sources: &[PathBuf]) {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .define("KTO_SIMT_EMULATION", None)
        .include(root.join("kernels"))
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter");
    // Kernels that exist to show the harness catches bugs (tests of the harness itself) come with the real ones.
    let harness = cuda_sources(&root.join("emulation"));
    for file in sources.iter().chain(&harness) {
        // All modules link into one library here (on the GPU each is its own PTX module): each gets a namespace of
        // its own so that two files' helpers of the same name cannot silently replace each other. The headers are
        // included first, outside it; the `extern "C"` entries keep their names inside it.
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        let wrapper = out.join(format!("emulated_{stem}.cpp"));
        let text = format!(
            "#include \"common.cuh\"\nnamespace kto_module_{stem} {{\n#include {:?}\n}}\n",
            file.display().to_string()
        );
        std::fs::write(&wrapper, text).unwrap();
        build.file(wrapper);
    }
    build.file(root.join("emulation/runtime.cpp"));
    build.compile("kto_simt");
}

/// Compiles every source to PTX; returns "cuda: PTX <arch>, CUDA <nvcc release>".
fn build_ptx(root: &Path, out: &Path, sources: &[PathBuf]) -> String {
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "the `cuda` feature needs nvcc 13.0: run `bash scripts/cuda-toolchain.sh` and `source /opt/cuda13/env.sh` \
             (or set NVCC)"
        )
    });
    let mut table = String::from(
        "/// (module, PTX) for every `kernels/*.cu`.\npub(crate) const PTX: &[(&str, &str)] = &[\n",
    );
    for file in sources {
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(nvcc_flags(root))
            .arg("-I")
            .arg(root.join("kernels"))
            .arg("-o")
            .arg(&ptx)
            .arg(file)
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        if !status.success() {
            panic!("nvcc failed on {}", file.display());
        }
        table.push_str(&format!(
            "    ({stem:?}, include_str!({:?})),\n",
            ptx.display().to_string()
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("ptx.rs"), table).unwrap();
    let arch = nvcc_flags(root)
        .iter()
        .find_map(|f| f.strip_prefix("-arch=").map(String::from))
        .unwrap_or_else(|| "unknown arch".into());
    // "Cuda compilation tools, release 13.0, V13.0.88" -> "13.0"
    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let release = version
        .split("release ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("unknown");
    format!("cuda: PTX {arch}, CUDA {release}")
}
