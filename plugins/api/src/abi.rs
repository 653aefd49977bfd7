//! The C ABI between lorad and a plugin library: one entry symbol returning a static descriptor.
//!
//! Invariants every future ABI version keeps: the entry symbol returns a pointer to a struct whose first
//! field is `abi_version: u32` and whose second is `name: *const c_char`, so a host can read both (and
//! report a mismatch by name) before it knows the rest of the layout.
use std::ffi::c_char;

/// The ABI version this crate implements and this lorad accepts.
pub const ABI_VERSION: u32 = 1;

/// The entry symbol, NUL-terminated for `dlsym`/`libloading`. Its signature is [`EntryFn`].
pub const ENTRY_SYMBOL: &[u8] = b"lorad_plugin_v1\0";

/// Signature of the entry symbol: returns a pointer to a descriptor that lives as long as the library
/// (which lorad never unloads), or null if the plugin failed to initialise.
pub type EntryFn = extern "C" fn() -> *const LoradPluginV1;

/// The `call` function of a plugin: `method` is UTF-8 (not NUL-terminated), `req` a MessagePack request.
/// Writes a buffer owned by the plugin to `*out` and returns 0 (then `out` holds the MessagePack
/// response) or nonzero (then `out` holds a MessagePack [`ErrorReply`](crate::ErrorReply)). The caller
/// must hand `*out` back to the same plugin's `free_buf` exactly once, even when it is empty (null `ptr`),
/// so `free_buf` must accept an empty buffer. `call` may be called from several threads at once (a
/// training worker reads records from its dataloader threads), so it must be thread-safe.
pub type CallFn = unsafe extern "C" fn(
    method: *const u8,
    method_len: usize,
    req: *const u8,
    req_len: usize,
    out: *mut Buf,
) -> i32;

/// Releases a buffer that the same plugin's `call` produced.
pub type FreeBufFn = unsafe extern "C" fn(buf: Buf);

/// Status returned by `call` on success.
pub const STATUS_OK: i32 = 0;
/// Status returned by `call` when `out` holds an error reply.
pub const STATUS_ERROR: i32 = 1;

/// Bit flags for [`LoradPluginV1::kinds`]: what a plugin provides.
pub mod kinds {
    /// Training templates (`templates.list`).
    pub const TEMPLATES: u32 = 1;
    /// Exporters (`export.run`).
    pub const EXPORT: u32 = 2;
    /// Data loaders (`dataloader.open`, `dataloader.read`).
    pub const DATALOADER: u32 = 4;
    /// Every kind this ABI version defines; other bits are ignored by this lorad.
    pub const ALL: u32 = TEMPLATES | EXPORT | DATALOADER;
}

/// The descriptor a plugin's entry symbol points to (ABI version 1).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LoradPluginV1 {
    /// Must equal [`ABI_VERSION`]; the host checks it before using any other field but `name`.
    pub abi_version: u32,
    /// The plugin's name: NUL-terminated UTF-8, static for the library's lifetime.
    pub name: *const c_char,
    /// What the plugin provides: an OR of [`kinds`] flags.
    pub kinds: u32,
    /// The single call entry; see [`CallFn`].
    pub call: CallFn,
    /// Frees a buffer returned through `call`; see [`FreeBufFn`].
    pub free_buf: FreeBufFn,
}

/// A byte buffer allocated by the plugin (a `Vec<u8>` taken apart) and freed only by its `free_buf`,
/// so each side uses its own allocator.
#[repr(C)]
#[derive(Debug)]
pub struct Buf {
    /// Start of the bytes; null for an empty buffer that owns nothing.
    pub ptr: *mut u8,
    /// Number of initialised bytes.
    pub len: usize,
    /// Allocated capacity, needed to rebuild the `Vec` when freeing.
    pub cap: usize,
}

impl Buf {
    /// An empty buffer that owns nothing (what a host passes in as `out`).
    pub const fn empty() -> Self {
        Buf {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        }
    }

    /// Takes a vector apart into a buffer; [`Buf::into_vec`] in the same library puts it back together.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        Buf {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
        }
    }

    /// Rebuilds the vector a [`Buf::from_vec`] produced; `None` for a null buffer.
    ///
    /// # Safety
    /// The buffer must come from `Buf::from_vec` in the same library (same allocator), unmodified, and
    /// must not be used again.
    pub unsafe fn into_vec(self) -> Option<Vec<u8>> {
        if self.ptr.is_null() {
            return None;
        }
        // SAFETY: by the contract above these are the parts of a live Vec<u8> from this allocator.
        Some(unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) })
    }
}
