//! Rendering a model's Jinja chat template the way transformers' `apply_chat_template` does (the
//! environment itself is set up in `data::chat`).
//!
//! transformers renders with `trim_blocks` and `lstrip_blocks` on, the loop-control extension, a
//! `raise_exception` function and `bos_token`/`eos_token` variables; templates also call Python string
//! methods (`.strip()`, `.startswith()`), which minijinja-contrib's pycompat provides. Matching that
//! keeps the text we train and generate on byte-identical to what the model saw in fine-tuning.
use super::source::TokenizerAssets;
use serde::Serialize;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders `template` for `messages`; with `add_generation_prompt` the text ends where the assistant's
/// reply begins. The error is minijinja's message (with the template line).
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, String> {
    // One environment setup for the whole engine: the data pipeline's compiled template.
    super::data::ChatTemplate::new(template)?
        .render(messages, add_generation_prompt, bos_token, eos_token)
        .map_err(|e| e.to_string())
}

impl TokenizerAssets {
    /// Renders this model's chat template (`None` when it has none), with its BOS/EOS token strings.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Option<Result<String, String>> {
        let template = self.chat_template.as_deref()?;
        let token = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        Some(render(
            template,
            messages,
            add_generation_prompt,
            &token(self.special.bos),
            &token(self.special.eos),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as in its GGUF and tokenizer_config.json.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_like_transformers() {
        let msgs = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            render(SMOLLM2, &msgs, true, "", "").unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        // trim_blocks / lstrip_blocks as transformers sets them; Python string methods; bos_token.
        let t = "{{ bos_token }}\n{% for m in messages %}\n    {{ m.content.strip() | upper }}\n{% endfor %}";
        assert_eq!(
            render(t, &[ChatMessage::new("user", "  a b ")], false, "<s>", "").unwrap(),
            "<s>\n    A B\n"
        );
        let e = render(
            "{{ raise_exception('roles must alternate') }}",
            &msgs,
            false,
            "",
            "",
        )
        .unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
