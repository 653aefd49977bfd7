//! The templates checked in-process and through the real C entry point, as lorad calls them.
use super::*;
use lorad_plugin::{
    call_typed, check_abi, methods, plugin_name, TemplatesListRequest, TemplatesListResponse,
};
use lorad_schema::TARGET_MODULES;

const NAMES: [&str; 8] = [
    "basic-fine-tune",
    "advanced-fine-tune",
    "qa-optimized",
    "coding-assistant",
    "chatbot-personality",
    "domain-expert",
    "multilingual",
    "efficient-fine-tune",
];

fn listed_through_abi() -> Vec<TemplateDef> {
    let desc = unsafe { check_abi(lorad_plugin_v1()) }.unwrap();
    assert_eq!(unsafe { plugin_name(desc) }, PLUGIN_NAME);
    assert_eq!(desc.kinds, kinds::TEMPLATES);
    let reply: TemplatesListResponse =
        unsafe { call_typed(desc, methods::TEMPLATES_LIST, &TemplatesListRequest {}) }.unwrap();
    reply.templates
}

#[test]
fn every_template_validates() {
    for t in builtin() {
        t.settings
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", t.name));
        assert!(
            t.settings
                .target_modules
                .iter()
                .all(|m| TARGET_MODULES.contains(&m.as_str())),
            "{}",
            t.name
        );
        assert!(
            t.settings.workers > 0,
            "{}: workers 0 starves the GPU",
            t.name
        );
    }
}

#[test]
fn exactly_the_eight_names_once_each() {
    let names: Vec<String> = builtin().into_iter().map(|t| t.name).collect();
    assert_eq!(names, NAMES);
}

#[test]
fn descriptions_are_one_line_and_state_rank_and_epochs() {
    for t in builtin() {
        let d = &t.description;
        assert!(!d.trim().is_empty(), "{}", t.name);
        assert!(!d.contains(['\n', '\r']), "{}: {d:?}", t.name);
        assert!(d.len() <= 100, "{}: {} chars", t.name, d.len());
        // The numbers a description quotes must be the ones the template sets.
        assert!(
            d.contains(&format!("r={}", t.settings.lora_r)),
            "{}: {d}",
            t.name
        );
        assert!(
            d.contains(&format!("{} epoch", t.settings.epochs)),
            "{}: {d}",
            t.name
        );
        assert!(
            d.contains(&format!("seq {}", t.settings.max_seq_len)) || t.name == "basic-fine-tune",
            "{}: {d}",
            t.name
        );
    }
}

#[test]
fn entry_point_lists_every_field_unchanged() {
    // Serialize (MessagePack, named) in the plugin, deserialize in the host: every field of every
    // template must come back equal, including the ones left at lorad's defaults.
    assert_eq!(listed_through_abi(), builtin());
}

#[test]
fn unknown_and_undeclared_methods_are_refused() {
    let desc = unsafe { check_abi(lorad_plugin_v1()) }.unwrap();
    let err = unsafe {
        call_typed::<_, lorad_plugin::DataloaderFormatsResponse>(
            desc,
            methods::DATALOADER_FORMATS,
            &lorad_plugin::DataloaderFormatsRequest {},
        )
    }
    .unwrap_err();
    assert!(
        matches!(err, lorad_plugin::PluginCallError::Plugin { ref code, .. }
            if code == lorad_plugin::codes::UNKNOWN_METHOD),
        "{err}"
    );
}

/// The three templates lorad had before the plugin keep their exact settings (these are the values
/// of the old `daemon/src/templates.rs`), so existing job specs train the same way.
#[test]
fn legacy_templates_keep_their_values() {
    let base = TrainSettings::default();
    let find = |name: &str| {
        builtin()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap()
            .settings
    };
    assert_eq!(
        find("basic-fine-tune"),
        TrainSettings {
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            target_modules: modules(QV),
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 10,
            epochs: 3,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 512,
            ..base.clone()
        }
    );
    assert_eq!(
        find("efficient-fine-tune"),
        TrainSettings {
            lora_r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: modules(QV),
            lr: 3e-4,
            warmup_steps: 5,
            epochs: 1,
            batch_size: 8,
            max_seq_len: 256,
            ..base.clone()
        }
    );
    assert_eq!(
        find("advanced-fine-tune"),
        TrainSettings {
            lora_r: 32,
            lora_alpha: 64.0,
            lora_dropout: 0.05,
            target_modules: modules(ALL_PROJECTIONS),
            use_rslora: true,
            lr: 1e-4,
            weight_decay: 0.01,
            warmup_steps: 50,
            epochs: 3,
            batch_size: 4,
            grad_accum: 4,
            max_seq_len: 1024,
            checkpoint_every: 200,
            ..base
        }
    );
}

#[test]
fn presets_fit_their_purpose() {
    let find = |name: &str| {
        builtin()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap()
            .settings
    };
    let basic = find("basic-fine-tune");
    let coding = find("coding-assistant");
    assert_eq!(coding.max_seq_len, 2048);
    assert_eq!(coding.target_modules.len(), TARGET_MODULES.len());
    assert!(coding.lora_dropout < basic.lora_dropout);
    let chat = find("chatbot-personality");
    assert!(chat.lora_r > basic.lora_r && chat.epochs > basic.epochs);
    assert!(!chat.train_on_inputs);
    let qa = find("qa-optimized");
    assert!(qa.max_seq_len < basic.max_seq_len && qa.epochs > basic.epochs);
    let domain = find("domain-expert");
    assert_eq!(domain.target_modules.len(), TARGET_MODULES.len());
    assert!((16..=32).contains(&domain.lora_r) && domain.lr < basic.lr);
    let multi = find("multilingual");
    assert!(multi.lora_r > find("advanced-fine-tune").lora_r);
    assert!(multi.max_seq_len > basic.max_seq_len);
    assert_eq!(find("efficient-fine-tune").lora_r, 4);
}
