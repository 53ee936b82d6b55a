//! `kto --version` says which build this is, so that a GPU check proves it runs the cuda build before anything else:
//! with the `cuda` feature, the PTX target of kto-kernels' kernels (kernels/nvcc.flags) and the CUDA release of the
//! nvcc that compiled them (found the way kto-kernels' build.rs finds it); without it, "cpu only".

// find_nvcc and nvcc_flags: the same lookup and flags as kto-kernels' build.rs.
include!("../kto-kernels/src/toolchain.rs");

fn main() {
    let kernels = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../kto-kernels");
    println!("cargo:rerun-if-changed=build.rs");
    let build = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        // What kto-kernels' build.rs watches, and only in a cuda build (a cpu build never looks for nvcc).
        println!(
            "cargo:rerun-if-changed={}",
            kernels.join("kernels/nvcc.flags").display()
        );
        for var in ["NVCC", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let arch = nvcc_flags(&kernels)
            .iter()
            .find_map(|f| f.strip_prefix("-arch=").map(String::from))
            .unwrap_or_else(|| "unknown arch".into());
        // "Cuda compilation tools, release 13.0, V13.0.88" -> "13.0". kto-kernels' build fails without nvcc.
        let release = find_nvcc()
            .and_then(|nvcc| {
                std::process::Command::new(nvcc)
                    .arg("--version")
                    .output()
                    .ok()
            })
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).to_string();
                text.split("release ")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .map(String::from)
            })
            .unwrap_or_else(|| "unknown".into());
        format!("cuda: PTX {arch}, CUDA {release}")
    } else {
        "cpu only".into()
    };
    println!("cargo:rustc-env=KTO_BUILD={build}");
}
