//! The first bytes of a captured connection, as the agent sniffs them: is
//! it HTTP, and the SNI of a TLS ClientHello.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::proxy::sniff::is_http(data);
    if let Some(sni) = mesh_agent::proxy::sniff::parse_sni(data) {
        assert!(!sni.is_empty() && sni.len() <= data.len());
    }
});
