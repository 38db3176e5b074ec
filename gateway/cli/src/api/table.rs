//! Text output for people (`--output table`): aligned columns and `key: value` blocks, with
//! control characters from the appliance replaced so nothing it sends can drive the
//! terminal. Scripts use `--output json` instead.

use serde_json::Value;

/// Replaces control characters (escape sequences, newlines) with `?`.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A JSON value as a cell: strings unquoted, `null` as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

/// Rows under a header, columns padded to their widest cell (the last one is not padded).
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&width).enumerate() {
            s.push_str(c);
            if i + 1 < n {
                let pad = w - c.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// `key: value` lines, keys padded to the longest.
pub fn pairs(rows: &[(String, String)]) -> String {
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k}:{} {v}", " ".repeat(w - k.chars().count())))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(
            &["NAME", "URL"],
            &[
                vec!["default".into(), "/var/lib/ferry/vault".into()],
                vec!["x".into(), "s3://b".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME     URL\ndefault  /var/lib/ferry/vault\nx        s3://b"
        );
        assert_eq!(clean("a\x1b[31mb\n"), "a?[31mb?");
        assert_eq!(
            pairs(&[("name".into(), "gold".into()), ("rpo".into(), "5".into())]),
            "name: gold\nrpo:  5"
        );
    }
}
