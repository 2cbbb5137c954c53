//! Compiles every `kernels/*.cu` with nvcc into OUT_DIR and writes `OUT_DIR/kernels.rs`, a table
//! of (kernel file stem, fatbin bytes) that the CUDA backend embeds.
//!
//! Each fatbin holds an sm_90a cubin (Hopper, wgmma allowed), an sm_80 cubin and compute_80 PTX
//! for the driver to JIT on other cards. nvcc is found through `NVCC`, then
//! `CUDA_HOME`/`CUDA_PATH`, then `PATH`. Without nvcc the build succeeds with a warning and the
//! table is empty (the CUDA backend then reports "built without CUDA kernels");
//! `TIS_REQUIRE_KERNELS=1` makes a missing nvcc or a failed compile a build error. Register
//! spills and stack frames reported by `-Xptxas -v` become cargo warnings.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGETS: [&str; 3] = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_80,code=compute_80",
];

fn find_nvcc() -> Option<PathBuf> {
    if let Some(path) = env::var_os("NVCC") {
        return Some(PathBuf::from(path));
    }
    for root in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(dir) = env::var_os(root) {
            let candidate = Path::new(&dir).join("bin").join("nvcc");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("nvcc"))
            .find(|candidate| candidate.is_file())
    })
}

/// `(kernel, ptxas line)` for every kernel whose `-Xptxas -v` report shows register spills or a
/// stack frame (local memory: LDL/STL in the hot loop).
fn spills(ptxas_log: &str) -> Vec<(String, String)> {
    let mut kernel = String::new();
    let mut found = Vec::new();
    for line in ptxas_log.lines() {
        if let Some(name) = line.split("Function properties for ").nth(1) {
            kernel = name.trim().to_string();
        }
        let spilled = line
            .split(',')
            .filter(|part| part.contains("bytes spill") || part.contains("bytes stack frame"))
            .any(|part| part.split_whitespace().next().is_some_and(|n| n != "0"));
        if spilled {
            found.push((kernel.clone(), line.trim().to_string()));
        }
    }
    found
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "TIS_REQUIRE_KERNELS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let required = env::var("TIS_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for entry in fs::read_dir("kernels").into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let nvcc = find_nvcc();
    if nvcc.is_none() && !sources.is_empty() {
        if required {
            panic!("TIS_REQUIRE_KERNELS=1 but nvcc was not found (set NVCC, CUDA_HOME or PATH)");
        }
        println!(
            "cargo:warning=nvcc not found: building without CUDA kernels (set NVCC or CUDA_HOME)"
        );
    }
    let mut table =
        String::from("/// (kernel file stem, fatbin) for every compiled kernels/*.cu.\n");
    table.push_str("pub const KERNELS: &[(&str, &[u8])] = &[\n");
    if let Some(nvcc) = &nvcc {
        for source in &sources {
            let stem = source
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("UTF-8 kernel name");
            let fatbin = out_dir.join(format!("{stem}.fatbin"));
            let output = Command::new(nvcc)
                .args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v", "-Ikernels"])
                .args(TARGETS)
                .arg("-o")
                .arg(&fatbin)
                .arg(source)
                .output();
            let failure = match &output {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => Some(format!("cannot run {}: {e}", nvcc.display())),
            };
            if let Some(message) = failure {
                if required {
                    panic!("nvcc failed on {}:\n{message}", source.display());
                }
                println!(
                    "cargo:warning=nvcc failed on {}; building without it",
                    source.display()
                );
                continue;
            }
            let log = String::from_utf8_lossy(&output.expect("checked above").stderr).into_owned();
            for (kernel, line) in spills(&log) {
                println!("cargo:warning={stem}.cu: {kernel} uses local memory: {line}");
            }
            writeln!(
                table,
                "    ({stem:?}, include_bytes!({:?})),",
                fatbin.display().to_string()
            )
            .expect("write to string");
        }
    }
    table.push_str("];\n");
    fs::write(out_dir.join("kernels.rs"), table).expect("write kernels.rs");
}
