//! Fuzz target: docker-proxy's command line (NUL-separated arguments).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth::fuzzing::docker_proxy_args(data));
