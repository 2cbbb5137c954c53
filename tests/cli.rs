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
    for command in [
        "info", "segment", "refine", "session", "eval", "demo", "bench",
    ] {
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
        assert_eq!(written.shape(), [32, 96, 96]);
        assert_eq!(written.spacing, [3.0, 1.0, 1.0]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tis-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nnunet(file: &str) -> String {
    common::fixture(&format!("nnunet/{file}"))
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn segment_reproduces_nnunet_and_keeps_the_geometry() {
    let dir = temp_dir("segment");
    let out = dir.join("seg.nii.gz");
    let run = tis(&[
        "segment",
        &nnunet("case3_0000.nii.gz"),
        "-m",
        &nnunet("bundle.safetensors"),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    let seconds = &report["seconds"];
    let phases =
        ["preprocessing", "sliding window", "export"].map(|p| seconds[p].as_f64().unwrap());
    assert!(phases.iter().all(|&s| s >= 0.0), "{report}");
    assert!(phases.iter().sum::<f64>() <= seconds["total"].as_f64().unwrap() + 1e-6);
    let ours = tis::io::nifti::read_image(&out).unwrap();
    let theirs = tis::io::nifti::read_image(&common::fixture("nnunet/case3.seg.nii.gz")).unwrap();
    let input = tis::io::nifti::read_image(&common::fixture("nnunet/case3_0000.nii.gz")).unwrap();
    assert_eq!(
        ours.voxels, theirs.voxels,
        "the segmentation differs from nnUNetPredictor's"
    );
    // The input's geometry, exactly: dims, pixdim, qform/sform and their codes.
    let (a, b) = (&ours.header, &input.header);
    assert_eq!(
        (a.dim, a.pixdim, a.qform_code, a.sform_code),
        (b.dim, b.pixdim, b.qform_code, b.sform_code)
    );
    assert_eq!(
        (
            a.quatern_b,
            a.quatern_c,
            a.quatern_d,
            a.quatern_x,
            a.quatern_y,
            a.quatern_z
        ),
        (
            b.quatern_b,
            b.quatern_c,
            b.quatern_d,
            b.quatern_x,
            b.quatern_y,
            b.quatern_z
        )
    );
    assert_eq!(
        (a.srow_x, a.srow_y, a.srow_z),
        (b.srow_x, b.srow_y, b.srow_z)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refine_writes_the_refined_segmentation() {
    let dir = temp_dir("refine");
    let clicks = dir.join("clicks.json");
    std::fs::write(&clicks, r#"{"clicks": [{"z": 8, "y": 13, "x": 15, "class": "lesion"}, {"z": 2, "y": 3, "x": 4, "class": 0}]}"#).unwrap();
    let out = dir.join("refined.nii.gz");
    let args = [
        "refine",
        &nnunet("case3_0000.nii.gz"),
        "-m",
        &nnunet("bundle_with_head.safetensors"),
        "--clicks",
        clicks.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    let run = tis(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    assert_eq!(report["clicks"], 2);
    assert!(report["refine_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        tis::io::nifti::read_image(&out).unwrap().shape(),
        [17, 26, 30]
    );

    // Bad clicks are refused with the reason, and nothing is written.
    std::fs::remove_file(&out).unwrap();
    for (bad, reason) in [
        (
            r#"[{"z": 8, "y": 13, "x": 15, "class": "tumour"}]"#,
            "unknown class \"tumour\"",
        ),
        (
            r#"[{"z": 17, "y": 0, "x": 0, "class": 1}]"#,
            "outside the grid",
        ),
        (r#"not json"#, "not JSON"),
    ] {
        std::fs::write(&clicks, bad).unwrap();
        let run = tis(&args);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success() && err.contains(reason),
            "{bad}: {err}"
        );
        assert!(!out.exists(), "a failed refine left a file");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn eval_writes_table_csv_and_plot() {
    let dir = temp_dir("eval");
    let (csv, plot) = (dir.join("dice.csv"), dir.join("dice.png"));
    let run = tis(&[
        "eval",
        &nnunet("case0_0000.nii.gz"),
        &nnunet("case3.seg.nii.gz"),
        "-m",
        &nnunet("bundle_with_head.safetensors"),
        "--clicks",
        "2",
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && err.contains("differs from the image's"),
        "mismatched grids: {err}"
    );
    let run = tis(&[
        "eval",
        &nnunet("case0_0000.nii.gz"),
        &nnunet("case0.seg.nii.gz"),
        "-m",
        &nnunet("bundle_with_head.safetensors"),
        "--clicks",
        "2",
        "--json",
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&run)).unwrap();
    assert_eq!(report["cases"], 1);
    assert_eq!(report["summary"].as_array().unwrap().len(), 3);
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert!(
        rows.starts_with("case,class,clicks,dice\n") && rows.lines().count() == 1 + 3 * 2,
        "{rows}"
    );
    assert!(std::fs::read(&plot).unwrap().starts_with(b"\x89PNG"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_reports_a_median() {
    let dir = temp_dir("bench");
    let json = dir.join("bench.json");
    let run = tis(&[
        "bench",
        "--roi",
        "4",
        "8",
        "8",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout(&run).contains("median"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["median_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["roi"], serde_json::json!([4, 8, 8]));
    // --tile: one forward of the embedded model's network (patch 32×64×64, 6.04 GFLOP).
    let run = tis(&[
        "bench",
        "--tile",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["median_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["patch"], serde_json::json!([32, 64, 64]));
    assert!((report["gflop_per_tile"].as_f64().unwrap() - 6.04).abs() < 0.01);
    assert!(report["peak_rss_mb"].as_f64().unwrap() > 1.0);
    // The per-step profile: 4 encoder stages, 3 × (upsampling, decoder stage), the seg layer,
    // each timed, their FLOPs adding up to the tile's.
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 11);
    assert_eq!(steps[0]["step"], "encoder 0");
    assert_eq!(steps[10]["step"], "seg layer");
    assert!(steps.iter().all(|s| s["median_ms"].as_f64().unwrap() > 0.0));
    let gflop: f64 = steps.iter().map(|s| s["gflop"].as_f64().unwrap()).sum();
    assert!((gflop - report["gflop_per_tile"].as_f64().unwrap()).abs() < 1e-9);
    let run = tis(&["bench", "--device", "cuda"]);
    if !run.status.success() {
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            err.contains("backend cuda"),
            "a missing GPU is a clear error: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
