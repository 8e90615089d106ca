//! Fuzz target `message`: see `celeriac_fuzz_harness::message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celeriac_fuzz_harness::message(data));
