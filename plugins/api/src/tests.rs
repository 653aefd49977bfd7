//! In-process tests: the macro is used here and its generated extern fns are called through the
//! descriptor, exactly as the host would after `dlsym`.
use super::*;
use lorad_schema::TrainSettings;

struct TestPlugin {
    prefix: String,
}

impl Plugin for TestPlugin {
    fn name(&self) -> &'static str {
        "test-plugin"
    }
    fn kinds(&self) -> u32 {
        kinds::TEMPLATES | kinds::EXPORT
    }
    fn templates(&self) -> Result<Vec<TemplateDef>, PluginError> {
        Ok(vec![TemplateDef {
            name: format!("{}-basic", self.prefix),
            description: "test".into(),
            settings: TrainSettings {
                lora_r: 8,
                ..Default::default()
            },
        }])
    }
    fn export(&self, request: ExportRequest) -> Result<ExportResponse, PluginError> {
        match request.out.as_str() {
            "panic" => panic!("export exploded on {}", request.job_dir),
            "fail" => Err(PluginError::Failed("disk full".into())),
            out => Ok(ExportResponse {
                files: vec![format!("{out}/adapter.safetensors")],
            }),
        }
    }
    // Declared nowhere in `kinds`, so dispatch must refuse it even though it is implemented.
    fn dataloader_open(
        &self,
        _request: DataloaderOpenRequest,
    ) -> Result<DataloaderOpenResponse, PluginError> {
        Ok(DataloaderOpenResponse { len: 1 })
    }
}

export_plugin!(TestPlugin, TestPlugin { prefix: "t".into() });

fn desc() -> &'static LoradPluginV1 {
    unsafe { check_abi(lorad_plugin_v1()) }.unwrap()
}

fn export_request(out: &str) -> ExportRequest {
    ExportRequest {
        format: "test".into(),
        job_dir: "/jobs/7".into(),
        adapter_dir: "/jobs/7/adapter".into(),
        base_model: "/models/tiny".into(),
        out: out.into(),
        checkpoint: None,
        trainer_state: None,
        job: job_record(),
        metrics: Vec::new(),
    }
}

fn job_record() -> lorad_schema::JobRecord {
    lorad_schema::JobRecord {
        id: lorad_schema::JobId(7),
        name: "seven".into(),
        state: lorad_schema::JobState::Completed,
        reason: None,
        owner_uid: 1000,
        priority: 0,
        template: "t-basic".into(),
        base_model: "/models/tiny".into(),
        dataset: "/data/train.jsonl".into(),
        output_dir: "/jobs/7/adapter".into(),
        settings: TrainSettings::default(),
        overrides: Default::default(),
        progress: Default::default(),
        created_at_ms: 0,
        started_at_ms: None,
        finished_at_ms: None,
        adapter_dir: Some("/jobs/7/adapter".into()),
        worker_pid: None,
        resume_checkpoint: None,
        requeued: false,
        memory_estimate: None,
        first_started_at_ms: None,
        after: Vec::new(),
        not_before_ms: None,
        on_finish: None,
    }
}

#[test]
fn descriptor_fields() {
    let d = desc();
    assert_eq!(d.abi_version, ABI_VERSION);
    assert_eq!(unsafe { plugin_name(d) }, "test-plugin");
    assert_eq!(d.kinds, kinds::TEMPLATES | kinds::EXPORT);
    // The entry point is idempotent: the same static descriptor every time.
    assert!(std::ptr::eq(d, lorad_plugin_v1()));
    assert_eq!(ENTRY_SYMBOL, b"lorad_plugin_v1\0");
}

#[test]
fn templates_round_trip() {
    let reply: TemplatesListResponse =
        unsafe { call_typed(desc(), methods::TEMPLATES_LIST, &TemplatesListRequest {}) }.unwrap();
    let templates = reply.templates;
    assert_eq!(templates.len(), 1);
    assert_eq!(templates[0].name, "t-basic");
    assert_eq!(
        templates[0].settings,
        TrainSettings {
            lora_r: 8,
            ..Default::default()
        }
    );
}

#[test]
fn export_round_trip_raw_msgpack() {
    let request = rmp_serde::to_vec_named(&export_request("/out")).unwrap();
    let reply = unsafe { call_plugin(desc(), methods::EXPORT_RUN, &request) }.unwrap();
    let reply: ExportResponse = rmp_serde::from_slice(&reply).unwrap();
    assert_eq!(reply.files, vec!["/out/adapter.safetensors".to_owned()]);
}

#[test]
fn unknown_method_is_an_error_reply() {
    let err = unsafe { call_plugin(desc(), "frobnicate", &[0x80]) }.unwrap_err();
    assert_eq!(
        err,
        PluginCallError::Plugin {
            code: codes::UNKNOWN_METHOD.into(),
            message: "unknown method \"frobnicate\"".into()
        }
    );
}

#[test]
fn undeclared_kind_is_unknown_method() {
    let req = DataloaderOpenRequest {
        path: "/data.jsonl".into(),
    };
    let err =
        unsafe { call_typed::<_, DataloaderOpenResponse>(desc(), methods::DATALOADER_OPEN, &req) }
            .unwrap_err();
    assert!(
        matches!(err, PluginCallError::Plugin { ref code, .. } if code == codes::UNKNOWN_METHOD)
    );
}

#[test]
fn malformed_request_is_bad_request() {
    let err = unsafe { call_plugin(desc(), methods::EXPORT_RUN, &[0xc1]) }.unwrap_err();
    assert!(matches!(err, PluginCallError::Plugin { ref code, .. } if code == codes::BAD_REQUEST));
}

#[test]
fn non_utf8_method_is_bad_request() {
    let d = desc();
    let method = [0xff_u8, 0xfe];
    let mut out = Buf::empty();
    let status = unsafe { (d.call)(method.as_ptr(), method.len(), std::ptr::null(), 0, &mut out) };
    assert_ne!(status, STATUS_OK);
    let bytes = unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec();
    unsafe { (d.free_buf)(out) };
    let reply: ErrorReply = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(reply.code, codes::BAD_REQUEST);
}

#[test]
fn method_error_is_an_error_reply() {
    let err = unsafe {
        call_typed::<_, ExportResponse>(desc(), methods::EXPORT_RUN, &export_request("fail"))
    }
    .unwrap_err();
    assert_eq!(
        err,
        PluginCallError::Plugin {
            code: codes::FAILED.into(),
            message: "disk full".into()
        }
    );
}

#[test]
fn panic_becomes_internal_error_and_process_survives() {
    let err = unsafe {
        call_typed::<_, ExportResponse>(desc(), methods::EXPORT_RUN, &export_request("panic"))
    }
    .unwrap_err();
    assert_eq!(
        err,
        PluginCallError::Plugin {
            code: codes::INTERNAL.into(),
            message: "plugin panicked: export exploded on /jobs/7".into()
        }
    );
    // The plugin still answers afterwards.
    let ok: ExportResponse =
        unsafe { call_typed(desc(), methods::EXPORT_RUN, &export_request("/o")) }.unwrap();
    assert_eq!(ok.files.len(), 1);
}

#[test]
fn wrong_abi_version_is_rejected() {
    let mut future = *desc();
    future.abi_version = 2;
    let err = unsafe { check_abi(&future) }.unwrap_err();
    assert_eq!(
        err.to_string(),
        "plugin test-plugin has ABI version 2; this lorad supports 1"
    );
    assert_eq!(
        unsafe { check_abi(std::ptr::null()) }.unwrap_err(),
        AbiError::NullDescriptor
    );
}

#[test]
fn malformed_error_reply_is_reported() {
    unsafe extern "C" fn bad_call(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        out: *mut Buf,
    ) -> i32 {
        unsafe { out.write(Buf::from_vec(vec![0xc1])) };
        7
    }
    let mut d = *desc();
    d.call = bad_call;
    let err = unsafe { call_plugin(&d, "x", &[]) }.unwrap_err();
    assert_eq!(err, PluginCallError::MalformedError { status: 7 });
}

#[test]
fn dataloader_messages_round_trip() {
    let reply = DataloaderReadResponse {
        records: vec![
            serde_json::json!({"text": "hello"}),
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "n": 3, "x": null}),
        ],
    };
    let bytes = messages::encode(&reply).unwrap();
    let back: DataloaderReadResponse = messages::decode(&bytes).unwrap();
    assert_eq!(back, reply);

    // Optional fields left out by a host decode as their defaults.
    let mut full = rmp_serde::to_vec_named(&export_request("/out")).unwrap();
    let value: serde_json::Value = rmp_serde::from_slice(&full).unwrap();
    let mut map = value.as_object().unwrap().clone();
    for optional in ["checkpoint", "trainer_state", "metrics"] {
        map.remove(optional);
    }
    full = rmp_serde::to_vec_named(&map).unwrap();
    let req: ExportRequest = messages::decode(&full).unwrap();
    assert_eq!(req.checkpoint, None);
    assert!(req.metrics.is_empty());
}

#[test]
fn dataloader_formats_round_trip() {
    struct Tsv;
    impl Plugin for Tsv {
        fn name(&self) -> &'static str {
            "tsv"
        }
        fn kinds(&self) -> u32 {
            kinds::DATALOADER
        }
        fn dataloader_formats(&self) -> Result<Vec<DataFormatDef>, PluginError> {
            Ok(vec![DataFormatDef {
                name: "tsv".into(),
                extensions: vec!["tsv".into()],
                description: "prompt<TAB>completion".into(),
            }])
        }
    }
    let req = messages::encode(&DataloaderFormatsRequest {}).unwrap();
    let reply = Tsv.call(methods::DATALOADER_FORMATS, &req).unwrap();
    let formats: DataloaderFormatsResponse = messages::decode(&reply).unwrap();
    assert_eq!(formats.formats[0].extensions, ["tsv"]);
    // Declared kinds gate the method: a templates-only plugin does not answer it.
    assert!(matches!(
        TestPlugin { prefix: "t".into() }.call(methods::DATALOADER_FORMATS, &req),
        Err(PluginError::UnknownMethod(_))
    ));
}

#[test]
fn free_buf_accepts_empty() {
    unsafe { (desc().free_buf)(Buf::empty()) };
}
