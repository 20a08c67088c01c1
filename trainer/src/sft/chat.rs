//! Conversations as SWE-smith and SWE-Gym publish them (`{"messages": [{"role", "content"}]}`),
//! rendered the way the engine renders an episode, so that fine-tuning teaches the policy the
//! context it will meet in self-play.
//!
//! The engine's episode is: the task as a user message, then per turn the policy's text and
//! the tool's result as the next user message, all in [`ChatMarkup`]. A conversation maps
//! onto that: `system` messages get the system markup, `user` and `tool` messages are user
//! messages (the engine hands tool results back as user turns), `assistant` messages are the
//! policy's turns. Markup is encoded in the same pieces the engine encodes (everything
//! between two policy turns at once; each policy turn on its own), so the token boundaries
//! match. The loss covers each assistant message's tokens and its end-of-turn marker
//! (ChatML's `<|im_end|>`), nothing else.

use serde_json::Value;

use crate::engine::policy::TokenCodec;
use crate::engine::prompts::ChatMarkup;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatRole {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

/// The messages of one chat record; the error says which message is wrong and why.
pub fn parse_messages(record: &Value) -> Result<Vec<ChatMessage>, String> {
    let list = record
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` is not a list")?;
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system") => ChatRole::System,
            Some("user") => ChatRole::User,
            Some("assistant") => ChatRole::Assistant,
            Some("tool") => ChatRole::Tool,
            Some(other) => {
                return Err(format!(
                    "message {i}: unknown role `{other}` (expected system, user, assistant or tool)"
                ));
            }
            None => return Err(format!("message {i}: no `role` string")),
        };
        if role == ChatRole::Assistant
            && m.get("tool_calls")
                .is_some_and(|c| !c.is_null() && c.as_array().is_none_or(|a| !a.is_empty()))
        {
            // The engine's tool protocol is text in the turn itself; structured calls would
            // have to be re-serialised in some format the engine never parses.
            return Err(format!(
                "message {i}: assistant `tool_calls` are not supported (the tool calls must be written in the content)"
            ));
        }
        let content = content_text(m.get("content")).ok_or_else(|| {
            format!("message {i}: `content` is neither a string nor a list of text parts")
        })?;
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// A string, or OpenAI-style parts `[{"type": "text", "text": …}]` joined.
fn content_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match p {
                    Value::String(t) => s.push_str(t),
                    Value::Object(_) => s.push_str(p.get("text")?.as_str()?),
                    _ => return None,
                }
            }
            Some(s)
        }
        _ => None,
    }
}

/// The conversation's tokens and per-token loss mask (true on the assistant's tokens and
/// their end-of-turn marker). Messages after the last assistant message carry no loss and
/// are left out.
pub fn render_conversation(
    messages: &[ChatMessage],
    codec: &dyn TokenCodec,
    markup: &ChatMarkup,
) -> Result<(Vec<u32>, Vec<bool>), String> {
    // The end-of-turn marker proper; what follows it (a newline) is markup before the next
    // message and stays masked, as in the engine's observation.
    let end_of_turn = markup.assistant_end.trim_end_matches('\n');
    let after_turn = &markup.assistant_end[end_of_turn.len()..];
    let mut tokens = Vec::new();
    let mut mask = Vec::new();
    let mut pending = String::new();
    let mut push = |ids: Vec<u32>, trained: bool, tokens: &mut Vec<u32>| {
        mask.extend(std::iter::repeat_n(trained, ids.len()));
        tokens.extend(ids);
    };
    let mut assistant_turns = 0;
    for (i, m) in messages.iter().enumerate() {
        match m.role {
            ChatRole::System => {
                pending.push_str(&markup.system_start);
                pending.push_str(&m.content);
                pending.push_str(&markup.user_end);
            }
            ChatRole::User | ChatRole::Tool => {
                pending.push_str(&markup.user_start);
                pending.push_str(&m.content);
                pending.push_str(&markup.user_end);
            }
            ChatRole::Assistant => {
                if m.content.trim().is_empty() {
                    return Err(format!("message {i}: empty assistant message"));
                }
                pending.push_str(&markup.assistant_start);
                if pending.is_empty() {
                    return Err(format!(
                        "message {i}: the conversation opens with the assistant, so its first token has nothing to be predicted from"
                    ));
                }
                push(codec.encode(&pending), false, &mut tokens);
                pending.clear();
                let turn = codec.encode(&m.content);
                if turn.is_empty() {
                    return Err(format!(
                        "message {i}: the assistant message encodes to no tokens"
                    ));
                }
                push(turn, true, &mut tokens);
                push(codec.encode(end_of_turn), true, &mut tokens);
                pending.push_str(after_turn);
                assistant_turns += 1;
            }
        }
    }
    if assistant_turns == 0 {
        return Err("no assistant message: nothing to train on".into());
    }
    Ok((tokens, mask))
}
