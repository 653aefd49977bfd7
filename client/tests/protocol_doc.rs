//! Checks the examples in docs/PROTOCOL.md against the wire types.
//!
//! Convention: every ```json block is preceded by a line `<!-- decode: TYPE -->` naming a type of
//! lorad-schema. The block is converted to MessagePack (as a client in another language would send it)
//! and decoded as that type; then the decoded value is encoded again and every key and value of the
//! example must be found in it, so a misspelt optional field (which decoding alone would ignore) or a
//! wrong value fails too. `<!-- decode: TYPE lenient -->` skips that second check (for examples that
//! show unknown fields on purpose). A ```text block preceded by `<!-- frame: TYPE -->` holds the hex
//! bytes of one whole frame, length prefix included.
//!
//! The test also checks that every request, response, event kind and error code is documented.
use lorad_client::lorad_schema::{
    CheckpointInfo, ClientFrame, CpuSample, DaemonStatus, DeviceInfo, ErrorCode, Event, EventBody,
    GpuSample, Handshake, JobRecord, JobSpec, JobState, MetricPoint, Progress, Push, Reply,
    Request, Response, ServerFrame, Template, TrainSettings, WireError,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

const REQUESTS: [&str; 21] = [
    "status",
    "templates",
    "submit",
    "list",
    "get",
    "cancel",
    "pause",
    "resume",
    "retry",
    "set_priority",
    "checkpoints",
    "export",
    "metrics",
    "logs",
    "subscribe",
    "unsubscribe",
    "hold",
    "release",
    "delete",
    "shutdown",
    "backup",
];
const RESPONSES: [&str; 12] = [
    "status",
    "templates",
    "job",
    "jobs",
    "checkpoints",
    "exported",
    "metrics",
    "logs",
    "subscribed",
    "done",
    "backup",
    "deleted",
];
const EVENTS: [&str; 5] = ["state_changed", "metrics", "log", "export", "notice"];
const HANDSHAKES: [&str; 3] = ["hello", "welcome", "error"];

// Exhaustive matches: a new variant in the schema stops this test from compiling until it is named
// here, in the lists above, and (for the test to pass) documented.
fn request_kind(r: &Request) -> &'static str {
    match r {
        Request::Status => "status",
        Request::Templates => "templates",
        Request::Submit(_) => "submit",
        Request::List { .. } => "list",
        Request::Get { .. } => "get",
        Request::Cancel { .. } => "cancel",
        Request::Pause { .. } => "pause",
        Request::Resume { .. } => "resume",
        Request::Retry { .. } => "retry",
        Request::SetPriority { .. } => "set_priority",
        Request::Checkpoints { .. } => "checkpoints",
        Request::Export { .. } => "export",
        Request::Metrics { .. } => "metrics",
        Request::Logs { .. } => "logs",
        Request::Subscribe { .. } => "subscribe",
        Request::Unsubscribe { .. } => "unsubscribe",
        Request::Hold { .. } => "hold",
        Request::Release { .. } => "release",
        Request::Delete { .. } => "delete",
        Request::Shutdown => "shutdown",
        Request::Backup => "backup",
    }
}

fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Status(_) => "status",
        Response::Templates { .. } => "templates",
        Response::Job(_) => "job",
        Response::Jobs { .. } => "jobs",
        Response::Checkpoints { .. } => "checkpoints",
        Response::Exported(_) => "exported",
        Response::Metrics { .. } => "metrics",
        Response::Logs { .. } => "logs",
        Response::Subscribed { .. } => "subscribed",
        Response::Done => "done",
        Response::Backup { .. } => "backup",
        Response::Estimate(_) => "estimate",
        Response::Deleted { .. } => "deleted",
    }
}

fn event_kind(e: &EventBody) -> &'static str {
    match e {
        EventBody::StateChanged { .. } => "state_changed",
        EventBody::Metrics { .. } => "metrics",
        EventBody::Log { .. } => "log",
        EventBody::Checkpoint { .. } => "checkpoint",
        EventBody::Export { .. } => "export",
        EventBody::Notice { .. } => "notice",
    }
}

fn handshake_kind(h: &Handshake) -> &'static str {
    match h {
        Handshake::Hello { .. } => "hello",
        Handshake::Welcome { .. } => "welcome",
        Handshake::Error { .. } => "error",
    }
}

fn error_codes() -> Vec<(ErrorCode, &'static str)> {
    let all = [
        ErrorCode::NotFound,
        ErrorCode::InvalidArgument,
        ErrorCode::InvalidState,
        ErrorCode::PermissionDenied,
        ErrorCode::Unsupported,
        ErrorCode::TooLarge,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::Failed,
        ErrorCode::QuotaExceeded,
    ];
    all.into_iter()
        .map(|c| {
            let name = match c {
                ErrorCode::NotFound => "not_found",
                ErrorCode::InvalidArgument => "invalid_argument",
                ErrorCode::InvalidState => "invalid_state",
                ErrorCode::PermissionDenied => "permission_denied",
                ErrorCode::Unsupported => "unsupported",
                ErrorCode::TooLarge => "too_large",
                ErrorCode::Busy => "busy",
                ErrorCode::Internal => "internal",
                ErrorCode::Failed => "failed",
                ErrorCode::QuotaExceeded => "quota_exceeded",
            };
            (c, name)
        })
        .collect()
}

/// What the examples covered.
#[derive(Default, Debug)]
struct Coverage {
    examples: usize,
    requests: BTreeSet<&'static str>,
    responses: BTreeSet<&'static str>,
    events: BTreeSet<&'static str>,
    handshakes: BTreeSet<&'static str>,
}

impl Coverage {
    fn reply(&mut self, r: &Reply) {
        if let Some(ok) = &r.ok {
            self.responses.insert(response_kind(ok));
        }
    }
}

/// Every key and value of `example` must appear in `got` (numbers compared as floats).
fn contained(example: &Value, got: &Value, path: &str) -> Result<(), String> {
    match (example, got) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let path = format!("{path}.{k}");
                let g = b
                    .get(k)
                    .ok_or_else(|| format!("{path}: not a field of this type (misspelt?)"))?;
                contained(v, g, &path)?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .try_for_each(|(i, (x, y))| contained(x, y, &format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => Ok(()),
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!(
            "{path}: the example says {a} but it decodes as {b}"
        )),
    }
}

fn decode_as<T: DeserializeOwned + Serialize>(example: &Value, lenient: bool) -> Result<T, String> {
    let bytes = rmp_serde::to_vec_named(example)
        .map_err(|e| format!("cannot encode as MessagePack: {e}"))?;
    let value: T = rmp_serde::from_slice(&bytes).map_err(|e| format!("does not decode: {e}"))?;
    if !lenient {
        let back = serde_json::to_value(&value).map_err(|e| format!("cannot re-encode: {e}"))?;
        contained(example, &back, "$")?;
    }
    Ok(value)
}

/// Decodes one example as the named type, recording what it covers.
fn check_example(
    ty: &str,
    example: &Value,
    lenient: bool,
    cov: &mut Coverage,
) -> Result<(), String> {
    match ty {
        "Handshake" => {
            let h: Handshake = decode_as(example, lenient)?;
            cov.handshakes.insert(handshake_kind(&h));
        }
        "ClientFrame" => {
            cov.requests.insert(request_kind(
                &decode_as::<ClientFrame>(example, lenient)?.req,
            ));
        }
        "Request" => {
            cov.requests
                .insert(request_kind(&decode_as::<Request>(example, lenient)?));
        }
        "Response" => {
            cov.responses
                .insert(response_kind(&decode_as::<Response>(example, lenient)?));
        }
        "Reply" => cov.reply(&decode_as::<Reply>(example, lenient)?),
        "ServerFrame" => match decode_as::<ServerFrame>(example, lenient)? {
            ServerFrame::Reply(r) => cov.reply(&r),
            ServerFrame::Push(p) => {
                cov.events.insert(event_kind(&p.event.body));
            }
        },
        "Push" => {
            cov.events
                .insert(event_kind(&decode_as::<Push>(example, lenient)?.event.body));
        }
        "Event" => {
            cov.events
                .insert(event_kind(&decode_as::<Event>(example, lenient)?.body));
        }
        "EventBody" => {
            cov.events
                .insert(event_kind(&decode_as::<EventBody>(example, lenient)?));
        }
        "WireError" => {
            decode_as::<WireError>(example, lenient)?;
        }
        "ErrorCode" => {
            decode_as::<ErrorCode>(example, lenient)?;
        }
        "JobState" => {
            decode_as::<JobState>(example, lenient)?;
        }
        "JobSpec" => {
            decode_as::<JobSpec>(example, lenient)?;
        }
        "JobRecord" => {
            decode_as::<JobRecord>(example, lenient)?;
        }
        "CheckpointInfo" => {
            decode_as::<CheckpointInfo>(example, lenient)?;
        }
        "Progress" => {
            decode_as::<Progress>(example, lenient)?;
        }
        "MetricPoint" => {
            decode_as::<MetricPoint>(example, lenient)?;
        }
        "GpuSample" => {
            decode_as::<GpuSample>(example, lenient)?;
        }
        "CpuSample" => {
            decode_as::<CpuSample>(example, lenient)?;
        }
        "TrainSettings" => {
            decode_as::<TrainSettings>(example, lenient)?;
        }
        "DaemonStatus" => {
            decode_as::<DaemonStatus>(example, lenient)?;
        }
        "DeviceInfo" => {
            decode_as::<DeviceInfo>(example, lenient)?;
        }
        "Template" => {
            decode_as::<Template>(example, lenient)?;
        }
        other => return Err(format!("unknown type '{other}' in the decode marker")),
    }
    Ok(())
}

/// Checks a frame given as hex bytes: the length prefix matches and the payload decodes.
fn check_frame(ty: &str, hex: &str) -> Result<(), String> {
    let bytes: Vec<u8> = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).map_err(|e| format!("bad hex byte '{b}': {e}")))
        .collect::<Result<_, _>>()?;
    let (header, payload) = bytes
        .split_at_checked(4)
        .ok_or("shorter than the 4-byte length")?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len != payload.len() {
        return Err(format!(
            "the length prefix says {len} bytes but {} follow",
            payload.len()
        ));
    }
    match ty {
        "Handshake" => rmp_serde::from_slice::<Handshake>(payload).map(drop),
        "ClientFrame" => rmp_serde::from_slice::<ClientFrame>(payload).map(drop),
        "ServerFrame" => rmp_serde::from_slice::<ServerFrame>(payload).map(drop),
        other => return Err(format!("unknown frame type '{other}'")),
    }
    .map_err(|e| format!("payload does not decode: {e}"))
}

/// Checks every example of a markdown text; returns the coverage, or every problem found.
fn check_doc(text: &str) -> Result<Coverage, Vec<String>> {
    let mut cov = Coverage::default();
    let mut problems = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut marker: Option<(usize, &str, &str)> = None; // (line, kind, args)
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let lineno = i + 1;
        if let Some(inner) = line
            .strip_prefix("<!--")
            .and_then(|l| l.strip_suffix("-->"))
        {
            let inner = inner.trim();
            for kind in ["decode:", "frame:"] {
                if let Some(args) = inner.strip_prefix(kind) {
                    if let Some((at, ..)) = marker {
                        problems.push(format!("line {at}: marker not followed by a code block"));
                    }
                    marker = Some((lineno, kind, args.trim()));
                }
            }
            i += 1;
            continue;
        }
        if let Some(lang) = line.strip_prefix("```") {
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && lines[end].trim() != "```" {
                end += 1;
            }
            let body = lines[start..end.min(lines.len())].join("\n");
            match (lang.trim(), marker.take()) {
                ("json", Some((_, "decode:", args))) => {
                    let mut words = args.split_whitespace();
                    let ty = words.next().unwrap_or("");
                    let lenient = words.any(|w| w == "lenient");
                    cov.examples += 1;
                    let result = serde_json::from_str::<Value>(&body)
                        .map_err(|e| format!("not valid JSON: {e}"))
                        .and_then(|v| check_example(ty, &v, lenient, &mut cov));
                    if let Err(e) = result {
                        problems.push(format!("line {lineno}: {ty} example: {e}"));
                    }
                }
                ("json", _) => problems.push(format!(
                    "line {lineno}: json block without a `<!-- decode: TYPE -->` line"
                )),
                (_, Some((_, "frame:", ty))) => {
                    if let Err(e) = check_frame(ty, &body) {
                        problems.push(format!("line {lineno}: {ty} frame: {e}"));
                    }
                }
                (_, Some((at, ..))) => {
                    problems.push(format!("line {at}: marker not followed by a json block"))
                }
                (_, None) => {}
            }
            i = end + 1;
            continue;
        }
        if !line.is_empty() {
            if let Some((at, ..)) = marker.take() {
                problems.push(format!("line {at}: marker not followed by a code block"));
            }
        }
        i += 1;
    }
    if let Some((at, ..)) = marker {
        problems.push(format!("line {at}: marker at the end of the file"));
    }
    if problems.is_empty() {
        Ok(cov)
    } else {
        Err(problems)
    }
}

fn protocol_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn missing(documented: &BTreeSet<&'static str>, all: &[&'static str]) -> Vec<&'static str> {
    all.iter()
        .copied()
        .filter(|k| !documented.contains(k))
        .collect()
}

#[test]
fn every_example_in_protocol_md_decodes() {
    let doc = protocol_md();
    let cov = match check_doc(&doc) {
        Ok(cov) => cov,
        Err(problems) => panic!(
            "docs/PROTOCOL.md has broken examples:\n  {}",
            problems.join("\n  ")
        ),
    };
    assert!(
        cov.examples >= 20,
        "only {} examples found; is the marker convention still used?",
        cov.examples
    );
    assert_eq!(
        missing(&cov.requests, &REQUESTS),
        Vec::<&str>::new(),
        "requests without an example"
    );
    assert_eq!(
        missing(&cov.responses, &RESPONSES),
        Vec::<&str>::new(),
        "responses without an example"
    );
    assert_eq!(
        missing(&cov.events, &EVENTS),
        Vec::<&str>::new(),
        "events without an example"
    );
    assert_eq!(
        missing(&cov.handshakes, &HANDSHAKES),
        Vec::<&str>::new(),
        "handshake messages without an example"
    );
    for (_, name) in error_codes() {
        assert!(
            doc.contains(&format!("`{name}`")),
            "error code {name} is not documented"
        );
    }
    for name in REQUESTS {
        assert!(
            doc.contains(&format!("### {name}\n")),
            "request {name} has no section"
        );
    }
}

#[test]
fn broken_examples_fail() {
    let good = "<!-- decode: Request -->\n```json\n{\"type\": \"get\", \"job\": 42}\n```\n";
    assert!(check_doc(good).is_ok());
    let broken = [
        // Unknown request type.
        "<!-- decode: Request -->\n```json\n{\"type\": \"gets\", \"job\": 42}\n```\n",
        // Required field missing.
        "<!-- decode: Request -->\n```json\n{\"type\": \"get\"}\n```\n",
        // Wrong value type.
        "<!-- decode: Request -->\n```json\n{\"type\": \"get\", \"job\": \"42\"}\n```\n",
        // A misspelt optional field would be ignored by decoding alone.
        "<!-- decode: Request -->\n```json\n{\"type\": \"metrics\", \"job\": 1, \"since\": 3}\n```\n",
        // Not JSON.
        "<!-- decode: Request -->\n```json\n{\"type\": \"status\",}\n```\n",
        // No marker.
        "```json\n{\"type\": \"status\"}\n```\n",
        // Unknown type name.
        "<!-- decode: Requests -->\n```json\n{\"type\": \"status\"}\n```\n",
        // Marker without a block.
        "<!-- decode: Request -->\nsome text\n```json\n{\"type\": \"status\"}\n```\n",
        // A frame whose length prefix is wrong.
        "<!-- frame: Handshake -->\n```text\n00 00 00 02 80\n```\n",
    ];
    for doc in broken {
        assert!(check_doc(doc).is_err(), "accepted a broken example:\n{doc}");
    }
    let lenient = "<!-- decode: Request lenient -->\n```json\n{\"type\": \"metrics\", \"job\": 1, \"since\": 3}\n```\n";
    assert!(
        check_doc(lenient).is_ok(),
        "lenient examples may carry unknown fields"
    );
}
