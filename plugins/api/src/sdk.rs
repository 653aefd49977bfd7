//! The author-facing side: the [`Plugin`] trait and the machinery behind [`export_plugin!`](crate::export_plugin).
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::abi::{kinds, Buf, LoradPluginV1, ABI_VERSION, STATUS_ERROR, STATUS_OK};
use crate::messages::{self, methods};
use crate::{
    DataFormatDef, DataloaderFormatsRequest, DataloaderFormatsResponse, DataloaderOpenRequest,
    DataloaderOpenResponse, DataloaderReadRequest, DataloaderReadResponse, ExportFormatDef,
    ExportFormatsRequest, ExportFormatsResponse, ExportRequest, ExportResponse, PluginError,
    TemplateDef, TemplatesListRequest, TemplatesListResponse,
};

/// A lorad plugin. Implement `name`, `kinds` and the typed methods of the kinds you declare; the
/// default [`Plugin::call`] decodes requests, dispatches by method name and encodes replies. Override
/// `call` only to handle raw MessagePack yourself.
///
/// Methods may be called from several threads at once, hence `Send + Sync`.
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's name, as `loractl status` lists it. Must not contain NUL.
    fn name(&self) -> &'static str;

    /// What the plugin provides: an OR of [`kinds`] flags.
    fn kinds(&self) -> u32;

    /// `templates.list`: the templates this plugin offers.
    fn templates(&self) -> Result<Vec<TemplateDef>, PluginError> {
        Err(unsupported(methods::TEMPLATES_LIST))
    }

    /// `export.formats`: the export formats this plugin writes.
    fn export_formats(&self) -> Result<Vec<ExportFormatDef>, PluginError> {
        Err(unsupported(methods::EXPORT_FORMATS))
    }

    /// `export.run`: write an export of a job's adapter.
    fn export(&self, request: ExportRequest) -> Result<ExportResponse, PluginError> {
        let _ = request;
        Err(unsupported(methods::EXPORT_RUN))
    }

    /// `dataloader.formats`: the dataset formats (file extensions) this plugin reads.
    fn dataloader_formats(&self) -> Result<Vec<DataFormatDef>, PluginError> {
        Err(unsupported(methods::DATALOADER_FORMATS))
    }

    /// `dataloader.open`: open a dataset and count its records.
    fn dataloader_open(
        &self,
        request: DataloaderOpenRequest,
    ) -> Result<DataloaderOpenResponse, PluginError> {
        let _ = request;
        Err(unsupported(methods::DATALOADER_OPEN))
    }

    /// `dataloader.read`: read a range of records of an opened dataset.
    fn dataloader_read(
        &self,
        request: DataloaderReadRequest,
    ) -> Result<DataloaderReadResponse, PluginError> {
        let _ = request;
        Err(unsupported(methods::DATALOADER_READ))
    }

    /// Handles one call: `request` is MessagePack, the result is the MessagePack reply.
    fn call(&self, method: &str, request: &[u8]) -> Result<Vec<u8>, PluginError> {
        dispatch(self, method, request)
    }
}

fn unsupported(method: &str) -> PluginError {
    PluginError::UnknownMethod(method.to_owned())
}

/// The default routing of [`Plugin::call`]: a method whose kind the plugin does not declare is an
/// unknown method, whatever the typed methods would do.
pub fn dispatch<P: Plugin + ?Sized>(
    plugin: &P,
    method: &str,
    request: &[u8],
) -> Result<Vec<u8>, PluginError> {
    let declared = plugin.kinds();
    let has = |kind: u32| declared & kind != 0;
    match method {
        methods::TEMPLATES_LIST if has(kinds::TEMPLATES) => {
            let _: TemplatesListRequest = messages::decode(request)?;
            messages::encode(&TemplatesListResponse {
                templates: plugin.templates()?,
            })
        }
        methods::EXPORT_FORMATS if has(kinds::EXPORT) => {
            let _: ExportFormatsRequest = messages::decode(request)?;
            messages::encode(&ExportFormatsResponse {
                formats: plugin.export_formats()?,
            })
        }
        methods::EXPORT_RUN if has(kinds::EXPORT) => {
            messages::encode(&plugin.export(messages::decode(request)?)?)
        }
        methods::DATALOADER_FORMATS if has(kinds::DATALOADER) => {
            let _: DataloaderFormatsRequest = messages::decode(request)?;
            messages::encode(&DataloaderFormatsResponse {
                formats: plugin.dataloader_formats()?,
            })
        }
        methods::DATALOADER_OPEN if has(kinds::DATALOADER) => {
            messages::encode(&plugin.dataloader_open(messages::decode(request)?)?)
        }
        methods::DATALOADER_READ if has(kinds::DATALOADER) => {
            messages::encode(&plugin.dataloader_read(messages::decode(request)?)?)
        }
        other => Err(unsupported(other)),
    }
}

/// Support for [`export_plugin!`](crate::export_plugin); not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// The descriptor plus the name it points into, kept together in the plugin's static.
    pub struct Exported {
        descriptor: LoradPluginV1,
        _name: CString,
    }

    // SAFETY: the raw pointer refers to `_name`, owned by the same value and never mutated; the
    // function pointers are plain code addresses.
    unsafe impl Send for Exported {}
    // SAFETY: as above; nothing in `Exported` is mutated after construction.
    unsafe impl Sync for Exported {}

    impl Exported {
        /// Builds the descriptor for `plugin` with the given `call` shim.
        pub fn new<P: Plugin>(plugin: &P, call: crate::abi::CallFn) -> Self {
            // A name with a NUL is cut there rather than failing the load.
            let name = plugin.name();
            let name = name.split('\0').next().unwrap_or_default();
            let name = CString::new(name).unwrap_or_default();
            Exported {
                descriptor: LoradPluginV1 {
                    abi_version: ABI_VERSION,
                    name: name.as_ptr(),
                    kinds: plugin.kinds(),
                    call,
                    free_buf,
                },
                _name: name,
            }
        }

        /// The descriptor to hand to the host.
        pub fn descriptor(&self) -> *const LoradPluginV1 {
            &self.descriptor
        }
    }

    /// Runs `init` (the plugin's constructor and descriptor) without letting a panic unwind into the
    /// host: a panic yields null, which the host reports as a failed load.
    pub fn entry(init: impl FnOnce() -> *const LoradPluginV1) -> *const LoradPluginV1 {
        catch_unwind(AssertUnwindSafe(init)).unwrap_or(std::ptr::null())
    }

    /// The body of the generated `call`.
    ///
    /// # Safety
    /// `method`/`req` must be valid for their lengths (or the length zero); `out` must be writable.
    pub unsafe fn call_shim<P: Plugin>(
        plugin: Option<&P>,
        method: *const u8,
        method_len: usize,
        req: *const u8,
        req_len: usize,
        out: *mut Buf,
    ) -> i32 {
        if out.is_null() {
            return STATUS_ERROR;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            let plugin = plugin.ok_or_else(|| {
                PluginError::Internal("plugin called before its entry point".into())
            })?;
            // SAFETY: the caller guarantees the pointers are valid for these lengths.
            let method = unsafe { bytes(method, method_len) };
            let request = unsafe { bytes(req, req_len) };
            let method = std::str::from_utf8(method)
                .map_err(|_| PluginError::BadRequest("method name is not UTF-8".into()))?;
            plugin.call(method, request)
        }));
        let (status, reply) = match result {
            Ok(Ok(reply)) => (STATUS_OK, reply),
            Ok(Err(error)) => (STATUS_ERROR, error_bytes(&error)),
            Err(payload) => {
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_owned());
                // Dropping a payload can itself panic; leak it rather than risk an unwind here.
                std::mem::forget(payload);
                let error = PluginError::Internal(format!("plugin panicked: {what}"));
                (STATUS_ERROR, error_bytes(&error))
            }
        };
        // SAFETY: checked non-null above; the caller guarantees it is writable.
        unsafe { out.write(Buf::from_vec(reply)) };
        status
    }

    fn error_bytes(error: &PluginError) -> Vec<u8> {
        // Encoding two strings cannot fail; an empty reply is the host's "malformed error" case anyway.
        rmp_serde::to_vec_named(&error.to_reply()).unwrap_or_default()
    }

    unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
        if ptr.is_null() || len == 0 {
            &[]
        } else {
            // SAFETY: non-null and, by the caller's contract, valid for `len` bytes.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
    }

    /// The `free_buf` of every plugin built with this SDK (compiled into the plugin, so it frees with
    /// the plugin's allocator).
    ///
    /// # Safety
    /// `buf` must come from this library's `call` and be freed once.
    pub unsafe extern "C" fn free_buf(buf: Buf) {
        // SAFETY: by the contract above, `buf` is a Vec taken apart by `Buf::from_vec` here.
        drop(unsafe { buf.into_vec() });
    }
}

/// Exports a [`Plugin`] from a cdylib: defines the `lorad_plugin_v1` entry symbol returning a static
/// descriptor whose `call` catches panics (turning them into an `internal` error reply) and whose
/// `free_buf` frees with the plugin's allocator. The constructor runs once, on the first entry call.
///
/// Use it once per library, at module level: `export_plugin!(MyPlugin, MyPlugin::new());`
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty, $ctor:expr) => {
        /// lorad plugin entry point (generated by `lorad_plugin::export_plugin!`).
        #[unsafe(no_mangle)]
        pub extern "C" fn lorad_plugin_v1() -> *const $crate::LoradPluginV1 {
            static INSTANCE: ::std::sync::OnceLock<$ty> = ::std::sync::OnceLock::new();
            static EXPORTED: ::std::sync::OnceLock<$crate::__private::Exported> =
                ::std::sync::OnceLock::new();

            unsafe extern "C" fn call(
                method: *const u8,
                method_len: usize,
                req: *const u8,
                req_len: usize,
                out: *mut $crate::Buf,
            ) -> i32 {
                // SAFETY: forwarded unchanged; the host upholds the `call` contract.
                unsafe {
                    $crate::__private::call_shim::<$ty>(
                        INSTANCE.get(),
                        method,
                        method_len,
                        req,
                        req_len,
                        out,
                    )
                }
            }

            $crate::__private::entry(|| {
                let plugin: &$ty = INSTANCE.get_or_init(|| $ctor);
                EXPORTED
                    .get_or_init(|| $crate::__private::Exported::new(plugin, call))
                    .descriptor()
            })
        }
    };
}
