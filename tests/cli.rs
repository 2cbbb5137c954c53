//! The `tis` binary end to end: help, info, and the README's main job (`tis demo`).

mod common;

use std::process::{Command, Output};

fn tis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tis"))
        .args(args)
        .output()
        .expect("run tis")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn help_lists_the_commands() {
    let out = tis(&["--help"]);
    assert!(out.status.success());
    for command in ["info", "demo"] {
        assert!(
            stdout(&out).contains(command),
            "help lacks `{command}`:\n{}",
            stdout(&out)
        );
    }
}

#[test]
fn info_describes_a_bundle() {
    let bundle = common::fixture("aniso/bundle.safetensors");
    let out = tis(&["info", bundle.to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        report["classes"],
        serde_json::json!(["background", "organ", "tumour"])
    );
    assert_eq!(report["patch_size"], serde_json::json!([8, 32, 32]));
    assert_eq!(report["tis_head"]["config"]["d_model"], 24);
    assert!(report["network"]["parameters"].as_u64().unwrap() > 0);
}

#[test]
fn info_on_a_missing_file_fails_with_its_name() {
    let out = tis(&["info", "/nonexistent/bundle.safetensors"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/bundle.safetensors"), "{err}");
}

#[test]
fn demo_runs_end_to_end() {
    let dir = std::env::temp_dir().join(format!("tis-demo-test-{}", std::process::id()));
    let out = tis(&["demo", "--clicks", "2", "--output", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    for expected in ["encoder", "auto       Dice", "click 1", "click 2", "ms"] {
        assert!(
            text.contains(expected),
            "demo output lacks `{expected}`:\n{text}"
        );
    }
    for file in ["auto.nii.gz", "refined.nii.gz"] {
        let written = tis::io::nifti::read_image(&dir.join(file)).unwrap();
        assert_eq!(written.shape(), [112, 101, 122]);
        assert_eq!(written.spacing, [3.0, 3.0, 3.0]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
