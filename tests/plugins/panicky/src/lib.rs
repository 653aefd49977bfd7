//! A test plugin that panics: it offers a template, an export format and a dataset format, and its
//! `export.run` and `dataloader.read` panic. With `PANICKY_PANIC_IN_LIST=1` in the host's environment,
//! `templates.list` panics too. The SDK must turn every panic into an `internal` error reply, and lorad
//! must keep serving.
use lorad_plugin::{
    export_plugin, kinds, DataFormatDef, DataloaderOpenRequest, DataloaderOpenResponse,
    DataloaderReadRequest, DataloaderReadResponse, ExportFormatDef, ExportRequest, ExportResponse,
    Plugin, PluginError, TemplateDef,
};

struct Panicky;

impl Plugin for Panicky {
    fn name(&self) -> &'static str {
        "panicky"
    }

    fn kinds(&self) -> u32 {
        kinds::TEMPLATES | kinds::EXPORT | kinds::DATALOADER
    }

    fn templates(&self) -> Result<Vec<TemplateDef>, PluginError> {
        if std::env::var_os("PANICKY_PANIC_IN_LIST").is_some() {
            panic!("templates.list exploded");
        }
        Ok(vec![TemplateDef {
            name: "panicky-template".into(),
            description: "a template from a plugin that panics elsewhere".into(),
            settings: lorad_schema::TrainSettings::default(),
        }])
    }

    fn export_formats(&self) -> Result<Vec<ExportFormatDef>, PluginError> {
        Ok(vec![ExportFormatDef {
            name: "panicky".into(),
            description: "panics".into(),
        }])
    }

    fn export(&self, request: ExportRequest) -> Result<ExportResponse, PluginError> {
        panic!("export.run exploded writing {}", request.out);
    }

    fn dataloader_formats(&self) -> Result<Vec<DataFormatDef>, PluginError> {
        Ok(vec![DataFormatDef {
            name: "boom".into(),
            extensions: vec!["boom".into()],
            description: "panics when read".into(),
        }])
    }

    fn dataloader_open(
        &self,
        _request: DataloaderOpenRequest,
    ) -> Result<DataloaderOpenResponse, PluginError> {
        Ok(DataloaderOpenResponse { len: 8 })
    }

    fn dataloader_read(
        &self,
        request: DataloaderReadRequest,
    ) -> Result<DataloaderReadResponse, PluginError> {
        panic!("dataloader.read exploded at record {}", request.start);
    }
}

export_plugin!(Panicky, Panicky);
