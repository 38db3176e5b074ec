#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_plugin_aws::fuzzing::changed_blocks(data));
