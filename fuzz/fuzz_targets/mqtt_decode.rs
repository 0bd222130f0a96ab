//! libFuzzer entry for `vendgate::fuzzing::mqtt_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vendgate::fuzzing::mqtt_decode(data));
