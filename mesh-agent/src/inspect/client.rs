//! A small HTTP/1.1 client for the agent's admin port: plain text on the
//! node's loopback, one request per connection, bodies with a length.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use serde_json::Value;

use super::Error;

/// How long the agent may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Admin {
    host: String,
    url: String,
}

impl Admin {
    pub fn parse(url: &str) -> Result<Self, Error> {
        let host = url
            .strip_prefix("http://")
            .map(|h| h.trim_end_matches('/'))
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .ok_or_else(|| Error::BadAdmin(url.to_owned()))?;
        Ok(Self {
            host: host.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    pub fn text(&self, path: &str) -> Result<String, Error> {
        self.request("GET", path)
    }

    pub fn post(&self, path: &str) -> Result<String, Error> {
        self.request("POST", path)
    }

    pub fn json(&self, path: &str) -> Result<Value, Error> {
        let body = self.text(path)?;
        serde_json::from_str(&body).map_err(|e| Error::NotJson {
            url: format!("{}{path}", self.url),
            reason: e.to_string(),
        })
    }

    fn request(&self, method: &str, path: &str) -> Result<String, Error> {
        let url = format!("{}{path}", self.url);
        let fail = |reason: String| Error::Unreachable {
            url: url.clone(),
            reason,
        };
        let mut s = TcpStream::connect(&self.host).map_err(|e| fail(e.to_string()))?;
        s.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| fail(e.to_string()))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            self.host
        )
        .map_err(|e| fail(e.to_string()))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail("a truncated answer".into()))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| fail(format!("not HTTP: {head:?}")))?;
        if status != 200 {
            return Err(Error::Status {
                url,
                status,
                body: body.trim().to_owned(),
            });
        }
        Ok(body.to_owned())
    }
}

/// Escapes what the admin port's query parsing decodes (`,` and `=`).
pub fn query_escape(s: &str) -> String {
    s.replace(',', "%2C").replace('=', "%3D")
}
