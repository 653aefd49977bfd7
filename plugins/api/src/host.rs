//! The host side: checking a descriptor and calling a plugin safely. Used by lorad's plugin registry.
use std::borrow::Cow;
use std::ffi::CStr;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::abi::{Buf, LoradPluginV1, ABI_VERSION, STATUS_OK};
use crate::ErrorReply;

/// Why a plugin's descriptor was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AbiError {
    /// The entry symbol returned null (the plugin failed to initialise).
    #[error("plugin entry point returned no descriptor")]
    NullDescriptor,
    /// The plugin was built for another ABI version.
    #[error("plugin {name} has ABI version {found}; this lorad supports {supported}")]
    Version {
        /// The plugin's name.
        name: String,
        /// The version it declares.
        found: u32,
        /// [`ABI_VERSION`].
        supported: u32,
    },
}

/// Why a call into a plugin failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginCallError {
    /// The plugin answered with an error reply.
    #[error("plugin error ({code}): {message}")]
    Plugin {
        /// One of [`codes`](crate::codes), or a plugin's own.
        code: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin returned an error status with a reply that is not an [`ErrorReply`].
    #[error("plugin returned status {status} with a malformed error reply")]
    MalformedError {
        /// The status `call` returned.
        status: i32,
    },
    /// The request could not be encoded.
    #[error("cannot encode request: {0}")]
    Encode(String),
    /// The plugin's successful reply could not be decoded as the expected type.
    #[error("cannot decode plugin reply: {0}")]
    Decode(String),
}

/// The plugin's name from its descriptor (lossy UTF-8; `"<unnamed>"` for a null name).
///
/// # Safety
/// `desc.name` must be null or a NUL-terminated string valid for the library's lifetime.
pub unsafe fn plugin_name(desc: &LoradPluginV1) -> Cow<'_, str> {
    if desc.name.is_null() {
        return Cow::Borrowed("<unnamed>");
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(desc.name) }.to_string_lossy()
}

/// Checks the descriptor an entry symbol returned: non-null and of this ABI version. Returns the
/// descriptor on success. Only `abi_version` and `name` are read before the version is known.
///
/// # Safety
/// `desc` must be null or point to a descriptor that lives as long as the (never unloaded) library,
/// whose `name` field obeys [`plugin_name`]'s contract.
pub unsafe fn check_abi<'a>(desc: *const LoradPluginV1) -> Result<&'a LoradPluginV1, AbiError> {
    // SAFETY: by the caller's contract, null or valid for the library's lifetime.
    let desc = unsafe { desc.as_ref() }.ok_or(AbiError::NullDescriptor)?;
    if desc.abi_version != ABI_VERSION {
        return Err(AbiError::Version {
            // SAFETY: by the caller's contract.
            name: unsafe { plugin_name(desc) }.into_owned(),
            found: desc.abi_version,
            supported: ABI_VERSION,
        });
    }
    Ok(desc)
}

/// Calls `method` with a raw MessagePack `request`; returns the reply bytes, copied into the host's
/// memory after the plugin's buffer has been released with its own `free_buf`.
///
/// # Safety
/// `desc` must have passed [`check_abi`] and its library must still be loaded.
pub unsafe fn call_plugin(
    desc: &LoradPluginV1,
    method: &str,
    request: &[u8],
) -> Result<Vec<u8>, PluginCallError> {
    let mut out = Buf::empty();
    // SAFETY: pointers and lengths come from live slices; `out` is a valid, writable Buf.
    let status = unsafe {
        (desc.call)(
            method.as_ptr(),
            method.len(),
            request.as_ptr(),
            request.len(),
            &mut out,
        )
    };
    let reply = if out.ptr.is_null() || out.len == 0 {
        Vec::new()
    } else {
        // SAFETY: the plugin wrote a buffer valid for `len` bytes, alive until `free_buf`.
        unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec()
    };
    // SAFETY: `out` came from this plugin's `call` and is freed exactly once.
    unsafe { (desc.free_buf)(out) };
    if status == STATUS_OK {
        return Ok(reply);
    }
    match rmp_serde::from_slice::<ErrorReply>(&reply) {
        Ok(ErrorReply { code, message }) => Err(PluginCallError::Plugin { code, message }),
        Err(_) => Err(PluginCallError::MalformedError { status }),
    }
}

/// [`call_plugin`] with typed request and reply (MessagePack with named fields).
///
/// # Safety
/// As for [`call_plugin`].
pub unsafe fn call_typed<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
    desc: &LoradPluginV1,
    method: &str,
    request: &Req,
) -> Result<Resp, PluginCallError> {
    let request =
        rmp_serde::to_vec_named(request).map_err(|e| PluginCallError::Encode(e.to_string()))?;
    // SAFETY: forwarded contract.
    let reply = unsafe { call_plugin(desc, method, &request) }?;
    rmp_serde::from_slice(&reply).map_err(|e| PluginCallError::Decode(e.to_string()))
}
