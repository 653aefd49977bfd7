//! The four JSONL record formats, how a record is recognised, and what its prompt is.
//!
//! A file holds one format, taken from its first record: a later record in another format is an error
//! rather than a silent reinterpretation, because a mixed file is almost always a concatenation mistake.
use crate::chat_template::ChatMessage;
use serde_json::{Map, Value};

/// A dataset format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `{"text"}`: plain text, every token trained.
    Text,
    /// `{"prompt","completion"}`: only the completion trained.
    PromptCompletion,
    /// `{"instruction","input"?,"output"}`: rendered with the Alpaca prompt, only the output trained.
    Alpaca,
    /// `{"messages":[{"role","content"}]}`: rendered with the model's chat template, only the
    /// assistant turns trained.
    Chat,
}

impl Format {
    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt/completion",
            Format::Alpaca => "alpaca",
            Format::Chat => "chat",
        }
    }

    /// The format a record's keys announce, `None` for none of them. Checked from the most to the
    /// least specific, so that a record carrying a rendered copy beside its parts (tatsu-lab/alpaca has
    /// `text` next to instruction/input/output) is read by its parts, which is what masks correctly.
    pub fn of(record: &Map<String, Value>) -> Option<Format> {
        let has = |k: &str| record.contains_key(k);
        if has("messages") {
            Some(Format::Chat)
        } else if has("instruction") || has("output") {
            Some(Format::Alpaca)
        } else if has("prompt") || has("completion") {
            Some(Format::PromptCompletion)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// A file's format and the 1-based line it was detected from (named when a later line disagrees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFormat {
    /// The format.
    pub format: Format,
    /// Where it was detected.
    pub line: usize,
}

/// Roles a chat message may have. Templates differ on anything else (tool, ipython, function), so an
/// unknown role is rejected at submit rather than rendered differently by each model.
pub const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One parsed training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Plain text.
    Text(String),
    /// A prompt and the completion to learn; the text trained on is `prompt + completion` (no
    /// separator is added: the data carries its own spacing).
    PromptCompletion {
        /// Not trained.
        prompt: String,
        /// Trained.
        completion: String,
    },
    /// An Alpaca record; `input` is `None` when absent, null or empty.
    Alpaca {
        /// The task.
        instruction: String,
        /// Its context, if any.
        input: Option<String>,
        /// The response to learn.
        output: String,
    },
    /// A conversation with at least one assistant message.
    Chat(Vec<ChatMessage>),
}

/// The Stanford Alpaca preamble for records with an input.
pub const ALPACA_PREAMBLE_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";
/// The Stanford Alpaca preamble for records without one.
pub const ALPACA_PREAMBLE: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

/// The Stanford Alpaca prompt (everything before the output) for `instruction` and `input`.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(input) => format!(
            "{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        None => format!("{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    }
}

impl Example {
    /// This example's format.
    pub fn format(&self) -> Format {
        match self {
            Example::Text(_) => Format::Text,
            Example::PromptCompletion { .. } => Format::PromptCompletion,
            Example::Alpaca { .. } => Format::Alpaca,
            Example::Chat(_) => Format::Chat,
        }
    }

    /// Parses one record. With `file` given, a record of another format is an error naming the line
    /// the file's format came from. The error says what is wrong; the caller adds path and line.
    pub fn parse(value: &Value, file: Option<FileFormat>) -> Result<Example, String> {
        let Some(obj) = value.as_object() else {
            return Err(format!("expected a JSON object, got {}", json_kind(value)));
        };
        let Some(format) = Format::of(obj) else {
            return Err(
                "no known format: expected \"text\", \"prompt\"/\"completion\", \
                        \"instruction\"/\"input\"/\"output\" (alpaca) or \"messages\" (chat)"
                    .into(),
            );
        };
        if let Some(file) = file {
            if file.format != format {
                return Err(format!(
                    "record is {}, but the file is {} (detected from line {}); one file holds one format",
                    format.name(),
                    file.format.name(),
                    file.line
                ));
            }
        }
        Ok(match format {
            Format::Text => Example::Text(string_field(obj, "text")?),
            Format::PromptCompletion => Example::PromptCompletion {
                prompt: string_field(obj, "prompt")?,
                completion: string_field(obj, "completion")?,
            },
            Format::Alpaca => Example::Alpaca {
                instruction: string_field(obj, "instruction")?,
                input: match obj.get("input") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) if s.is_empty() => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(other) => {
                        return Err(format!(
                            "field \"input\" must be a string, got {}",
                            json_kind(other)
                        ))
                    }
                },
                output: string_field(obj, "output")?,
            },
            Format::Chat => Example::Chat(messages(obj)?),
        })
    }
}

fn string_field(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "field \"{key}\" must be a string, got {}",
            json_kind(other)
        )),
        None => Err(format!("missing string field \"{key}\"")),
    }
}

fn messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, String> {
    let list = match obj.get("messages") {
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(format!(
                "field \"messages\" must be an array of {{\"role\", \"content\"}} objects, got {}",
                json_kind(other)
            ))
        }
        None => return Err("missing array field \"messages\"".into()),
    };
    if list.is_empty() {
        return Err("field \"messages\" is empty".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(format!(
                "messages[{i}] must be an object with \"role\" and \"content\", got {}",
                json_kind(m)
            ));
        };
        let role = string_field(m, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
        if !CHAT_ROLES.contains(&role.as_str()) {
            return Err(format!(
                "messages[{i}].role \"{role}\" is not one of {}",
                CHAT_ROLES.join(", ")
            ));
        }
        let content = string_field(m, "content").map_err(|e| format!("messages[{i}]: {e}"))?;
        out.push(ChatMessage { role, content });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(
            "no \"assistant\" message: a chat example trains on the assistant's replies".into(),
        );
    }
    Ok(out)
}

/// "a number", "null", ... for messages.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
