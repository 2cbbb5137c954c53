//! The request side of the `tis session` protocol (docs/session-protocol.md): one JSON object per
//! line, parsed into a [`Request`] with the clicks' classes resolved against the model's class
//! names. Parsing never panics; every malformed line is an error naming the problem.

use serde_json::Value;

use super::clicks::{parse_click, parse_clicks};
use crate::error::{Error, Result};
use crate::geometry::Click;

/// What a request line asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Add clicks (one undo step) and refine.
    Refine(Vec<Click>),
    Undo,
    Reset,
    Save(String),
    Stats,
    Quit,
}

/// A parsed request line: its command, its `cmd` name and the `id` to echo.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub cmd: String,
    pub command: Command,
    pub id: Option<Value>,
}

/// The `id` of a line, if it is a JSON object that has one (echoed even when the line fails).
pub fn request_id(line: &str) -> Option<Value> {
    serde_json::from_str::<Value>(line).ok()?.get("id").cloned()
}

/// Parses one request line.
pub fn parse_request(line: &str, class_names: &[String]) -> Result<Request> {
    let value: Value =
        serde_json::from_str(line).map_err(|e| Error::Session(format!("not JSON: {e}")))?;
    let Value::Object(mut map) = value else {
        return Err(Error::Session("a request must be a JSON object".into()));
    };
    let id = map.remove("id");
    let cmd = match map.remove("cmd") {
        Some(Value::String(cmd)) => cmd,
        _ => return Err(Error::Session("a request needs a \"cmd\" string".into())),
    };
    let command = match cmd.as_str() {
        "click" => Command::Refine(vec![parse_click(&Value::Object(map), class_names)?]),
        "clicks" => Command::Refine(parse_clicks(
            map.get("clicks").unwrap_or(&Value::Null),
            class_names,
        )?),
        "undo" => Command::Undo,
        "reset" => Command::Reset,
        "save" => match map.get("path").and_then(Value::as_str) {
            Some(path) if !path.is_empty() => Command::Save(path.to_string()),
            _ => return Err(Error::Session("save needs a \"path\"".into())),
        },
        "stats" => Command::Stats,
        "quit" => Command::Quit,
        other => {
            return Err(Error::Session(format!(
                "unknown cmd {other:?}: expected click, clicks, undo, reset, save, stats or quit"
            )));
        }
    };
    Ok(Request { cmd, command, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["background", "organ"].map(String::from).to_vec()
    }

    #[test]
    fn requests_parse() {
        let r = parse_request(
            r#"{"cmd": "click", "z": 1, "y": 2, "x": 3, "class": "organ", "id": 7}"#,
            &names(),
        )
        .unwrap();
        assert_eq!(r.command, Command::Refine(vec![Click::new(1, 2, 3, 1)]));
        assert_eq!(r.id, Some(Value::from(7)));
        assert_eq!(
            parse_request(r#"{"cmd": "undo"}"#, &names())
                .unwrap()
                .command,
            Command::Undo
        );
        assert_eq!(
            parse_request(r#"{"cmd": "save", "path": "a.nii.gz"}"#, &names())
                .unwrap()
                .command,
            Command::Save("a.nii.gz".into())
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        for (line, reason) in [
            ("", "not JSON"),
            ("[1, 2]", "JSON object"),
            (r#"{"z": 1}"#, "\"cmd\""),
            (r#"{"cmd": 3}"#, "\"cmd\""),
            (
                r#"{"cmd": "click", "z": 1, "y": 2, "x": 3, "class": "organ", "extra": 1}"#,
                "unknown field",
            ),
            (r#"{"cmd": "clicks", "clicks": 5}"#, "list of clicks"),
            (r#"{"cmd": "save"}"#, "path"),
            (r#"{"cmd": "fly"}"#, "unknown cmd"),
        ] {
            let err = parse_request(line, &names()).unwrap_err().to_string();
            assert!(err.contains(reason), "{line:?}: {err}");
        }
    }
}
