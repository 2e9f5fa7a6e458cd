//! `healthcheck [URL]`: exits 0 when `GET URL` answers 2xx within 3 s, else 1.
//! The container image's `HEALTHCHECK` for the api (the runtime image has no
//! shell or curl). The default URL is `http://127.0.0.1:8080/health`.
//! Plain HTTP/1.0 over a TCP socket: no TLS, no redirects, no proxies.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:8080/health";
const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    hosts::telemetry::init("info");
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    match probe(&url) {
        Ok(status) => {
            tracing::debug!(%url, status, "healthy");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(%url, "unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends `GET` and returns the status code when it is 2xx.
fn probe(url: &str) -> Result<u16, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let socket = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&socket, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("socket: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(|e| format!("read: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    // "HTTP/1.1 200 OK"
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(format!("status {status}"))
    }
}
