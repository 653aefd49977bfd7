//! The `acme` lorad plugin: the `acme-support` training template and a `.tsv` dataset format.
//!
//! Written from `docs/PLUGINS.md` alone, as a third party would.
//!
//! # The `.tsv` format
//!
//! One example per line, `prompt<TAB>completion`, UTF-8. Each becomes a prompt/completion record
//! (`{"prompt": ..., "completion": ...}`), so lorad trains on the completion only and joins the two
//! with no separator: put any separator you want (a space, a newline) into the fields yourself.
//!
//! - Lines end with `\n` or `\r\n`; the last line may lack its end.
//! - A line that is empty or only whitespace is skipped (it still counts for line numbers).
//! - Every other line must contain exactly one TAB character. A line with none or with several fails
//!   `dataloader.open` with `PATH:LINE: ...` (lines counted from 1, as an editor shows them); so does a
//!   line that is not UTF-8.
//! - Escapes in a field: `\t` is a tab, `\n` a newline, `\\` a backslash. A backslash before any
//!   other character, or at the end of the field, is kept as it is (`C:\data` stays `C:\data`).
//!   Literal tabs therefore never appear in fields except through `\t`.
//!
//! # Reading
//!
//! `dataloader.open` reads the file once, checks every line and keeps, per record, the byte range of
//! its line (16 bytes a record, whatever the file's size) plus the open file. `dataloader.read` looks
//! the records up in that index and reads just their bytes with `pread` (`FileExt::read_at`), which
//! needs no lock and no shared file position, so any number of threads can read at once.
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use lorad_plugin::serde_json::{json, Value};
use lorad_plugin::{
    export_plugin, kinds, DataFormatDef, DataloaderOpenRequest, DataloaderOpenResponse,
    DataloaderReadRequest, DataloaderReadResponse, Plugin, PluginError, TemplateDef,
};
use lorad_schema::{Schedule, TrainSettings};

/// The plugin's name, as `loractl status` shows it.
pub const NAME: &str = "acme";
/// The one template.
pub const TEMPLATE: &str = "acme-support";
/// The dataset format's name and its one extension.
pub const FORMAT: &str = "tsv";

/// Where one record's line lies in the file.
#[derive(Clone, Copy, Debug)]
struct Line {
    /// Byte offset of the line's start.
    offset: u64,
    /// Length of the line without its `\n` / `\r\n`.
    len: u32,
    /// 1-based line number, for error messages.
    number: u64,
}

/// An opened dataset: the file and where its records are.
struct Dataset {
    file: File,
    lines: Vec<Line>,
}

/// The plugin. The index of every opened dataset, by path as lorad gave it.
#[derive(Default)]
pub struct Acme {
    datasets: RwLock<HashMap<String, Arc<Dataset>>>,
}

impl Plugin for Acme {
    fn name(&self) -> &'static str {
        NAME
    }

    fn kinds(&self) -> u32 {
        kinds::TEMPLATES | kinds::DATALOADER
    }

    fn templates(&self) -> Result<Vec<TemplateDef>, PluginError> {
        Ok(vec![support_template()])
    }

    fn dataloader_formats(&self) -> Result<Vec<DataFormatDef>, PluginError> {
        Ok(vec![DataFormatDef {
            name: FORMAT.into(),
            extensions: vec![FORMAT.into()],
            description: r"prompt<TAB>completion per line; \t \n \\ escapes; blank lines skipped"
                .into(),
        }])
    }

    fn dataloader_open(
        &self,
        request: DataloaderOpenRequest,
    ) -> Result<DataloaderOpenResponse, PluginError> {
        let dataset = index(&request.path)?;
        let len = dataset.lines.len() as u64;
        let mut datasets = self.datasets.write().unwrap_or_else(|p| p.into_inner());
        datasets.insert(request.path, Arc::new(dataset));
        Ok(DataloaderOpenResponse { len })
    }

    fn dataloader_read(
        &self,
        request: DataloaderReadRequest,
    ) -> Result<DataloaderReadResponse, PluginError> {
        let path = &request.path;
        let dataset = {
            let datasets = self.datasets.read().unwrap_or_else(|p| p.into_inner());
            datasets.get(path).cloned()
        }
        .ok_or_else(|| PluginError::BadRequest(format!("{path} is not open")))?;
        let total = dataset.lines.len();
        let range = usize::try_from(request.start)
            .ok()
            .zip(usize::try_from(request.end).ok());
        let Some(lines) = range
            .filter(|(start, end)| start <= end)
            .and_then(|(start, end)| dataset.lines.get(start..end))
        else {
            return Err(PluginError::BadRequest(format!(
                "records {}..{} of {path}: it has {total}",
                request.start, request.end
            )));
        };
        let records = lines
            .iter()
            .map(|line| read_record(path, &dataset.file, line))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DataloaderReadResponse { records })
    }
}

/// `acme-support`: short customer-support replies on a small (≤ 1-3B) instruct model. Every setting
/// that shapes the run is given explicitly, as the guide asks.
fn support_template() -> TemplateDef {
    TemplateDef {
        name: TEMPLATE.into(),
        description:
            "Support replies on small models: r=8 on q/k/v/o, lr 2e-4, cosine, seq 512, 3 epochs"
                .into(),
        settings: TrainSettings {
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            lr: 2e-4,
            weight_decay: 0.0,
            grad_clip: 1.0,
            schedule: Schedule::Cosine,
            warmup_steps: 10,
            epochs: 3,
            max_steps: None,
            batch_size: 4,
            grad_accum: 2,
            max_seq_len: 512,
            packing: false,
            train_on_inputs: false,
            workers: 2,
            prefetch: 4,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            ..TrainSettings::default()
        },
    }
}

/// Reads `path` once and indexes its records; the first bad line fails it.
fn index(path: &str) -> Result<Dataset, PluginError> {
    let failed = |e: std::io::Error| PluginError::Failed(format!("{path}: {e}"));
    let file = File::open(path).map_err(failed)?;
    let mut reader = BufReader::new(file.try_clone().map_err(failed)?);
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    let mut offset = 0u64;
    let mut number = 0u64;
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(failed)?;
        if read == 0 {
            break;
        }
        number += 1;
        let content = strip_line_end(&buf);
        let here = Line {
            offset,
            len: u32::try_from(content.len()).map_err(|_| {
                PluginError::Failed(format!("{path}:{number}: line longer than 4 GiB"))
            })?,
            number,
        };
        offset += read as u64;
        let text = std::str::from_utf8(content)
            .map_err(|e| PluginError::Failed(format!("{path}:{number}: not UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        split(path, number, text)?;
        lines.push(here);
    }
    if lines.is_empty() {
        return Err(PluginError::Failed(format!(
            "{path}: no records (every line is blank)"
        )));
    }
    Ok(Dataset { file, lines })
}

/// A line's bytes without its `\n` or `\r\n`.
fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Splits a line into its escaped prompt and completion, or names what is wrong with it.
fn split<'a>(path: &str, number: u64, text: &'a str) -> Result<(&'a str, &'a str), PluginError> {
    let tabs = text.matches('\t').count();
    if tabs != 1 {
        return Err(PluginError::Failed(format!(
            "{path}:{number}: expected prompt<TAB>completion (exactly one TAB), found {tabs} TABs; \
             write a TAB inside a field as \\t"
        )));
    }
    Ok(text.split_once('\t').expect("one tab"))
}

/// Reads one indexed record back from the file.
fn read_record(path: &str, file: &File, line: &Line) -> Result<Value, PluginError> {
    let mut buf = vec![0u8; line.len as usize];
    file.read_exact_at(&mut buf, line.offset).map_err(|e| {
        PluginError::Failed(format!(
            "{path}:{}: {e} (was the file changed after it was opened?)",
            line.number
        ))
    })?;
    let text = std::str::from_utf8(&buf).map_err(|_| {
        PluginError::Failed(format!(
            "{path}:{}: not UTF-8 any more (was the file changed after it was opened?)",
            line.number
        ))
    })?;
    let (prompt, completion) = split(path, line.number, text)?;
    Ok(json!({ "prompt": unescape(prompt), "completion": unescape(completion) }))
}

/// `\t`, `\n` and `\\` in a field stand for a tab, a newline and a backslash; any other backslash is
/// kept as it is.
pub fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            _ => {
                out.push('\\');
                continue;
            }
        }
        chars.next();
    }
    out
}

export_plugin!(Acme, Acme::default());

#[cfg(test)]
mod tests {
    use super::*;
    use lorad_plugin::{
        call_typed, check_abi, methods, plugin_name, DataloaderFormatsRequest,
        DataloaderFormatsResponse, LoradPluginV1, PluginCallError, TemplatesListRequest,
        TemplatesListResponse,
    };
    use std::path::PathBuf;

    /// What lorad does after `dlsym("lorad_plugin_v1")`.
    fn plugin() -> &'static LoradPluginV1 {
        unsafe { check_abi(lorad_plugin_v1()) }.unwrap()
    }

    /// A temp file (removed on drop) with `text`.
    struct TempTsv(PathBuf);

    impl TempTsv {
        fn new(tag: &str, text: &str) -> TempTsv {
            let path = std::env::temp_dir().join(format!(
                "acme-{tag}-{}-{:?}.tsv",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, text).unwrap();
            TempTsv(path)
        }

        fn path(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempTsv {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn open(path: &str) -> Result<DataloaderOpenResponse, PluginCallError> {
        let request = DataloaderOpenRequest { path: path.into() };
        unsafe { call_typed(plugin(), methods::DATALOADER_OPEN, &request) }
    }

    fn read(path: &str, start: u64, end: u64) -> Result<Vec<Value>, PluginCallError> {
        let request = DataloaderReadRequest {
            path: path.into(),
            start,
            end,
        };
        let reply: DataloaderReadResponse =
            unsafe { call_typed(plugin(), methods::DATALOADER_READ, &request) }?;
        Ok(reply.records)
    }

    /// The error reply's code and message.
    fn plugin_error(err: PluginCallError) -> (String, String) {
        match err {
            PluginCallError::Plugin { code, message } => (code.to_string(), message),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn descriptor_names_the_plugin_and_its_kinds() {
        let desc = plugin();
        assert_eq!(unsafe { plugin_name(desc) }, NAME);
        assert_eq!(desc.kinds, kinds::TEMPLATES | kinds::DATALOADER);
        // Called again, the entry returns the same descriptor.
        assert!(std::ptr::eq(desc, plugin()));
    }

    #[test]
    fn template_is_valid_and_stable() {
        let list = || -> TemplatesListResponse {
            unsafe { call_typed(plugin(), methods::TEMPLATES_LIST, &TemplatesListRequest {}) }
                .unwrap()
        };
        let reply = list();
        assert_eq!(reply.templates.len(), 1);
        let t = &reply.templates[0];
        assert_eq!(t.name, TEMPLATE);
        assert!(!t.description.is_empty() && !t.description.contains('\n'));
        t.settings.validate().unwrap();
        assert_eq!(t.settings.lora_r, 8);
        assert_eq!(t.settings.schedule, Schedule::Cosine);
        // templates.list answers the same every time.
        assert_eq!(
            format!("{:?}", list().templates),
            format!("{:?}", reply.templates)
        );
    }

    #[test]
    fn declares_the_tsv_format() {
        let formats: DataloaderFormatsResponse = unsafe {
            call_typed(
                plugin(),
                methods::DATALOADER_FORMATS,
                &DataloaderFormatsRequest {},
            )
        }
        .unwrap();
        assert_eq!(formats.formats.len(), 1);
        assert_eq!(formats.formats[0].name, FORMAT);
        assert_eq!(formats.formats[0].extensions, ["tsv"]);
    }

    #[test]
    fn reads_a_tsv_dataset_with_escapes_and_blank_lines() {
        let tsv = TempTsv::new(
            "read",
            "Hi\tHello!\n\n   \nName?\tAcme\\nBot\r\nPath?\tC:\\data \\\\ x\\ty\nlast\tno newline",
        );
        let path = tsv.path();
        assert_eq!(open(&path).unwrap().len, 4);
        assert_eq!(
            read(&path, 0, 4).unwrap(),
            [
                json!({ "prompt": "Hi", "completion": "Hello!" }),
                json!({ "prompt": "Name?", "completion": "Acme\nBot" }),
                json!({ "prompt": "Path?", "completion": "C:\\data \\ x\ty" }),
                json!({ "prompt": "last", "completion": "no newline" }),
            ]
        );
        assert_eq!(
            read(&path, 1, 2).unwrap(),
            [json!({ "prompt": "Name?", "completion": "Acme\nBot" })]
        );
    }

    #[test]
    fn a_malformed_line_fails_open_naming_file_and_line() {
        for (tag, text, line, found) in [
            ("none", "a\tb\n\nno tab here\n", 3, "found 0 TABs"),
            ("two", "a\tb\nc\td\te\n", 2, "found 2 TABs"),
        ] {
            let tsv = TempTsv::new(tag, text);
            let path = tsv.path();
            let (code, message) = plugin_error(open(&path).unwrap_err());
            assert_eq!(code, "failed");
            assert!(
                message.starts_with(&format!("{path}:{line}: expected prompt<TAB>completion")),
                "{message}"
            );
            assert!(message.contains(found), "{message}");
        }
        let tsv = TempTsv::new("blank", "\n  \n\n");
        let (code, message) = plugin_error(open(&tsv.path()).unwrap_err());
        assert_eq!(code, "failed");
        assert!(message.contains("no records"), "{message}");

        let tsv = TempTsv::new("utf8", "");
        std::fs::write(&tsv.0, b"a\tb\n\xff\tc\n").unwrap();
        let (code, message) = plugin_error(open(&tsv.path()).unwrap_err());
        assert_eq!(code, "failed");
        assert!(
            message.starts_with(&format!("{}:2: not UTF-8", tsv.path())),
            "{message}"
        );

        let missing = std::env::temp_dir().join("acme-does-not-exist.tsv");
        let (code, message) = plugin_error(open(&missing.display().to_string()).unwrap_err());
        assert_eq!(code, "failed");
        assert!(message.contains("acme-does-not-exist.tsv"), "{message}");
    }

    #[test]
    fn ranges_are_checked() {
        let tsv = TempTsv::new("ranges", "a\t1\nb\t2\nc\t3\n");
        let path = tsv.path();
        assert_eq!(open(&path).unwrap().len, 3);
        assert_eq!(read(&path, 3, 3).unwrap(), Vec::<Value>::new());
        assert_eq!(read(&path, 0, 0).unwrap(), Vec::<Value>::new());
        assert_eq!(read(&path, 2, 3).unwrap().len(), 1);
        for (start, end) in [(0, 4), (3, 4), (2, 1), (u64::MAX, u64::MAX), (0, u64::MAX)] {
            let (code, message) = plugin_error(read(&path, start, end).unwrap_err());
            assert_eq!(code, "bad_request", "{start}..{end}");
            assert!(message.contains(&path), "{message}");
        }
        let (code, message) = plugin_error(read("/not/opened.tsv", 0, 1).unwrap_err());
        assert_eq!(code, "bad_request");
        assert!(message.contains("/not/opened.tsv is not open"), "{message}");
    }

    #[test]
    fn opening_again_replaces_the_index() {
        let tsv = TempTsv::new("reopen", "a\t1\n");
        let path = tsv.path();
        assert_eq!(open(&path).unwrap().len, 1);
        std::fs::write(&tsv.0, "x\t9\ny\t8\n").unwrap();
        assert_eq!(open(&path).unwrap().len, 2);
        assert_eq!(
            read(&path, 1, 2).unwrap(),
            [json!({ "prompt": "y", "completion": "8" })]
        );
    }

    #[test]
    fn concurrent_reads_agree() {
        let text: String = (0..500).map(|i| format!("p{i}\tc{i}\\n\n")).collect();
        let tsv = TempTsv::new("threads", &text);
        let path = tsv.path();
        assert_eq!(open(&path).unwrap().len, 500);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let path = &path;
                s.spawn(move || {
                    for k in 0..500u64 {
                        let i = (k * 7 + t * 61) % 500;
                        let got = read(path, i, i + 1).unwrap();
                        assert_eq!(
                            got,
                            [json!({ "prompt": format!("p{i}"), "completion": format!("c{i}\n") })]
                        );
                    }
                });
            }
        });
    }

    #[test]
    fn unknown_methods_are_refused() {
        let err = unsafe {
            call_typed::<_, DataloaderOpenResponse>(
                plugin(),
                methods::EXPORT_FORMATS,
                &DataloaderFormatsRequest {},
            )
        }
        .unwrap_err();
        assert_eq!(plugin_error(err).0, "unknown_method");
    }

    #[test]
    fn unescape_rules() {
        assert_eq!(unescape(r"a\tb\nc\\d"), "a\tb\nc\\d");
        assert_eq!(unescape(r"C:\data\"), r"C:\data\");
        assert_eq!(unescape(r"\\n"), r"\n");
        assert_eq!(unescape("plain"), "plain");
    }
}
