#![no_main]
// The physical adapter's change document (natively; the same code runs inside the component).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ferry_plugin_physical::parse_checksum_list(data);
});
