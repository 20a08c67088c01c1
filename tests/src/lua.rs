//! Running Argo CD health checks (Lua) outside Argo CD: the object becomes a Lua table
//! literal (as Argo CD hands the script the object as the global `obj`), a small harness
//! loads the health script as a chunk, calls it and prints the status and message.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The Argo CD health a script returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub message: String,
}

/// A Lua string literal: printable ASCII as is, everything else as decimal escapes, so the
/// literal is exact whatever the bytes.
pub fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                // Three digits always: a following digit can never extend the escape.
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out.push('"');
    out
}

/// The JSON value as a Lua expression. Objects become tables with string keys, arrays
/// sequences (1-based, as Argo CD's conversion does), null becomes nil (an absent field).
pub fn lua_value(v: &Value) -> String {
    match v {
        Value::Null => "nil".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.to_string()
            } else if let Some(u) = n.as_u64() {
                u.to_string()
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                // `{:?}` keeps a decimal point or exponent, so Lua reads a float back.
                format!("{f:?}")
            }
        }
        Value::String(s) => lua_string(s),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(lua_value).collect();
            format!("{{{}}}", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), lua_value(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

/// Loads `script` as Argo CD does (a chunk that sees the global `obj` and returns a table with
/// `status` and `message`), runs it on `object` with the Lua interpreter `lua`, and returns
/// what it returned.
pub fn run_health_check(lua: &Path, script: &Path, object: &Value) -> Result<Health, String> {
    let harness = format!(
        r#"obj = {obj}
local chunk, err = loadfile({script})
if chunk == nil then
  io.stderr:write("cannot load health script: " .. tostring(err) .. "\n")
  os.exit(2)
end
local hs = chunk()
if type(hs) ~= "table" then
  io.stderr:write("the health script returned " .. type(hs) .. ", not a table\n")
  os.exit(3)
end
io.write(tostring(hs.status), "\n", tostring(hs.message or ""))
"#,
        obj = lua_value(object),
        script = lua_string(&script.to_string_lossy()),
    );
    let out = Command::new(lua)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(harness.as_bytes())?;
            }
            child.wait_with_output()
        })
        .map_err(|e| format!("running {}: {e}", lua.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} on {} failed ({}): {}",
            lua.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    Ok(Health {
        status: status.to_string(),
        message: message.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_are_escaped_byte_for_byte() {
        assert_eq!(lua_string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(lua_string("x\n1"), "\"x\\0101\"");
        assert_eq!(lua_string("é"), "\"\\195\\169\"");
    }

    #[test]
    fn values_become_lua_tables() {
        let v = json!({"a": [1, 2.5, "x"], "b": null, "c": true});
        assert_eq!(lua_value(&v), r#"{["a"] = {1, 2.5, "x"}, ["c"] = true}"#);
    }
}
