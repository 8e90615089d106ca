//! Fuzz target `signature`: see `celeriac_fuzz_harness::signature`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celeriac_fuzz_harness::signature(data));
