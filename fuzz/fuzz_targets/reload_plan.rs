//! Fuzz target: reload plans between arbitrary sets of mappings.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::reload_plan(data));
