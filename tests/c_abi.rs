//! The C ABI: the committed header is what cbindgen makes of src/ffi.rs; the C example builds
//! with the system compiler against libtis and runs (also under valgrind, with no errors and no
//! leaks); the Python ctypes example runs; misuse returns errors.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::root;

/// Where cargo put the libtis.so built with this test: target/<profile>/deps, beside the test
/// executable (a plain `cargo build` also copies it up to target/<profile>).
fn library_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn header_is_up_to_date() {
    let config = cbindgen::Config::from_file(root().join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root())
        .with_config(config)
        .generate()
        .expect("cbindgen runs")
        .write(&mut generated);
    let path = root().join("include/tis.h");
    if std::env::var("TIS_UPDATE_HEADER").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/tis.h is stale: run `TIS_UPDATE_HEADER=1 cargo test --test c_abi` and commit it"
    );
}

/// Builds examples/c/refine.c against libtis into the target directory, once per test run:
/// tests run in parallel, and one test compiling over the executable while another starts it
/// fails with "Permission denied".
fn build_c_example() -> PathBuf {
    static EXAMPLE: OnceLock<PathBuf> = OnceLock::new();
    EXAMPLE.get_or_init(compile_c_example).clone()
}

fn compile_c_example() -> PathBuf {
    let lib = library_dir();
    assert!(
        lib.join("libtis.so").exists(),
        "libtis.so not in {}",
        lib.display()
    );
    let exe = lib.join("tis-c-example");
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg(root().join("examples/c/refine.c"))
        .arg(format!("-I{}", root().join("include").display()))
        .arg(format!("-L{}", lib.display()))
        .args(["-ltis", "-o"])
        .arg(&exe)
        .status()
        .expect("run the system C compiler (cc)");
    assert!(status.success(), "the C example does not compile");
    exe
}

fn run_example(program: &str, args: &[&str], exe_args: &[PathBuf]) -> String {
    let output = Command::new(program)
        .args(args)
        .args(exe_args)
        .env("LD_LIBRARY_PATH", library_dir())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{program} failed:\n{text}");
    text
}

#[test]
fn c_example_builds_and_runs() {
    let exe = build_c_example();
    let out = run_example(exe.to_str().unwrap(), &[], &[]);
    println!("{out}");
    for expected in ["libtis", "session", "click", "misuse: all rejected", "done"] {
        assert!(
            out.contains(expected),
            "the C example's output lacks `{expected}`:\n{out}"
        );
    }
}

#[test]
fn c_example_is_clean_under_valgrind() {
    assert!(
        Command::new("valgrind").arg("--version").output().is_ok(),
        "this test needs valgrind (Debian package `valgrind`; .ci/run installs it)"
    );
    let exe = build_c_example();
    // The small test bundle and a phantom that resamples to one tile keep the run short:
    // valgrind runs the program ~50× slower.
    let model = root().join("tests/fixtures/iso/bundle.safetensors");
    let out = run_example(
        "valgrind",
        &[
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--quiet",
        ],
        &[exe, model, "8".into(), "8".into(), "8".into()],
    );
    println!("{out}");
}

#[test]
fn python_ctypes_example_runs() {
    let out = run_example(
        "python3",
        &[],
        &[
            root().join("examples/python/refine.py"),
            library_dir().join("libtis.so"),
        ],
    );
    println!("{out}");
    assert!(out.contains("refined"), "{out}");
}
