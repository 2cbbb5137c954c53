//! Click files and click requests: JSON objects `{"z": 12, "y": 40, "x": 51, "class": "liver"}`,
//! the class by name (dataset.json's labels) or by number, positions as voxel indices of the
//! image (file order). A click file is either a list of such objects or `{"clicks": [...]}`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::geometry::Click;

/// The most clicks one refinement takes; more is refused rather than slowing to a crawl.
pub const MAX_CLICKS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClickSpec {
    z: usize,
    y: usize,
    x: usize,
    class: Value,
}

/// A class given by name or number, checked against the model's class names.
pub fn class_index(class: &Value, class_names: &[String]) -> Result<usize> {
    let found = match class {
        Value::String(name) => class_names.iter().position(|n| n == name),
        Value::Number(n) => n
            .as_u64()
            .map(|n| n as usize)
            .filter(|&n| n < class_names.len()),
        _ => None,
    };
    found.ok_or_else(|| {
        Error::Click(format!(
            "unknown class {class}: the model's classes are {}",
            class_names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{i} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// One click from a JSON object.
pub fn parse_click(value: &Value, class_names: &[String]) -> Result<Click> {
    let spec: ClickSpec = serde_json::from_value(value.clone()).map_err(|e| {
        Error::Click(format!(
            "{value} is not a click {{\"z\", \"y\", \"x\", \"class\"}} ({e})"
        ))
    })?;
    Ok(Click::new(
        spec.z,
        spec.y,
        spec.x,
        class_index(&spec.class, class_names)?,
    ))
}

/// Clicks from a JSON value: a list, or an object with a `clicks` list.
pub fn parse_clicks(value: &Value, class_names: &[String]) -> Result<Vec<Click>> {
    let list = match value {
        Value::Array(list) => list,
        Value::Object(map) => map.get("clicks").and_then(Value::as_array).ok_or_else(|| {
            Error::Click("expected a list of clicks or {\"clicks\": [...]}".into())
        })?,
        _ => {
            return Err(Error::Click(
                "expected a list of clicks or {\"clicks\": [...]}".into(),
            ));
        }
    };
    if list.len() > MAX_CLICKS {
        return Err(Error::Click(format!(
            "{} clicks given, at most {MAX_CLICKS} are taken",
            list.len()
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            parse_click(v, class_names).map_err(|e| Error::Click(format!("click {i}: {e}")))
        })
        .collect()
}

/// Clicks from a JSON file.
pub fn read_clicks(path: &Path, class_names: &[String]) -> Result<Vec<Click>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Click(format!("{}: not JSON ({e})", path.display())))?;
    parse_clicks(&value, class_names).map_err(|e| Error::Click(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn names() -> Vec<String> {
        ["background", "liver", "tumour"].map(String::from).to_vec()
    }

    #[test]
    fn classes_by_name_or_number() {
        let clicks = parse_clicks(
            &json!({"clicks": [{"z": 1, "y": 2, "x": 3, "class": "tumour"}, {"z": 4, "y": 5, "x": 6, "class": 0}]}),
            &names(),
        )
        .unwrap();
        assert_eq!(clicks, [Click::new(1, 2, 3, 2), Click::new(4, 5, 6, 0)]);
    }

    #[test]
    fn bad_clicks_are_named() {
        let err = |v: Value| parse_clicks(&v, &names()).unwrap_err().to_string();
        assert!(
            err(json!([{"z": 1, "y": 2, "x": 3, "class": "spleen"}]))
                .contains("unknown class \"spleen\"")
        );
        assert!(err(json!([{"z": 1, "y": 2, "x": 3, "class": 3}])).contains("unknown class 3"));
        assert!(err(json!([{"z": -1, "y": 2, "x": 3, "class": 1}])).contains("click 0"));
        assert!(err(json!([{"z": 1, "y": 2, "class": 1}])).contains("missing field `x`"));
        assert!(err(json!({"points": []})).contains("expected a list"));
        let many: Vec<Value> = (0..=MAX_CLICKS)
            .map(|_| json!({"z": 0, "y": 0, "x": 0, "class": 1}))
            .collect();
        assert!(err(Value::Array(many)).contains("at most"));
    }
}
