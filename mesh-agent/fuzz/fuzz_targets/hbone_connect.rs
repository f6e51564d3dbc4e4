//! An HBONE CONNECT request's method and target, as a peer sends them
//! (`METHOD TARGET`): only `CONNECT ip:port` is ever accepted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (method, target) = match data.iter().position(|b| *b == b' ') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let (Ok(method), Ok(uri)) = (
        http::Method::from_bytes(method),
        http::Uri::try_from(target),
    ) else {
        return;
    };
    if let Ok(dst) = mesh_agent::proxy::hbone::connect_target(&method, &uri) {
        assert_eq!(method, http::Method::CONNECT);
        let authority = uri.authority().expect("accepted with an authority");
        assert_eq!(
            authority.as_str().parse::<std::net::SocketAddr>().ok(),
            Some(dst)
        );
    }
});
