//! The HTTP/1.1 clients: counting answers by server and flag, bursts,
//! fixed-rate latency, watching for a change, one-shot requests.

use super::*;

/// `n` GETs of `url` on one keep-alive connection (a new one if the
/// server closes it); prints how many answers each server gave
/// (`hello from NAME`, or `HTTP <status>` for other statuses) and the
/// response flags of replies the agent made itself.
pub(super) fn http_count(url: &str, n: usize, headers: &[&str]) -> Result<()> {
    let (hostport, path) = split_url(url)?;
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("bad host:port in {url}"))?;
    let mut method = "GET";
    let mut body = "";
    let mut extra = String::new();
    for h in headers {
        if let Some(m) = h.strip_prefix("--method=") {
            method = m;
        } else if let Some(b) = h.strip_prefix("--body=") {
            body = b;
        } else {
            extra.push_str(&format!("{h}\r\n"));
        }
    }
    // A Host among the headers replaces the URL's.
    let host = if extra.to_ascii_lowercase().contains("host:") {
        String::new()
    } else {
        format!("Host: {hostport}\r\n")
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\n{host}{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = std::time::Instant::now();
    let mut last = json!(null);
    let mut answers = std::collections::BTreeMap::<String, u64>::new();
    let mut flags = std::collections::BTreeMap::<String, u64>::new();
    let (mut conn, mut connections) = (None, 0u64);
    for _ in 0..n {
        if conn.is_none() {
            let s = TcpStream::connect_timeout(&addr, TIMEOUT)
                .with_context(|| format!("connect {addr}"))?;
            s.set_read_timeout(Some(TIMEOUT))?;
            conn = Some((BufReader::new(s.try_clone()?), s));
            connections += 1;
        }
        let (r, w) = conn.as_mut().expect("connected");
        w.write_all(request.as_bytes())?;
        let resp = read_response(r)?;
        let answer = if resp.status == 200 {
            resp.body.split(':').next().unwrap_or_default().to_string()
        } else {
            format!("HTTP {}", resp.status)
        };
        *answers.entry(answer).or_default() += 1;
        last = json!({"status": resp.status, "headers": resp.headers, "body": resp.body});
        if let Some(f) = resp.flags {
            *flags.entry(f).or_default() += 1;
        }
        if resp.close {
            conn = None;
        }
    }
    println!(
        "{}",
        json!({"event": "counts", "answers": answers, "flags": flags, "connections": connections,
               "last": last, "elapsed_ms": started.elapsed().as_millis() as u64})
    );
    Ok(())
}

/// GETs of `url` on a keep-alive connection, one every 10 ms, until
/// `until`; a new connection only when the server asks to close. Counts
/// what failed: an error, or a status other than 200 — nothing is retried.
pub(super) fn http_load(url: &str, until: &Until) -> Result<()> {
    let (hostport, path) = split_url(url)?;
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("bad host:port in {url}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\n\r\n");
    let (mut ok, mut failed, mut connections, mut first_error) = (0u64, 0u64, 0u64, None);
    let mut conn: Option<(BufReader<TcpStream>, TcpStream)> = None;
    while !until.reached() {
        let round = (|| -> Result<bool> {
            if conn.is_none() {
                let s = TcpStream::connect_timeout(&addr, TIMEOUT)
                    .with_context(|| format!("connect {addr}"))?;
                s.set_read_timeout(Some(TIMEOUT))?;
                conn = Some((BufReader::new(s.try_clone()?), s));
                connections += 1;
            }
            let (r, w) = conn.as_mut().expect("connected");
            w.write_all(request.as_bytes())?;
            let resp = read_response(r)?;
            if resp.status != 200 {
                bail!("HTTP {}: {}", resp.status, resp.body.trim());
            }
            Ok(resp.close)
        })();
        match round {
            Ok(close) => {
                ok += 1;
                if ok == 1 {
                    println!("{}", json!({"event": "answered"}));
                    std::io::stdout().flush()?;
                }
                if close {
                    conn = None;
                }
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("{e:#}"));
                conn = None;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "{}",
        json!({"event": "done", "ok": ok, "failed": failed, "connections": connections,
               "first_error": first_error})
    );
    Ok(())
}

/// `n` requests at the same time, each on its own connection (as many
/// clients would): what a connection pool limit does to them.
pub(super) fn http_burst(url: &str, n: usize, headers: &[&str]) -> Result<()> {
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (url, headers): (String, Vec<String>) =
                (url.to_owned(), headers.iter().map(|h| h.to_string()).collect());
            std::thread::spawn(move || -> Result<(u16, Option<String>, String)> {
                let h: Vec<&str> = headers.iter().map(String::as_str).collect();
                let (hostport, path) = split_url(&url)?;
                let mut method = "GET";
                let mut extra = String::new();
                for x in &h {
                    match x.strip_prefix("--method=") {
                        Some(m) => method = m,
                        None => extra.push_str(&format!("{x}\r\n")),
                    }
                }
                let s = TcpStream::connect_timeout(&hostport.parse()?, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                let mut w = s.try_clone()?;
                w.write_all(
                    format!("{method} {path} HTTP/1.1\r\nHost: {hostport}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )?;
                let resp = read_response(&mut BufReader::new(s))?;
                let answer = resp.body.split(':').next().unwrap_or_default().to_owned();
                Ok((resp.status, resp.flags, answer))
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    let mut flags = std::collections::BTreeMap::<String, u64>::new();
    for h in handles {
        let (status, flag, _) = h
            .join()
            .map_err(|_| anyhow::anyhow!("request thread panicked"))??;
        *statuses.entry(status.to_string()).or_default() += 1;
        if let Some(f) = flag {
            *flags.entry(f).or_default() += 1;
        }
    }
    println!(
        "{}",
        json!({"event": "burst", "statuses": statuses, "flags": flags})
    );
    Ok(())
}

/// Open-loop load: request `i` is due at `i / rate` s; its latency runs
/// from then (not from when it was sent), so a stall counts for every
/// request it delays. One keep-alive connection.
pub(super) fn fixed_rate(url: &str, rate: u64, secs: u64, headers: &[&str]) -> Result<()> {
    let (hostport, path) = split_url(url)?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let s = TcpStream::connect_timeout(&hostport.parse()?, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(Patient::new(s));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\n{extra}\r\n");
    let total = rate * secs;
    let start = std::time::Instant::now();
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0u64;
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        w.write_all(request.as_bytes())?;
        match read_response(&mut r) {
            Ok(resp) if resp.status == 200 => latencies.push(due.elapsed()),
            _ => errors += 1,
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{}",
        json!({"event": "latency", "requests": latencies.len(), "errors": errors,
               "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99)})
    );
    Ok(())
}

/// Header lines up to the blank one, names lowercased (the last of a
/// repeated header wins).
pub(super) fn read_headers(
    r: &mut impl BufRead,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut headers = serde_json::Map::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            return Ok(headers);
        }
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().into());
    }
}

pub(super) struct ParsedResponse {
    status: u16,
    body: String,
    close: bool,
    flags: Option<String>,
    headers: serde_json::Map<String, serde_json::Value>,
}

/// One HTTP/1.1 response: Content-Length or chunked body.
pub(super) fn read_response(r: &mut impl BufRead) -> Result<ParsedResponse> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed before a response");
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let headers = read_headers(r)?;
    let text = |k: &str| headers.get(k).and_then(|v| v.as_str());
    let length = text("content-length")
        .map(str::parse::<usize>)
        .transpose()
        .context("bad Content-Length")?;
    let chunked = text("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut close = text("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let flags = text("x-mesh-response-flags").map(String::from);
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
        close = true;
    }
    Ok(ParsedResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
        flags,
        headers,
    })
}

/// Polls `url` (a new connection each time) and prints
/// `{"event":"answer","body":…,"unix_ns":…}` whenever the answer differs
/// from the previous one: when a change reached the data plane, to within
/// a millisecond or two. Only the part of an `http NAME` server's body
/// before the first `:` counts ("hello from NAME"); the rest names the
/// connection's addresses, which differ every time.
pub(super) fn watch_get(url: &str, until: &Until) -> Result<()> {
    println!("{}", json!({"event": "started"}));
    std::io::stdout().flush()?;
    let mut last = None;
    let (mut requests, mut failures) = (0u64, 0u64);
    while !until.reached() {
        requests += 1;
        let answer = match fetch("GET", url) {
            Ok((200, body)) => body.split(':').next().unwrap_or_default().to_string(),
            Ok((status, _)) => format!("HTTP {status}"),
            Err(e) => format!("error: {e:#}"),
        };
        if answer.starts_with("HTTP ") || answer.starts_with("error: ") {
            failures += 1;
        }
        if last.as_ref() != Some(&answer) {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            println!(
                "{}",
                json!({"event": "answer", "body": answer, "unix_ns": now.as_nanos() as u64})
            );
            std::io::stdout().flush()?;
            last = Some(answer);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!(
        "{}",
        json!({"event": "done", "requests": requests, "failures": failures})
    );
    Ok(())
}

pub(super) fn request(method: &str, url: &str) -> Result<()> {
    let (status, body) = fetch(method, url)?;
    print!("{body}");
    if !(200..300).contains(&status) {
        bail!("HTTP {status}");
    }
    Ok(())
}

/// One HTTP/1.1 request on a new connection: the status and the body.
pub(super) fn fetch(method: &str, url: &str) -> Result<(u16, String)> {
    let (hostport, path) = split_url(url)?;
    // `SocketAddr` parses both `10.0.0.1:80` and `[fd00::1]:80`.
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("bad host:port in {url}"))?;
    let mut s =
        TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("malformed response")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((status, body.to_string()))
}
