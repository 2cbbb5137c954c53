//! Replays docs/session-example.jsonl against `tis session` on a synthetic CT with the embedded
//! default model: the documented protocol is what the binary speaks.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::root;

use serde_json::Value;

/// Whether `actual` matches `expected`, where "<number>", "<box>" and "<any>" are wildcards.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(w), a) if w == "<number>" => a.is_number(),
        (Value::String(w), a) if w == "<box>" => {
            a.is_null()
                || (a.get("start").is_some_and(Value::is_array)
                    && a.get("size").is_some_and(Value::is_array))
        }
        (Value::String(w), _) if w == "<any>" => true,
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av)))
        }
        (e, a) => e == a,
    }
}

#[test]
fn documented_transcript_replays() {
    let transcript = std::fs::read_to_string(root().join("docs/session-example.jsonl")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tis"))
        .args([
            "session",
            root()
                .join("data/synthetic/imagesTs/synth_000_0000.nii.gz")
                .to_str()
                .unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tis session");
    let mut stdin = child.stdin.take().unwrap();
    let mut replies = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut checked = 0;
    for line in transcript.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(request) = line.strip_prefix("> ") {
            writeln!(stdin, "{request}").unwrap();
            stdin.flush().unwrap();
        } else if let Some(expected) = line.strip_prefix("< ") {
            let expected: Value = serde_json::from_str(expected).unwrap();
            let actual = replies.next().expect("a reply line").unwrap();
            let actual: Value = serde_json::from_str(&actual)
                .unwrap_or_else(|e| panic!("reply `{actual}` is not JSON: {e}"));
            assert!(
                matches(&expected, &actual),
                "expected {expected}\n     got {actual}"
            );
            checked += 1;
        } else {
            panic!("transcript line neither `> ` nor `< `: {line}");
        }
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert!(replies.next().is_none(), "no output after quit");
    assert!(checked >= 10);
}
