//! The application the namespaced tests and the demo run inside pods: a TCP
//! echo server, a tiny HTTP server, and clients that report what they saw
//! as one JSON line each, so tests can assert on addresses and payloads.
//!
//! ```text
//! mesh-testapp echo ADDR...            echo every connection; log accepts
//! mesh-testapp http NAME ADDR...       answer any HTTP request with NAME and addresses
//! mesh-testapp connect ADDR [PAYLOAD]  send PAYLOAD, half-close, read the echo
//! mesh-testapp churn ADDR COUNT        COUNT sequential echo round trips
//! mesh-testapp load ADDR UNTIL         new connections back to back (echo round trips) until UNTIL
//! mesh-testapp hold ADDR SECS          connect and keep the connection open
//! mesh-testapp listen ADDR             bind and listen, then wait (holds a port)
//! mesh-testapp sink ADDR               accept connections, greet each with one byte, keep them open, never read
//! mesh-testapp pingpong ADDR CHUNK N  N round trips of CHUNK bytes to an echo server, each echo read in full before the next
//! mesh-testapp flood ADDR BYTES SECS   write up to BYTES in 1 MiB blocking writes until one blocks SECS (stalled); report how far it got
//! mesh-testapp hold-many ADDR N UNTIL  open N connections to a sink (each greeted end to end), hold them until UNTIL, close them
//! mesh-testapp get URL                 HTTP GET (http://host:port/path), print the body
//! mesh-testapp post URL                HTTP POST with an empty body, print the body
//! mesh-testapp chatter ADDR UNTIL      one connection, a round trip every 100 ms until UNTIL
//! mesh-testapp http-load URL UNTIL   keep-alive GETs every 10 ms until UNTIL (a new connection when asked to close); count failures
//! mesh-testapp http-count URL N [NAME:VALUE | --method=M | --body=B]...   N keep-alive requests; count answers by server and status
//! mesh-testapp h2 NAME ADDR | h2-count URL N [NAME:VALUE]... | grpc-call URL N   (see h2.rs)
//! mesh-testapp tls-hello ADDR SNI      send a TLS ClientHello for SNI to an echo server, check it comes back
//! mesh-testapp stream ADDR BYTES      send BYTES of a position-keyed pattern to an echo server in writes of 1 B to 1 MiB, read the echo with pauses, check every byte
//! mesh-testapp raw ADDR BYTES [UNTIL]   send BYTES as they are, print what comes back until the peer closes (or UNTIL arrived)
//! mesh-testapp http-burst URL N [NAME:VALUE | --method=M]...   N requests at once, one connection each; count answers and flags
//! mesh-testapp fixed-rate URL RATE SECS [NAME:VALUE]...   GETs at RATE per second on one keep-alive connection; latency percentiles from the scheduled times
//! mesh-testapp watch-get URL UNTIL     GET URL every millisecond until UNTIL; print each change of server (`http NAME`) with its time
//! mesh-testapp ext-authz ADDR        an HTTP external authorizer: 200 when `x-ext-authz: allow`, 403 with a body and
//!                                      `x-ext-authz-check-result: denied` otherwise; paths with /slow wait 3 s first
//! mesh-testapp file ADDR PATH          answer every HTTP GET with PATH's contents as they are now (a JWKS server); log each request
//! mesh-testapp slowloris ADDR N MS     N connections each sending a request head one byte every MS ms, never ending it; print when the server closed them
//!
//! UNTIL is a number of seconds, or a path: run until that file exists.
//! mesh-testapp hbone-connect CERT KEY TARGET AUTHORITY PAYLOAD   (CERT/KEY "-" for none)
//! mesh-testapp hbone-serve CERT KEY ADDR
//! mesh-testapp fake-kube ADDR TOKEN=NODE...
//! ```

mod h2;
mod hbone;
mod http_client;
mod kube;
mod slow;

use http_client::{
    fixed_rate, http_burst, http_count, http_load, read_headers, request, watch_get,
};

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["echo", addrs @ ..] if !addrs.is_empty() => serve(addrs, None),
        ["http", name, addrs @ ..] if !addrs.is_empty() => serve(addrs, Some(name.to_string())),
        ["connect", addr] => connect(addr, "hello mesh"),
        ["connect", addr, payload] => connect(addr, payload),
        ["churn", addr, count] => churn(addr, count.parse()?),
        ["load", addr, until] => load(addr, &Until::parse(until)),
        ["hold", addr, secs] => hold(addr, secs.parse()?),
        ["sink", addr] => sink(addr),
        ["slowloris", addr, n, interval_ms] => {
            slow::slowloris(addr, n.parse()?, interval_ms.parse()?)
        }
        ["hold-many", addr, n, until] => hold_many(addr, n.parse()?, &Until::parse(until)),
        ["listen", addr] => {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            println!(
                "{}",
                json!({"event": "listening", "local": l.local_addr()?.to_string()})
            );
            std::thread::park();
            Ok(())
        }
        ["chatter", addr, until] => chatter(addr, &Until::parse(until)),
        ["watch-get", url, until] => watch_get(url, &Until::parse(until)),
        ["h2", name, addr] => tokio_main(h2::serve(name, addr)),
        ["h2-count", url, n, headers @ ..] => tokio_main(h2::count(url, n.parse()?, headers)),
        ["grpc-call", url, n] => tokio_main(h2::grpc_call(url, n.parse()?)),
        ["tls-hello", addr, sni] => hbone::tls_hello(addr, sni),
        ["stream", addr, bytes] => stream(addr, bytes.parse()?),
        ["pingpong", addr, chunk, n] => pingpong(addr, chunk.parse()?, n.parse()?),
        ["flood", addr, bytes, secs] => flood(addr, bytes.parse()?, secs.parse()?),
        ["raw", addr, bytes] => raw(addr, bytes, None),
        ["raw", addr, bytes, until] => raw(addr, bytes, Some(until)),
        ["http-load", url, until] => http_load(url, &Until::parse(until)),
        ["http-count", url, n, headers @ ..] => http_count(url, n.parse()?, headers),
        ["http-burst", url, n, headers @ ..] => http_burst(url, n.parse()?, headers),
        ["fixed-rate", url, rate, secs, headers @ ..] => {
            fixed_rate(url, rate.parse()?, secs.parse()?, headers)
        }
        ["hbone-connect", cert, key, target, authority, payload] => {
            tokio_main(hbone::connect(cert, key, target, authority, payload))
        }
        ["hbone-serve", cert, key, addr] => tokio_main(hbone::serve(cert, key, addr)),
        ["fake-kube", addr, table @ ..] => tokio_main(kube::serve(addr, table)),
        ["file", addr, path] => serve_file(addr, path),
        ["ext-authz", addr] => ext_authz(addr),
        ["collector", addr, dir] => collector(addr, dir),
        ["get", url] => request("GET", url),
        ["post", url] => request("POST", url),
        _ => bail!("usage: see the comment at the top of mesh-testapp.rs"),
    }
}

/// When a timed command stops.
enum Until {
    Deadline(std::time::Instant),
    File(std::path::PathBuf),
}

impl Until {
    fn parse(s: &str) -> Self {
        match s.parse::<u64>() {
            Ok(secs) => Self::Deadline(std::time::Instant::now() + Duration::from_secs(secs)),
            Err(_) => Self::File(s.into()),
        }
    }

    fn reached(&self) -> bool {
        match self {
            Self::Deadline(d) => std::time::Instant::now() >= *d,
            Self::File(f) => f.exists(),
        }
    }
}

/// `http://HOST:PORT/PATH` → (`HOST:PORT`, `/PATH`).
fn split_url(url: &str) -> Result<(&str, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    Ok(rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}"))))
}

fn tokio_main<F: Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// One long-lived connection doing a round trip every 100 ms: proves a
/// connection survives what happens meanwhile (certificate renewals).
fn chatter(addr: &str, until: &Until) -> Result<()> {
    let mut s = dial(addr)?;
    println!(
        "{}",
        json!({"event": "connected", "local": s.local_addr()?.to_string()})
    );
    std::io::stdout().flush()?;
    let mut rounds = 0u64;
    while !until.reached() {
        let msg = format!("round {rounds}\n");
        let mut buf = vec![0u8; msg.len()];
        let r = s
            .write_all(msg.as_bytes())
            .and_then(|_| s.read_exact(&mut buf));
        if let Err(e) = r {
            // Said on stdout too: a test may expect the connection to go.
            println!(
                "{}",
                json!({"event": "failed", "rounds": rounds, "error": e.to_string()})
            );
            std::io::stdout().flush()?;
            bail!("round {rounds}: {e}");
        }
        if buf != msg.as_bytes() {
            bail!("round {rounds}: echo mismatch");
        }
        rounds += 1;
        if rounds == 1 {
            println!("{}", json!({"event": "echoed"}));
            std::io::stdout().flush()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{}", json!({"event": "done", "rounds": rounds}));
    Ok(())
}

fn serve(addrs: &[&str], http_name: Option<String>) -> Result<()> {
    let mut handles = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
        println!(
            "{}",
            json!({"event": "listening", "local": l.local_addr()?.to_string()})
        );
        let name = http_name.clone();
        handles.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = match name {
                        Some(n) => http_reply(s, &n),
                        None => echo(s),
                    };
                });
            }
        }));
    }
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn ext_authz(addr: &str) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!(
        "{}",
        json!({"event": "listening", "local": l.local_addr()?.to_string()})
    );
    std::io::stdout().flush()?;
    for s in l.incoming().flatten() {
        std::thread::spawn(move || -> Result<()> {
            let mut s = s;
            let mut r = BufReader::new(s.try_clone()?);
            let mut line = String::new();
            r.read_line(&mut line)?;
            let headers = read_headers(&mut r)?;
            println!(
                "{}",
                json!({"event": "check", "request": line.trim_end(), "headers": headers})
            );
            std::io::stdout().flush()?;
            if line.contains("/slow") {
                std::thread::sleep(Duration::from_secs(3));
            }
            let allow = headers.get("x-ext-authz").and_then(|v| v.as_str()) == Some("allow");
            let reply = if allow {
                "HTTP/1.1 200 OK\r\nx-ext-authz-check-result: allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
            } else {
                let body = "denied by ext_authz";
                format!(
                    "HTTP/1.1 403 Forbidden\r\nx-ext-authz-check-result: denied\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            s.write_all(reply.as_bytes())?;
            Ok(())
        });
    }
    Ok(())
}

/// A trace collector stand-in: every POST's body is kept in `dir` as
/// `<n>.<path with / as _>` and answered 200; one line per POST.
fn collector(addr: &str, dir: &str) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!(
        "{}",
        json!({"event": "listening", "local": l.local_addr()?.to_string()})
    );
    std::io::stdout().flush()?;
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for s in l.incoming().flatten() {
        let (n, dir) = (n.clone(), dir.to_owned());
        std::thread::spawn(move || -> Result<()> {
            let mut s = s;
            let mut r = BufReader::new(s.try_clone()?);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                let headers = http_client::read_headers(&mut r)?;
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.as_str())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                r.read_exact(&mut body)?;
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let file = format!("{dir}/{i:04}.{}", path.replace('/', "_"));
                std::fs::write(format!("{file}.tmp"), &body)?;
                std::fs::rename(format!("{file}.tmp"), &file)?;
                println!(
                    "{}",
                    json!({"event": "posted", "path": path, "bytes": len,
                           "contentType": headers.get("content-type")})
                );
                std::io::stdout().flush()?;
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
            }
        });
    }
    Ok(())
}

fn serve_file(addr: &str, path: &str) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!(
        "{}",
        json!({"event": "listening", "local": l.local_addr()?.to_string()})
    );
    std::io::stdout().flush()?;
    for mut s in l.incoming().flatten() {
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        if r.read_line(&mut line).is_err() || read_headers(&mut r).is_err() {
            continue;
        }
        let line = line.trim_end().to_owned();
        let body = std::fs::read(path).unwrap_or_default();
        println!("{}", json!({"event": "file", "request": line}));
        std::io::stdout().flush()?;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s
            .write_all(head.as_bytes())
            .and_then(|_| s.write_all(&body));
    }
    Ok(())
}

fn echo(s: TcpStream) -> Result<()> {
    let (local, peer) = (s.local_addr()?, s.peer_addr()?);
    println!(
        "{}",
        json!({"event": "accepted", "local": local.to_string(), "peer": peer.to_string()})
    );
    // Reads retry an early EAGAIN, counted: with the fast path on, this
    // socket is in a sockmap (see `Patient`).
    let mut s = Patient::new(s);
    let mut buf = [0u8; 16384];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        s.s.write_all(&buf[..n])?;
    }
    s.s.shutdown(Shutdown::Write)?;
    println!(
        "{}",
        json!({"event": "closed", "peer": peer.to_string(), "bytes": total, "spurious_eagain": s.spurious})
    );
    Ok(())
}

/// `MESH_TESTAPP_QUIET=1`: the `http` and `h2` servers log no request
/// (benchmarks).
static QUIET: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("MESH_TESTAPP_QUIET").is_some());

/// Requests this `http` server answered (for `x-fail-every`).
static SERVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Answers HTTP/1.1 requests on `s` (keep-alive, until the client closes
/// or asks to) with `hello from NAME: …`, and logs each with its headers.
/// Tests steer it with request headers: `x-delay-ms: N` answers after N
/// ms, `x-status: CODE` answers with that status, `x-fail-every: K`
/// answers 503 to every K-th request this server sees, `x-fail-on: NAME,…`
/// answers 503 when this server is one of those named.
fn http_reply(s: TcpStream, name: &str) -> Result<()> {
    let (local, peer) = (s.local_addr()?, s.peer_addr()?);
    let mut r = BufReader::new(s.try_clone()?);
    let mut s = s;
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let headers = read_headers(&mut r)?;
        let text = |k: &str| headers.get(k).and_then(|v| v.as_str());
        let length: usize = text("content-length")
            .map_or(Ok(0), str::parse)
            .context("bad Content-Length")?;
        let close = text("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut body_in = Vec::new();
        (&mut r).take(length as u64).read_to_end(&mut body_in)?;
        if let Some(proto) = headers.get("upgrade").and_then(|v| v.as_str()) {
            // WebSocket and friends: agree, then echo raw bytes.
            s.write_all(
                format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {proto}\r\n\r\n")
                    .as_bytes(),
            )?;
            println!(
                "{}",
                json!({"event": "upgraded", "request": request_line.trim(), "protocol": proto})
            );
            std::io::stdout().flush()?;
            let mut buf = [0u8; 16384];
            // Bytes that came with the request head are in the reader.
            let pending = r.buffer().to_vec();
            s.write_all(&pending)?;
            r.consume(pending.len());
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        }
        let seen = SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let header = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let Some(ms) = header("x-delay-ms") {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let fail_here = headers
            .get("x-fail-on")
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.split(',').any(|n| n.trim() == name));
        let status = match (header("x-status"), header("x-fail-every")) {
            _ if fail_here => 503,
            (Some(code), _) => code,
            (None, Some(k)) if k > 0 && seen.is_multiple_of(k) => 503,
            _ => 200,
        };
        let body = format!("hello from {name}: you reached {local}, you are {peer}\n");
        // One write: `write!` on a socket would send each piece on its own
        // and meet Nagle and delayed ACKs (40 ms a response).
        let response = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        // Logged before the answer: once a client has its answer, the
        // request is in the log (tests use a request as a barrier).
        if !*QUIET {
            println!(
                "{}",
                json!({"event": "http", "request": request_line.trim(), "headers": headers,
                       "body": String::from_utf8_lossy(&body_in), "status": status,
                       "local": local.to_string(), "peer": peer.to_string()})
            );
            std::io::stdout().flush()?;
        }
        s.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

fn dial(addr: &str) -> Result<TcpStream> {
    let a: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr}"))?;
    let s = TcpStream::connect_timeout(&a, TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok(s)
}

fn connect(addr: &str, payload: &str) -> Result<()> {
    let mut s = dial(addr)?;
    // What getpeername says: the original destination if capture restores it.
    let (local, peer) = (s.local_addr()?, s.peer_addr()?);
    s.write_all(payload.as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut got = String::new();
    s.read_to_string(&mut got)?;
    println!(
        "{}",
        json!({"local": local.to_string(), "peer": peer.to_string(), "sent": payload, "received": got})
    );
    if got != payload {
        bail!("echo mismatch: sent {payload:?}, received {got:?}");
    }
    Ok(())
}

/// Writes `bytes` and prints everything the peer answers before closing
/// (or going quiet for 5 s): how a proxy answers malformed requests.
fn raw(addr: &str, bytes: &str, until: Option<&str>) -> Result<()> {
    let mut s = dial(addr)?;
    s.write_all(bytes.as_bytes())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if until.is_some_and(|u| String::from_utf8_lossy(&got).contains(u)) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e.into()),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let status = text.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok());
    println!("{}", json!({"status": status, "received": text}));
    Ok(())
}

/// The pattern byte at stream offset `p`: a function of the position, so a
/// lost, repeated or reordered chunk shows at once.
fn pattern(p: u64) -> u8 {
    (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (p >> 20) as u8
}

fn fill(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(offset + i as u64);
    }
}

/// Streams `total` bytes to an echo server and checks the echo byte for byte.
/// Writes cycle through sizes from 1 B to 1 MiB (partial writes, large
/// messages); the reader pauses every 64 MiB so the whole path backs up
/// (backpressure); the writer half-closes and the echo must end with EOF.
fn stream(addr: &str, total: u64) -> Result<()> {
    const SIZES: [usize; 6] = [1, 7, 1000, 16 << 10, 64 << 10, 1 << 20];
    const PAUSE_EVERY: u64 = 64 << 20;
    let s = dial(addr)?;
    let mut w = Patient::new(s.try_clone()?);
    let started = std::time::Instant::now();
    let writer = std::thread::spawn(move || -> Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let (mut sent, mut i) = (0u64, 0);
        while sent < total {
            let n = SIZES[i % SIZES.len()].min((total - sent) as usize);
            fill(&mut buf[..n], sent);
            w.write_all(&buf[..n])?;
            sent += n as u64;
            i += 1;
        }
        w.s.shutdown(Shutdown::Write)?;
        Ok(w.spurious)
    });
    let mut r = Patient::new(s);
    let (mut got, mut pauses) = (0u64, 0u32);
    let mut buf = vec![0u8; 256 << 10];
    let mut want = vec![0u8; 256 << 10];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        fill(&mut want[..n], got);
        if buf[..n] != want[..n] {
            let at = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b);
            bail!("echo differs at byte {}", got + at.unwrap_or(0) as u64);
        }
        if (got + n as u64) / PAUSE_EVERY > got / PAUSE_EVERY {
            std::thread::sleep(Duration::from_millis(20));
            pauses += 1;
        }
        got += n as u64;
    }
    let write_eagain = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"sent": total, "received": got, "intact": got == total, "pauses": pauses, "spurious_eagain": r.spurious,
               "write_eagain": write_eagain, "secs": secs, "mbytes_per_sec": got as f64 / secs / 1e6})
    );
    Ok(())
}

/// Round trips of `chunk` bytes, each echo checked and read in full before
/// the next write: the client is never more than one chunk ahead of the
/// server. Reads retry an early EAGAIN (see `Patient`), counted.
fn pingpong(addr: &str, chunk: usize, n: u64) -> Result<()> {
    let s = dial(addr)?;
    let (mut w, mut r) = (Patient::new(s.try_clone()?), Patient::new(s));
    let (mut buf, mut want) = (vec![0u8; chunk], vec![0u8; chunk]);
    for i in 0..n {
        fill(&mut want, i * chunk as u64);
        w.write_all(&want)?;
        r.read_exact(&mut buf)?;
        if buf != want {
            bail!("round {i}: echo differs");
        }
    }
    println!(
        "{}",
        json!({"rounds": n, "bytes": n * chunk as u64, "spurious_eagain": r.spurious, "write_eagain": w.spurious})
    );
    Ok(())
}

/// Writes to a peer that does not read, as a plain blocking client: the
/// writes must stop (block) once the buffers on the way are full. Any error
/// but the timeout that says "blocked for `secs`" is the finding.
fn flood(addr: &str, total: u64, secs: u64) -> Result<()> {
    let mut s = dial(addr)?;
    s.set_write_timeout(Some(Duration::from_secs(secs)))?;
    let buf = vec![7u8; 1 << 20];
    let mut written = 0u64;
    let (stalled, error) = loop {
        if written >= total {
            break (false, None);
        }
        match s.write(&buf) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break (true, None),
            Err(e) => break (false, Some(e.to_string())),
        }
    };
    println!(
        "{}",
        json!({"written": written, "stalled": stalled, "error": error})
    );
    Ok(())
}

/// One echo round trip on a new connection.
fn round_trip(addr: &str) -> Result<()> {
    let mut s = dial(addr)?;
    s.write_all(b"ping")?;
    s.shutdown(Shutdown::Write)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    if got != b"ping" {
        bail!("echo mismatch: {got:?}");
    }
    Ok(())
}

/// New connections back to back until `until`: every one must succeed.
fn load(addr: &str, until: &Until) -> Result<()> {
    println!("{}", json!({"event": "started"}));
    std::io::stdout().flush()?;
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    while !until.reached() {
        match round_trip(addr) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    println!(
        "{}",
        json!({"event": "done", "ok": ok, "failed": failed, "first_error": first_error})
    );
    if failed > 0 {
        bail!("{failed} of {} connections failed", ok + failed);
    }
    Ok(())
}

fn churn(addr: &str, count: u32) -> Result<()> {
    let mut failed = 0u32;
    let mut first_error = None;
    for _ in 0..count {
        if let Err(e) = round_trip(addr) {
            failed += 1;
            first_error.get_or_insert(e.to_string());
        }
    }
    println!(
        "{}",
        json!({"ok": count - failed, "failed": failed, "first_error": first_error})
    );
    if failed > 0 {
        bail!("{failed} of {count} connections failed");
    }
    Ok(())
}

fn hold(addr: &str, secs: u64) -> Result<()> {
    let mut s = dial(addr)?;
    s.write_all(b"held")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    println!(
        "{}",
        json!({"event": "holding", "local": s.local_addr()?.to_string(), "peer": s.peer_addr()?.to_string()})
    );
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}

/// Accepts and keeps every connection (greeting each with one byte so the
/// client knows the whole path is up); reports every 1,000.
fn sink(addr: &str) -> Result<()> {
    let l = TcpListener::bind(addr)?;
    println!(
        "{}",
        json!({"event": "listening", "local": l.local_addr()?.to_string()})
    );
    std::io::stdout().flush()?;
    let mut held = Vec::new();
    loop {
        let (mut s, _) = l.accept()?;
        s.write_all(b"k")?;
        held.push(s);
        if held.len() % 1000 == 0 {
            println!("{}", json!({"event": "accepted", "count": held.len()}));
            std::io::stdout().flush()?;
        }
    }
}

/// Opens `n` connections to a sink one after another, each confirmed by the
/// sink's greeting, holds them until `until`, then closes them all.
fn hold_many(addr: &str, n: usize, until: &Until) -> Result<()> {
    println!("{}", json!({"event": "opening", "count": n}));
    std::io::stdout().flush()?;
    let started = std::time::Instant::now();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = dial(addr)?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        held.push(s);
    }
    println!(
        "{}",
        json!({"event": "open", "count": held.len(), "secs": started.elapsed().as_secs_f64()})
    );
    std::io::stdout().flush()?;
    while !until.reached() {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    println!("{}", json!({"event": "closed"}));
    Ok(())
}

/// A blocking socket that reads (or writes) again when a call returns EAGAIN
/// early: Linux does that on sockets in a sockmap (the mesh's fast path) when
/// a wakeup finds nothing to read, and on a send racing the socket's removal
/// from the map (the fast path switched off mid-stream). A real timeout
/// still fails.
struct Patient {
    s: TcpStream,
    /// Calls that returned EAGAIN early.
    spurious: u64,
}

impl Patient {
    fn new(s: TcpStream) -> Self {
        Self { s, spurious: 0 }
    }

    /// Runs `op` again while it returns EAGAIN early (before TIMEOUT).
    fn retry<T>(
        &mut self,
        mut op: impl FnMut(&mut TcpStream) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let started = std::time::Instant::now();
        loop {
            match op(&mut self.s) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && started.elapsed() < TIMEOUT =>
                {
                    self.spurious += 1
                }
                r => return r,
            }
        }
    }
}

impl Read for Patient {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.retry(|s| s.read(buf))
    }
}

impl Write for Patient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.retry(|s| s.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}
