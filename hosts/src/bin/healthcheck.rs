//! `healthcheck [URL]`: exits 0 when `GET URL` answers 2xx within 3 s, else 1
//! (logging the status and the body, which for `/health/ready` names the
//! failed checks). The container image's `HEALTHCHECK` for the api, runner
//! and scheduler (the runtime image has no shell or curl): the api's
//! `http://127.0.0.1:8080/health/ready` (the default URL), the runner's and
//! scheduler's `/health/ready` on their monitoring listener.
//! Plain HTTP/1.0 over a TCP socket: no TLS, no redirects, no proxies.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:8080/health/ready";
const TIMEOUT: Duration = Duration::from_secs(3);

/// Exits 0 when `GET URL` answers 2xx within 3 s, else 1.
#[derive(clap::Parser)]
#[command(name = "healthcheck", version)]
struct Args {
    /// The health endpoint to probe.
    #[arg(default_value = DEFAULT_URL)]
    url: String,
}

fn main() -> ExitCode {
    let Args { url } = clap::Parser::parse();
    hosts::telemetry::init("info");
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
    // The whole (small) response: the status line, and the body for the
    // message when unhealthy.
    let mut response = Vec::new();
    stream
        .take(16 * 1024)
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let line = text.lines().next().unwrap_or_default();
    // "HTTP/1.1 200 OK"
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {line:?}"))?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
        Err(format!("status {status} {body}"))
    }
}
