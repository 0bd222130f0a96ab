//! libFuzzer entry for `vendgate::fuzzing::Harness::device_payload` (one gateway per process).
#![no_main]

use std::sync::OnceLock;

static HARNESS: OnceLock<vendgate::fuzzing::Harness> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    HARNESS
        .get_or_init(vendgate::fuzzing::Harness::new)
        .device_payload(data)
});
