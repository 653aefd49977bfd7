//! # lorad-plugin
//!
//! The plugin ABI and SDK of lorad. A plugin is a `cdylib` exporting one symbol,
//! [`ENTRY_SYMBOL`] (`lorad_plugin_v1`), that returns a static [`LoradPluginV1`] descriptor: an ABI
//! version, a name, the [`kinds`] it provides, and a single `call(method, request) -> reply` entry
//! whose payloads are MessagePack (named maps), plus `free_buf` to release replies. Keeping the ABI to
//! one call with serialized payloads means new methods and fields do not change it.
//!
//! Authors implement [`Plugin`] and invoke [`export_plugin!`], which hides the FFI and catches every
//! panic (a panic becomes an `internal` error reply, never an unwind across the boundary). lorad never
//! unloads a plugin library, so descriptors and names are `'static`.
//!
//! Build a plugin crate with `crate-type = ["cdylib", "rlib"]` so it can also be tested in-process.
//!
//! The host side ([`check_abi`], [`call_plugin`], [`call_typed`]) lives here too, so lorad and tests
//! share one implementation of the contract.
//!
//! ## Example
//!
//! ```
//! use lorad_plugin::{export_plugin, kinds, methods, Plugin, PluginError, TemplateDef};
//!
//! struct MyTemplates;
//!
//! impl Plugin for MyTemplates {
//!     fn name(&self) -> &'static str { "my-templates" }
//!     fn kinds(&self) -> u32 { kinds::TEMPLATES }
//!     fn templates(&self) -> Result<Vec<TemplateDef>, PluginError> {
//!         Ok(vec![TemplateDef {
//!             name: "tiny".into(),
//!             description: "rank-4 adapter for smoke tests".into(),
//!             settings: lorad_schema::TrainSettings { lora_r: 4, ..Default::default() },
//!         }])
//!     }
//! }
//!
//! export_plugin!(MyTemplates, MyTemplates);
//!
//! // What lorad does after finding the symbol in the loaded library:
//! let desc = unsafe { lorad_plugin::check_abi(lorad_plugin_v1()) }.unwrap();
//! let reply: lorad_plugin::TemplatesListResponse = unsafe {
//!     lorad_plugin::call_typed(desc, methods::TEMPLATES_LIST, &lorad_plugin::TemplatesListRequest {})
//! }
//! .unwrap();
//! assert_eq!(reply.templates[0].settings.lora_r, 4);
//! ```
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod abi;
mod error;
mod exporter;
pub mod host;
pub mod messages;
mod sdk;
pub mod staging;

pub use abi::{
    kinds, Buf, CallFn, EntryFn, FreeBufFn, LoradPluginV1, ABI_VERSION, ENTRY_SYMBOL, STATUS_ERROR,
    STATUS_OK,
};
pub use error::{codes, ErrorReply, PluginError};
pub use exporter::{Exporter, OneFormat};
pub use host::{call_plugin, call_typed, check_abi, plugin_name, AbiError, PluginCallError};
pub use messages::{
    methods, DataFormatDef, DataloaderFormatsRequest, DataloaderFormatsResponse,
    DataloaderOpenRequest, DataloaderOpenResponse, DataloaderReadRequest, DataloaderReadResponse,
    ExportFormatDef, ExportFormatsRequest, ExportFormatsResponse, ExportRequest, ExportResponse,
    TemplateDef, TemplatesListRequest, TemplatesListResponse,
};
#[doc(hidden)]
pub use sdk::__private;
pub use sdk::{dispatch, Plugin};
/// The `serde_json` the SDK uses (dataloader records are `serde_json::Value`s), so plugins need not
/// pick a version of their own.
pub use serde_json;

#[cfg(test)]
mod tests;
