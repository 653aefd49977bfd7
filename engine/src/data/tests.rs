//! Formats, the JSONL source and submit-time validation: every error names the file and line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use super::*;
use crate::chat_template::ChatMessage;
use std::io::Write;

pub(super) fn file(lines: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(lines.as_bytes()).unwrap();
    f
}

fn err(lines: &str) -> (EngineError, String) {
    let f = file(lines);
    let e = validate_jsonl(f.path()).unwrap_err();
    let msg = e.to_string();
    let prefix = format!("dataset {}", f.path().display());
    assert!(msg.starts_with(&prefix), "{msg}");
    (e, msg[prefix.len()..].to_string())
}

#[test]
fn validate_counts_and_skips_blank_lines() {
    let f = file("{\"text\": \"a\"}\n\n  \n{\"text\": \"b\", \"extra\": 1}\r\n");
    assert_eq!(validate_jsonl(f.path()).unwrap(), 2);
    assert_eq!(
        read_jsonl(f.path()).unwrap(),
        vec![Example::Text("a".into()), Example::Text("b".into())]
    );
}

#[test]
fn detects_each_format_from_its_keys() {
    let cases = [
        (r#"{"text": "t"}"#, Example::Text("t".into())),
        (
            r#"{"prompt": "p", "completion": "c"}"#,
            Example::PromptCompletion {
                prompt: "p".into(),
                completion: "c".into(),
            },
        ),
        (
            r#"{"instruction": "i", "input": "", "output": "o", "text": "rendered copy"}"#,
            Example::Alpaca {
                instruction: "i".into(),
                input: None,
                output: "o".into(),
            },
        ),
        (
            r#"{"instruction": "i", "input": "x", "output": "o"}"#,
            Example::Alpaca {
                instruction: "i".into(),
                input: Some("x".into()),
                output: "o".into(),
            },
        ),
        (
            r#"{"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a"}]}"#,
            Example::Chat(vec![
                ChatMessage::new("user", "q"),
                ChatMessage::new("assistant", "a"),
            ]),
        ),
    ];
    for (line, want) in cases {
        // A byte-order mark before the first record is not part of the JSON.
        let f = file(&format!("\u{feff}{line}\n{line}\n"));
        assert_eq!(validate_jsonl(f.path()).unwrap(), 2, "{line}");
        assert_eq!(
            read_jsonl(f.path()).unwrap(),
            vec![want.clone(), want],
            "{line}"
        );
    }
}

#[test]
fn bad_lines_are_named() {
    let good = "{\"text\": \"ok\"}\n";
    let (e, msg) = err(&format!("{}{{\"text\": oops}}\n", good.repeat(6)));
    assert!(
        matches!(e, EngineError::Dataset { line: Some(7), .. }),
        "{e:?}"
    );
    assert!(msg.starts_with(" line 7: not valid JSON: "), "{msg}");

    let cases = [
        ("{\"text\": 5}\n", " line 1: field \"text\" must be a string, got a number"),
        ("[1, 2]\n", " line 1: expected a JSON object, got an array"),
        ("{\"body\": \"x\"}\n", " line 1: no known format: expected \"text\""),
        ("{\"prompt\": \"p\"}\n", " line 1: missing string field \"completion\""),
        (
            "{\"instruction\": \"i\", \"input\": 3, \"output\": \"o\"}\n",
            " line 1: field \"input\" must be a string, got a number",
        ),
        ("{\"output\": \"o\"}\n", " line 1: missing string field \"instruction\""),
        ("{\"messages\": \"hi\"}\n", " line 1: field \"messages\" must be an array"),
        ("{\"messages\": []}\n", " line 1: field \"messages\" is empty"),
        (
            "{\"messages\": [\"hi\"]}\n",
            " line 1: messages[0] must be an object with \"role\" and \"content\", got a string",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"bot\", \"content\": \"a\"}]}\n",
            " line 1: messages[1].role \"bot\" is not one of system, user, assistant",
        ),
        (
            "{\"messages\": [{\"role\": \"assistant\", \"content\": null}]}\n",
            " line 1: messages[0]: field \"content\" must be a string, got null",
        ),
        (
            "{\"messages\": [{\"content\": \"q\"}]}\n",
            " line 1: messages[0]: missing string field \"role\"",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n",
            " line 1: no \"assistant\" message",
        ),
        ("{\"text\": \"\\ud800\"}\n", " line 1: not valid JSON"),
    ];
    for (lines, want) in cases {
        let (_, msg) = err(lines);
        assert!(msg.starts_with(want), "{lines}: {msg}");
    }
    let f = file("{\"text\": \"a\"}\n\u{0}\u{ff}\n");
    let mut bytes = std::fs::read(f.path()).unwrap();
    bytes[15] = 0xff; // not UTF-8
    std::fs::write(f.path(), bytes).unwrap();
    let msg = validate_jsonl(f.path()).unwrap_err().to_string();
    assert!(msg.ends_with(" line 2: not valid UTF-8"), "{msg}");
}

#[test]
fn mixed_formats_name_both_lines() {
    let pc = "{\"prompt\": \"p\", \"completion\": \"c\"}\n";
    let alpaca = "{\"instruction\": \"i\", \"output\": \"o\"}\n";
    let (e, msg) = err(&format!("\n{}{alpaca}", pc.repeat(10)));
    assert!(
        matches!(e, EngineError::Dataset { line: Some(12), .. }),
        "{e:?}"
    );
    assert_eq!(
        msg,
        " line 12: record is alpaca, but the file is prompt/completion (detected from line 2); \
         one file holds one format"
    );
}

#[test]
fn empty_and_missing_files_are_rejected() {
    for lines in ["", "\n\n", "  \r\n"] {
        let (e, msg) = err(lines);
        assert!(
            matches!(e, EngineError::Dataset { line: None, .. }),
            "{e:?}"
        );
        assert!(msg.contains("no examples"), "{msg}");
    }
    let e = validate_jsonl(Path::new("/nonexistent/d.jsonl")).unwrap_err();
    assert!(matches!(e, EngineError::Io { .. }));
}

#[test]
fn jsonl_source_reads_ranges_by_offset() {
    let f =
        file("{\"text\": \"a\"}\n\n{\"text\": \"b\"}\r\n{\"text\": \"c\"}\n\n\n{\"text\": \"d\"}");
    let src = JsonlSource::open(f.path()).unwrap();
    assert_eq!(src.len(), 4);
    assert_eq!(
        src.format(),
        FileFormat {
            format: Format::Text,
            line: 1
        }
    );
    let got = src.read(1..4).unwrap();
    let lines: Vec<usize> = got.iter().map(|r| r.line).collect();
    assert_eq!(lines, [3, 4, 7]);
    assert_eq!(got[2].value, serde_json::json!({"text": "d"}));
    assert_eq!(src.read(2..2).unwrap(), vec![]);
    let msg = src.read(3..5).unwrap_err().to_string();
    assert!(msg.contains("the file has 4"), "{msg}");

    // Rewritten in place after indexing: a read reports it instead of returning garbage.
    std::fs::write(f.path(), "{\"text\": \"a\"}\n").unwrap();
    let msg = src.read(3..4).unwrap_err().to_string();
    assert!(msg.contains("line 7: no longer what it was"), "{msg}");
}

#[test]
fn lines_are_bounded_and_a_line_that_just_fits_is_read() {
    use crate::data::jsonl::MAX_LINE_BYTES;
    // `{"text": "aaa...a"}` of exactly MAX_LINE_BYTES, then its newline.
    let fits = |extra: usize| {
        let body = MAX_LINE_BYTES - "{\"text\": \"\"}".len() + extra;
        format!(
            "{{\"text\": \"b\"}}\n{{\"text\": \"{}\"}}\n",
            "a".repeat(body)
        )
    };
    let f = file(&fits(0));
    assert_eq!(validate_jsonl(f.path()).unwrap(), 2);
    let (_, msg) = err(&fits(1));
    assert!(
        msg.starts_with(" line 2: the line is longer than 8 MiB"),
        "{msg}"
    );
}
