//! Fuzz target `envelope`: see `celeriac_fuzz_harness::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| celeriac_fuzz_harness::envelope(data));
