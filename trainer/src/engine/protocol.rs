//! The agent's tool-call format, parsed strictly.
//!
//! One tool call per turn. The policy may think aloud first; the call itself starts at the
//! beginning of a line and nothing but whitespace may follow it:
//!
//! ```text
//! <bash>
//! grep -rn "def parse" src/
//! </bash>
//!
//! <edit path="pkg/mod.py">
//! <<<<<<< SEARCH
//! return a - b
//! =======
//! return a + b
//! >>>>>>> REPLACE
//! </edit>
//!
//! <create path="pkg/new.py">
//! print("hello")
//! </create>
//!
//! <submit/>
//! ```
//!
//! The closing tags double as stop strings ([`STOP_STRINGS`]), so a generation normally ends
//! right after its call.

use std::fmt;

/// Generation stops after any of these: each ends a tool call.
pub const STOP_STRINGS: [&str; 4] = ["</bash>", "</edit>", "</create>", "<submit/>"];

/// One parsed tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolCall {
    Bash {
        command: String,
    },
    /// Replace the single occurrence of `search` in `path` by `replace`.
    Edit {
        path: String,
        search: String,
        replace: String,
    },
    Create {
        path: String,
        content: String,
    },
    Submit,
}

impl ToolCall {
    /// The tool's name, as a metric label and in logs.
    pub fn name(&self) -> &'static str {
        match self {
            ToolCall::Bash { .. } => "bash",
            ToolCall::Edit { .. } => "edit",
            ToolCall::Create { .. } => "create",
            ToolCall::Submit => "submit",
        }
    }
}

/// Why a turn's text is not exactly one well-formed tool call. The message is shown to the
/// policy, so it says how to fix the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatError(pub String);

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FormatError {}

fn err<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(msg.into()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bash,
    Edit,
    Create,
    Submit,
}

const OPENERS: [(&str, Kind); 4] = [
    ("<bash>", Kind::Bash),
    ("<edit ", Kind::Edit),
    ("<create ", Kind::Create),
    ("<submit/>", Kind::Submit),
];

/// Byte offsets of every line start in `text`.
fn line_starts(text: &str) -> impl Iterator<Item = usize> + '_ {
    std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1))
}

/// Parses the text of one turn into exactly one tool call.
pub fn parse_tool_call(text: &str) -> Result<ToolCall, FormatError> {
    let openers: Vec<(usize, Kind)> = line_starts(text)
        .filter_map(|at| {
            let line = &text[at..];
            OPENERS
                .iter()
                .find(|(tag, _)| line.starts_with(tag))
                .map(|(_, k)| (at, *k))
        })
        .collect();
    let (start, kind) = match openers.as_slice() {
        [] => {
            return err(
                "no tool call found: write exactly one of <bash>, <edit path=\"…\">, \
                 <create path=\"…\"> or <submit/>, at the start of a line",
            );
        }
        [one] => *one,
        many => {
            return err(format!(
                "found {} tool calls; write exactly one tool call per turn",
                many.len()
            ));
        }
    };
    let call_text = &text[start..];
    let (call, rest) = match kind {
        Kind::Submit => (ToolCall::Submit, &call_text["<submit/>".len()..]),
        Kind::Bash => parse_bash(call_text)?,
        Kind::Edit => parse_edit(call_text)?,
        Kind::Create => parse_create(call_text)?,
    };
    if !rest.trim().is_empty() {
        return err(format!(
            "text after the closing tag of the {} call; end the turn with the tool call",
            call.name()
        ));
    }
    Ok(call)
}

/// Splits `<tag …>` off `text`: returns the attribute text and what follows the `>`.
fn open_tag<'a>(text: &'a str, tag: &str) -> Result<(&'a str, &'a str), FormatError> {
    let Some(end) = text.find('>') else {
        return err(format!("the <{tag} tag is not closed with '>'"));
    };
    let head = &text[..end];
    if head.contains('\n') {
        return err(format!("the <{tag} …> tag must be on one line"));
    }
    Ok((&head[1 + tag.len()..], &text[end + 1..]))
}

/// The value of `path="…"`, the only attribute edit and create take.
fn path_attr(attrs: &str, tag: &str) -> Result<String, FormatError> {
    let attrs = attrs.trim();
    let Some(value) = attrs
        .strip_prefix("path=\"")
        .and_then(|v| v.strip_suffix('"'))
    else {
        return err(format!(
            "<{tag}> needs exactly one attribute: path=\"relative/file\""
        ));
    };
    if value.is_empty() || value.contains('"') {
        return err(format!(
            "<{tag}>: the path must be non-empty and contain no '\"'"
        ));
    }
    Ok(value.to_string())
}

/// The body of a block: after the newline that ends the opening tag, up to the closing tag.
/// Returns (body, text after the closing tag).
fn body<'a>(after_open: &'a str, tag: &str) -> Result<(&'a str, &'a str), FormatError> {
    let close = format!("</{tag}>");
    let Some(inner) = after_open.strip_prefix('\n') else {
        return err(format!("start the body of <{tag}> on a new line"));
    };
    let Some(end) = inner.find(&close) else {
        return err(format!("missing closing tag {close}"));
    };
    Ok((&inner[..end], &inner[end + close.len()..]))
}

fn parse_bash(text: &str) -> Result<(ToolCall, &str), FormatError> {
    let after = &text["<bash>".len()..];
    let (cmd, rest) = body(after, "bash")?;
    let command = cmd.trim_end_matches('\n');
    if command.trim().is_empty() {
        return err("empty <bash> command");
    }
    Ok((
        ToolCall::Bash {
            command: command.to_string(),
        },
        rest,
    ))
}

fn parse_create(text: &str) -> Result<(ToolCall, &str), FormatError> {
    let (attrs, after) = open_tag(text, "create")?;
    let path = path_attr(attrs, "create")?;
    let (content, rest) = body(after, "create")?;
    Ok((
        ToolCall::Create {
            path,
            content: content.to_string(),
        },
        rest,
    ))
}

const SEARCH: &str = "<<<<<<< SEARCH";
const DIVIDER: &str = "=======";
const REPLACE: &str = ">>>>>>> REPLACE";

fn parse_edit(text: &str) -> Result<(ToolCall, &str), FormatError> {
    let (attrs, after) = open_tag(text, "edit")?;
    let path = path_attr(attrs, "edit")?;
    let (block, rest) = body(after, "edit")?;
    let lines: Vec<&str> = block.split('\n').collect();
    // The body ends with a newline before </edit>, so the last split piece is empty.
    let lines = match lines.split_last() {
        Some((&"", init)) => init,
        _ => return err("put </edit> on its own line after the >>>>>>> REPLACE line"),
    };
    let count = |marker: &str| lines.iter().filter(|l| **l == marker).count();
    if lines.first() != Some(&SEARCH) || lines.last() != Some(&REPLACE) {
        return err(format!(
            "the body of <edit> must be one block: a line {SEARCH}, the exact text to find, \
             a line {DIVIDER}, the new text, a line {REPLACE}"
        ));
    }
    if count(SEARCH) != 1 || count(REPLACE) != 1 {
        return err("exactly one SEARCH/REPLACE block per <edit>; use one edit per turn");
    }
    let dividers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == DIVIDER)
        .map(|(i, _)| i)
        .collect();
    let [divider] = dividers.as_slice() else {
        return err(format!(
            "the SEARCH/REPLACE block needs exactly one line {DIVIDER}, found {}",
            dividers.len()
        ));
    };
    let search_lines = &lines[1..*divider];
    let replace_lines = &lines[divider + 1..lines.len() - 1];
    let join = |ls: &[&str]| {
        if ls.is_empty() {
            String::new()
        } else {
            ls.join("\n") + "\n"
        }
    };
    let search = join(search_lines);
    if search.trim().is_empty() {
        return err("the SEARCH text is empty; give the exact lines to replace");
    }
    Ok((
        ToolCall::Edit {
            path,
            search,
            replace: join(replace_lines),
        },
        rest,
    ))
}

/// The budget notice that ends every tool result.
pub fn budget_notice(turns_left: usize, tokens_left: usize) -> String {
    format!("[budget: {turns_left} turns left, {tokens_left} tokens left]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_with_thoughts_before() {
        let t = "I will look around.\n<bash>\nls -la\necho hi\n</bash>";
        assert_eq!(
            parse_tool_call(t).unwrap(),
            ToolCall::Bash {
                command: "ls -la\necho hi".into()
            }
        );
    }

    #[test]
    fn edit_block() {
        let t = "<edit path=\"a/b.py\">\n<<<<<<< SEARCH\n    x = 1\n=======\n    x = 2\n    y = 3\n>>>>>>> REPLACE\n</edit>\n";
        assert_eq!(
            parse_tool_call(t).unwrap(),
            ToolCall::Edit {
                path: "a/b.py".into(),
                search: "    x = 1\n".into(),
                replace: "    x = 2\n    y = 3\n".into()
            }
        );
    }

    #[test]
    fn edit_with_empty_replace_deletes() {
        let t = "<edit path=\"m.py\">\n<<<<<<< SEARCH\ndef f():\n    pass\n=======\n>>>>>>> REPLACE\n</edit>";
        let ToolCall::Edit {
            replace, search, ..
        } = parse_tool_call(t).unwrap()
        else {
            panic!()
        };
        assert_eq!(replace, "");
        assert_eq!(search, "def f():\n    pass\n");
    }

    #[test]
    fn create_keeps_content_exactly() {
        let t = "<create path=\"x.txt\">\nline 1\n\nline 3\n</create>";
        assert_eq!(
            parse_tool_call(t).unwrap(),
            ToolCall::Create {
                path: "x.txt".into(),
                content: "line 1\n\nline 3\n".into()
            }
        );
    }

    #[test]
    fn submit() {
        assert_eq!(
            parse_tool_call("done.\n<submit/>\n").unwrap(),
            ToolCall::Submit
        );
    }

    #[test]
    fn malformed_calls_are_errors() {
        let cases = [
            "just text",
            "<bash>\nls\n",                                   // unclosed
            "<bash>\n\n</bash>",                              // empty
            "<bash>\nls\n</bash>\n<bash>\npwd\n</bash>",      // two calls
            "<bash>\nls\n</bash> trailing",                   // text after
            "<bash>ls</bash>",                                // body on the same line
            "<edit path=\"a\">\nreplace everything\n</edit>", // no block
            "<edit path=\"a\">\n<<<<<<< SEARCH\n=======\nx\n>>>>>>> REPLACE\n</edit>", // empty search
            "<edit path=\"a\">\n<<<<<<< SEARCH\na\n=======\n=======\nb\n>>>>>>> REPLACE\n</edit>",
            "<edit path=\"a\">\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE</edit>",
            "<edit file=\"a\">\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n</edit>",
            "<create path=\"\">\nx\n</create>",
            "<create path=\"a\"\nx\n</create>",
            "<submit/> and more",
        ];
        for c in cases {
            assert!(parse_tool_call(c).is_err(), "accepted: {c:?}");
        }
    }

    #[test]
    fn inline_mentions_are_not_calls() {
        // A tag in the middle of a line is prose, not a call.
        let t = "I could use <bash> later.\n<submit/>";
        assert_eq!(parse_tool_call(t).unwrap(), ToolCall::Submit);
    }

    #[test]
    fn parser_survives_arbitrary_bytes() {
        let mut seed = 7u64;
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..(seed % 64) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pieces = [
                    "<bash>",
                    "</bash>",
                    "\n",
                    "<edit path=\"a\">",
                    "=======",
                    "x",
                    ">",
                    "<",
                    "\"",
                    "é",
                    "<submit/>",
                    "<<<<<<< SEARCH",
                    ">>>>>>> REPLACE",
                    "</edit>",
                    "<create ",
                ];
                s.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            let _ = parse_tool_call(&s);
        }
    }
}
