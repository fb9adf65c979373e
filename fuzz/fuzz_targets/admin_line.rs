//! Fuzz target: the admin socket's line protocol and the runtime API's mapping drafts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::admin_line(data));
