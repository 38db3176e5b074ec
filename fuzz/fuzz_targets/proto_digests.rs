#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proto::digests::fuzzing::decode(data));
