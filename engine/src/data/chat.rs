//! Chat examples: the model's Jinja chat template, compiled once, and where its assistant turns are.
//!
//! The environment matches `chat_template::render` (and so transformers' `apply_chat_template`):
//! `trim_blocks` + `lstrip_blocks`, loop controls, `raise_exception`, Python string methods through
//! minijinja-contrib's pycompat. It is compiled once per job rather than per call because every chat
//! example renders the template several times.
//!
//! Finding the assistant turns: a template may add anything around a message (headers, default system
//! prompts, BOS), so the text of a turn cannot be found by searching for its content. Instead the
//! conversation is rendered incrementally: for assistant message `i`, the conversation up to `i` with
//! the generation prompt is exactly what the model sees before it starts to reply, and the
//! conversation through `i` ends where the reply (with its end-of-turn marker) ends. The bytes between
//! the two are the reply. This holds for every template that renders a conversation as the
//! concatenation of its turns (ChatML, Llama 2/3, Mistral, Gemma, Phi-3, Qwen2); one that rewrites
//! earlier turns (Qwen3 dropping old reasoning) breaks the prefix property, which is checked and
//! reported rather than guessed around.
use crate::chat_template::ChatMessage;
use minijinja::{Environment, Error, ErrorKind};
use std::ops::Range;

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Why a conversation could not be rendered.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatError {
    /// The template failed on this conversation (e.g. its own `raise_exception`): the data's fault.
    Render(String),
    /// The template is not incremental, so the assistant turn `message` cannot be located.
    NotIncremental {
        /// Index of the assistant message.
        message: usize,
    },
}

impl std::fmt::Display for ChatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChatError::Render(e) => write!(f, "chat template: {e}"),
            ChatError::NotIncremental { message } => write!(
                f,
                "the chat template renders the conversation through messages[{message}] differently \
                 from the start of the whole conversation (it rewrites earlier turns), so the \
                 assistant reply cannot be located for loss masking; set train_on_inputs=true to train \
                 on the whole conversation"
            ),
        }
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; the error is minijinja's (with the template line).
    pub fn new(source: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(|e| e.to_string())?);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| e.to_string())?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        let render = || -> Result<String, Error> {
            self.env.get_template(NAME)?.render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        };
        render().map_err(|e| ChatError::Render(e.to_string()))
    }

    /// The whole conversation's text and, when `spans` is set, the byte ranges of its assistant replies
    /// (each with whatever the template ends the turn with, e.g. `<|im_end|>\n` or `<|eot_id|>`).
    pub fn render_with_spans(
        &self,
        messages: &[ChatMessage],
        spans: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<(String, Vec<Range<usize>>), ChatError> {
        let full = self.render(messages, false, bos_token, eos_token)?;
        let mut out = Vec::new();
        if !spans {
            return Ok((full, out));
        }
        for (i, _) in messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
        {
            let before = self.render(&messages[..i], true, bos_token, eos_token)?;
            let through = self.render(&messages[..=i], false, bos_token, eos_token)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(ChatError::NotIncremental { message: i });
            }
            if before.len() < through.len() {
                out.push(before.len()..through.len());
            }
        }
        Ok((full, out))
    }
}
