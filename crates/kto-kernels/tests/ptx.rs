//! The PTX itself, wherever nvcc 13.0 is found (CI installs it with scripts/cuda-toolchain.sh; elsewhere this prints
//! a skip line): every `kernels/*.cu` compiles to PTX with the flags build.rs uses, `ptxas -arch=sm_90 -v` accepts it
//! with no register spills, at most 48 KiB of static shared memory and registers for the largest block the Rust side
//! launches, and every `.entry` has exactly the parameters its Rust declaration lists (count, order, width).

use kto_kernels::kernel::{ArgKind, Kernel};
use kto_kernels::toolchain::{find_nvcc, nvcc_flags};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const REGISTERS_PER_BLOCK: u64 = 65536;
const STATIC_SHARED_LIMIT: u64 = 48 * 1024;

/// What ptxas reports for one entry.
#[derive(Debug, Default, Clone)]
struct EntryReport {
    registers: u64,
    spill_stores: u64,
    spill_loads: u64,
    stack_frame: u64,
    shared: u64,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sources() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    files
}

fn compile(nvcc: &Path, source: &Path, out: &Path) -> String {
    let ptx = out.join(source.file_stem().unwrap()).with_extension("ptx");
    let output = Command::new(nvcc)
        .args(nvcc_flags(&root()))
        .arg("-I")
        .arg(root().join("kernels"))
        .arg("-o")
        .arg(&ptx)
        .arg(source)
        .output()
        .expect("running nvcc");
    assert!(
        output.status.success(),
        "nvcc failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(&ptx).unwrap()
}

/// `ptxas -arch=sm_90 -v` on a PTX file: the report of every entry.
fn ptxas(nvcc: &Path, ptx_path: &Path) -> BTreeMap<String, EntryReport> {
    let ptxas = nvcc.with_file_name("ptxas");
    let output = Command::new(&ptxas)
        .args(["-arch=sm_90", "-v", "-o", "/dev/null"])
        .arg(ptx_path)
        .output()
        .expect("running ptxas");
    let text = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "ptxas failed on {}:\n{text}",
        ptx_path.display()
    );
    let number_before = |line: &str, unit: &str| -> Option<u64> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    let mut reports = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap().to_string();
            reports.insert(name.clone(), EntryReport::default());
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let report = reports.get_mut(name).unwrap();
        if line.contains("bytes stack frame") {
            report.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
            report.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            report.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            report.registers = number_before(line, "registers").unwrap_or(0);
            report.shared = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    reports
}

/// The `.param` widths of every `.entry` in a PTX file: (bytes, is a float) per parameter.
fn entry_params(ptx: &str) -> BTreeMap<String, Vec<(usize, bool)>> {
    let mut entries = BTreeMap::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim().strip_prefix(".visible .entry ") else {
            continue;
        };
        let name = rest.split('(').next().unwrap().trim().to_string();
        let mut params = Vec::new();
        if !rest.contains("()") {
            for param in lines.by_ref() {
                let param = param.trim();
                if param.starts_with(')') {
                    break;
                }
                let ty = param
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_else(|| panic!("unreadable parameter line `{param}` of {name}"));
                params.push(match ty {
                    ".u64" | ".s64" | ".b64" => (8, false),
                    ".u32" | ".s32" | ".b32" => (4, false),
                    ".f32" => (4, true),
                    ".f64" => (8, true),
                    ".u16" | ".s16" | ".b16" => (2, false),
                    ".u8" | ".s8" | ".b8" => (1, false),
                    other => panic!("parameter type {other} of {name}"),
                });
            }
        }
        entries.insert(name, params);
    }
    entries
}

#[test]
fn ptx_compiles_fits_sm90_and_matches_the_rust_declarations() {
    let Some(nvcc) = find_nvcc() else {
        assert!(
            std::env::var_os("KTO_REQUIRE_NVCC").is_none(),
            "KTO_REQUIRE_NVCC is set but no nvcc was found"
        );
        println!(
            "SKIPPED ptx checks: no nvcc found (bash scripts/cuda-toolchain.sh installs nvcc 13.0)"
        );
        return;
    };
    let out = std::env::temp_dir().join(format!("kto-ptx-check-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let kernels: Vec<&'static Kernel> = kto_kernels::all_kernels();
    let mut problems = Vec::new();
    let mut checked = 0;
    for source in sources() {
        let module = source.file_stem().unwrap().to_string_lossy().to_string();
        let ptx = compile(&nvcc, &source, &out);
        let ptx_path = out.join(&module).with_extension("ptx");
        let reports = ptxas(&nvcc, &ptx_path);
        let entries = entry_params(&ptx);
        // Every entry of the module is declared on the Rust side, and every declared variant exists.
        let declared: Vec<(String, &Kernel)> = kernels
            .iter()
            .filter(|k| k.module == module)
            .flat_map(|k| k.dtypes.iter().map(move |&d| (k.entry_name(d), *k)))
            .collect();
        for name in entries.keys() {
            if !declared.iter().any(|(n, _)| n == name) {
                problems.push(format!("{module}.cu: entry {name} has no Rust declaration"));
            }
        }
        for (name, kernel) in &declared {
            let Some(params) = entries.get(name) else {
                problems.push(format!(
                    "{module}.cu: declared entry {name} is not in the PTX"
                ));
                continue;
            };
            let want: Vec<(usize, bool)> =
                kernel.params.iter().map(|p| p.kind.ptx_width()).collect();
            if *params != want {
                let kinds: Vec<ArgKind> = kernel.params.iter().map(|p| p.kind).collect();
                problems.push(format!(
                    "{name}: PTX parameters {params:?} (bytes, float), Rust declares {kinds:?}"
                ));
            }
            let report = reports.get(name).cloned().unwrap_or_default();
            println!(
                "{name}: {} registers, {} B smem, {} B stack, spills {}/{}; launched with up to {} threads",
                report.registers,
                report.shared,
                report.stack_frame,
                report.spill_stores,
                report.spill_loads,
                kernel.max_block_threads
            );
            if report.spill_stores > 0 || report.spill_loads > 0 {
                problems.push(format!(
                    "{name}: spills {} bytes stored / {} loaded",
                    report.spill_stores, report.spill_loads
                ));
            }
            if report.shared > STATIC_SHARED_LIMIT {
                problems.push(format!(
                    "{name}: {} bytes of static shared memory",
                    report.shared
                ));
            }
            if report.shared + kernel.max_dynamic_shared as u64 > STATIC_SHARED_LIMIT {
                problems.push(format!(
                    "{name}: {} B static + {} B dynamic shared memory exceed 48 KiB",
                    report.shared, kernel.max_dynamic_shared
                ));
            }
            if report.registers * kernel.max_block_threads as u64 > REGISTERS_PER_BLOCK {
                problems.push(format!(
                    "{name}: {} registers × {} threads exceed the {REGISTERS_PER_BLOCK} registers of a block",
                    report.registers, kernel.max_block_threads
                ));
            }
            checked += 1;
        }
    }
    std::fs::remove_dir_all(&out).ok();
    assert!(
        problems.is_empty(),
        "PTX problems:\n{}",
        problems.join("\n")
    );
    assert!(checked > 0, "no kernel entries were checked");
    println!("checked {checked} kernel entries with {}", nvcc.display());
}

#[test]
fn every_kernel_declaration_is_consistent() {
    for kernel in kto_kernels::all_kernels() {
        assert!(!kernel.dtypes.is_empty(), "{} has no dtype", kernel.name);
        assert!(
            kernel.max_block_threads >= 32
                && kernel.max_block_threads <= 1024
                && kernel.max_block_threads % 32 == 0,
            "{}: max_block_threads {}",
            kernel.name,
            kernel.max_block_threads
        );
        assert!(
            root()
                .join("kernels")
                .join(format!("{}.cu", kernel.module))
                .exists(),
            "{}: no kernels/{}.cu",
            kernel.name,
            kernel.module
        );
    }
}
