//! Fuzz target: the TOML configuration file: parsing, validation, a reload onto itself.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::config(data));
