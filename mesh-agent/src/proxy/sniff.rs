//! Looking at a captured connection's first bytes without consuming them
//! (`MSG_PEEK`): is it HTTP (for ports that do not declare a protocol), and
//! which server name does a TLS ClientHello ask for (for `tls` routes).
//! The wait is bounded: a server-first protocol (the client says nothing
//! until the server greets it) falls back to plain TCP after the timeout.

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    net::TcpStream,
    time::Instant,
};

/// How long a client may stay silent before its connection is taken as
/// plain TCP (server-first protocols such as MySQL or SMTP).
pub const DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// The most bytes looked at (a ClientHello with many extensions fits).
const MAX_PEEK: usize = 16 * 1024;

/// Peeks until `enough` says the bytes so far decide, or the timeout.
async fn peek_until(
    stream: &TcpStream,
    timeout: Duration,
    enough: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_PEEK];
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return buf[..last].to_vec(),
        };
        last = n;
        if n == 0 || n == MAX_PEEK || enough(&buf[..n]) || Instant::now() >= deadline {
            return buf[..n].to_vec();
        }
        // More is on its way (a partial write): look again shortly.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Whether the bytes so far can still become an HTTP request start.
fn could_be_http(b: &[u8]) -> bool {
    METHODS
        .iter()
        .chain([&H2_PREFACE])
        .any(|m| m.starts_with(&b[..b.len().min(m.len())]))
}

/// Whether `b` starts like an HTTP/1.x request or the HTTP/2 preface.
pub fn is_http(b: &[u8]) -> bool {
    METHODS
        .iter()
        .chain([&H2_PREFACE])
        .any(|m| b.starts_with(m))
}

/// Whether the client's first bytes are an HTTP/1.x request or the
/// HTTP/2 preface.
pub async fn detect_http(stream: &TcpStream) -> bool {
    let b = peek_until(stream, DETECTION_TIMEOUT, |b| {
        is_http(b) || !could_be_http(b)
    })
    .await;
    is_http(&b)
}

/// Reads the client's first bytes from a stream that cannot be peeked
/// (an HBONE tunnel) until they show whether it speaks HTTP, or the
/// timeout; returns them, to be replayed ([`super::prefixed::Prefixed`]),
/// and the answer.
pub async fn read_http_start<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(Vec<u8>, bool)> {
    let deadline = Instant::now() + DETECTION_TIMEOUT;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 64];
    while !is_http(&buf) && could_be_http(&buf) && buf.len() < H2_PREFACE.len() + 8 {
        match tokio::time::timeout_at(deadline, r.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
    let http = is_http(&buf);
    Ok((buf, http))
}

/// The server name of the TLS ClientHello the client sends first, if it
/// does (waiting at most `DETECTION_TIMEOUT`).
pub async fn sni(stream: &TcpStream) -> Option<String> {
    let b = peek_until(stream, DETECTION_TIMEOUT, |b| {
        // A whole first record, or clearly not TLS.
        b.first() != Some(&0x16) || b.len() >= 5 && b.len() >= 5 + record_len(b)
    })
    .await;
    parse_sni(&b)
}

fn record_len(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[3], b[4]]))
}

/// The `server_name` extension of a ClientHello (RFC 8446 §4.1.2,
/// RFC 6066 §3), from the first TLS record.
pub fn parse_sni(b: &[u8]) -> Option<String> {
    // Record: type 22 (handshake), version, length.
    if b.len() < 5 || b[0] != 0x16 {
        return None;
    }
    let rec = b.get(5..5 + record_len(b))?;
    // Handshake: type 1 (ClientHello), 3-byte length.
    if rec.first() != Some(&1) {
        return None;
    }
    let mut p = Reader(rec.get(4..)?);
    p.skip(2 + 32)?; // version, random
    let sid = usize::from(p.u8()?);
    p.skip(sid)?;
    let suites = usize::from(p.u16()?);
    p.skip(suites)?;
    let comp = usize::from(p.u8()?);
    p.skip(comp)?;
    let ext_len = usize::from(p.u16()?);
    let mut exts = Reader(p.take(ext_len)?);
    while let (Some(kind), Some(len)) = (exts.u16(), exts.u16()) {
        let body = exts.take(usize::from(len))?;
        if kind != 0 {
            continue;
        }
        let mut names = Reader(body);
        let list = usize::from(names.u16()?);
        let mut list = Reader(names.take(list)?);
        while let Some(name_type) = list.u8() {
            let n = usize::from(list.u16()?);
            let name = list.take(n)?;
            if name_type == 0 {
                // A name no route can match is no name: a ClientHello
                // without one is routed as such.
                return host_name(name).then(|| String::from_utf8_lossy(name).to_ascii_lowercase());
            }
        }
    }
    None
}

/// RFC 6066's HostName: a DNS name, not empty, ASCII letters, digits,
/// `-` and `.` (and `_`, which some names carry).
fn host_name(n: &[u8]) -> bool {
    (1..=253).contains(&n.len())
        && n.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello asking for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0u8];
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name.as_bytes());
        let mut ext = vec![0, 0];
        ext.extend(((sni.len() + 2) as u16).to_be_bytes());
        ext.extend((sni.len() as u16).to_be_bytes());
        ext.extend(&sni);
        let mut hello = vec![3, 3];
        hello.extend([7u8; 32]);
        hello.push(0); // session id
        hello.extend([0, 2, 0x13, 0x01]); // one suite
        hello.extend([1, 0]); // null compression
        hello.extend((ext.len() as u16).to_be_bytes());
        hello.extend(&ext);
        let mut hs = vec![1];
        hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend(&hello);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(&hs);
        rec
    }

    #[test]
    fn reads_the_server_name_and_refuses_garbage() {
        assert_eq!(
            parse_sni(&client_hello("API.Example.com")).as_deref(),
            Some("api.example.com")
        );
        let hello = client_hello("x.example");
        assert_eq!(parse_sni(&hello[..hello.len() - 3]), None, "truncated");
        assert_eq!(parse_sni(b"GET / HTTP/1.1\r\n"), None);
    }

    /// Found by the `sniff` fuzz target: an empty name came back as
    /// `Some("")`, and a name with NULs or spaces as itself.
    #[test]
    fn a_server_name_that_is_not_a_host_name_is_none() {
        for bad in ["", "a\0b", "a b", "ex\u{e4}mple.com", &"a".repeat(254)] {
            assert_eq!(parse_sni(&client_hello(bad)), None, "{bad:?}");
        }
        assert_eq!(
            parse_sni(&client_hello("_grpc.x-1.example")).as_deref(),
            Some("_grpc.x-1.example")
        );
    }

    #[test]
    fn recognises_http_starts() {
        assert!(is_http(b"GET /x HTTP/1.1\r\n") && is_http(b"PRI * HTTP/2.0\r\n"));
        assert!(could_be_http(b"PO") && !could_be_http(b"\x16\x03\x01"));
        assert!(!is_http(b"SSH-2.0-OpenSSH"));
    }
}
