//! A test plugin built for a future ABI: its descriptor says version 99. lorad must reject it by name
//! ("plugin badabi has ABI version 99; this lorad supports 1") without calling anything in it.
//!
//! Written by hand against the C ABI (no `export_plugin!`, which always declares the current version).
use lorad_plugin::{Buf, LoradPluginV1, STATUS_ERROR};

unsafe extern "C" fn call(
    _method: *const u8,
    _method_len: usize,
    _req: *const u8,
    _req_len: usize,
    _out: *mut Buf,
) -> i32 {
    // A host that ignored the version would get here; crash loudly so a test would notice.
    std::process::abort()
}

unsafe extern "C" fn free_buf(_buf: Buf) {}

struct Descriptor(LoradPluginV1);
// SAFETY: immutable static data.
unsafe impl Sync for Descriptor {}

static DESCRIPTOR: Descriptor = Descriptor(LoradPluginV1 {
    abi_version: 99,
    name: c"badabi".as_ptr(),
    kinds: lorad_plugin::kinds::TEMPLATES,
    call,
    free_buf,
});

/// The entry point lorad looks up.
#[unsafe(no_mangle)]
pub extern "C" fn lorad_plugin_v1() -> *const LoradPluginV1 {
    let _ = STATUS_ERROR;
    &DESCRIPTOR.0
}
