//! Fuzz target `pidbox`: see `celeriac_fuzz_harness::pidbox`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celeriac_fuzz_harness::pidbox(data));
