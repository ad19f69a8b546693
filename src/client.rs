//! A small HTTP/1.1 client for the daemon's Unix socket, used by `renv submit` and
//! friends. One request per connection (`Connection: close`); bodies are read by
//! `Content-Length`, chunked encoding (streamed logs) or to EOF.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the renv daemon at {socket}: {source}; is `renv daemon` running there? (--socket / RENV_SOCKET)", socket = .socket.display())]
    Connect { socket: PathBuf, source: std::io::Error },
    /// The daemon's own error, as it phrased it.
    #[error("{}{message} (HTTP {status})", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Api {
        status: u16,
        kind: String,
        field: Option<String>,
        message: String,
    },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// A request the daemon rejected as bad input (4xx) is the user's to fix.
    pub fn is_user_error(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if (400..500).contains(status))
    }
}

#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
}

pub struct Response {
    pub status: u16,
    reader: BufReader<UnixStream>,
    chunked: bool,
    remaining: Option<u64>,
    chunk_left: u64,
    done: bool,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends a request; the body, if any, is copied from `body` (`len` bytes).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, u64, &mut dyn Read)>,
    ) -> Result<Response, ClientError> {
        let stream = self.connect()?;
        exchange(BufReader::new(stream), method, path, body, true)
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })
    }

    /// A keep-alive connection for several requests in a row.
    pub fn session(&self) -> Result<Session, ClientError> {
        Ok(Session {
            reader: Some(BufReader::new(self.connect()?)),
        })
    }

    /// A JSON request; a non-2xx answer becomes [`ClientError::Api`].
    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        with_json_body(body, |body| self.send(method, path, body)?.into_json())
    }
}

/// Calls `send` with `body` serialized as a JSON request body.
fn with_json_body<T>(body: Option<&Value>, send: impl FnOnce(Option<(&str, u64, &mut dyn Read)>) -> T) -> T {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let mut cursor = bytes.as_deref().map(std::io::Cursor::new);
    match cursor.as_mut() {
        Some(c) => {
            let len = c.get_ref().len() as u64;
            send(Some(("application/json", len, c as &mut dyn Read)))
        }
        None => send(None),
    }
}

/// Several requests over one connection (HTTP/1.1 keep-alive).
pub struct Session {
    reader: Option<BufReader<UnixStream>>,
}

impl Session {
    pub fn json(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let reader = self
            .reader
            .take()
            .ok_or_else(|| ClientError::Protocol("session closed".into()))?;
        let mut response = with_json_body(body, |body| exchange(reader, method, path, body, false))?;
        let mut bytes = Vec::new();
        response.read_to_end(&mut bytes)?;
        let status = response.status;
        self.reader = Some(response.reader);
        Response::to_json(status, &bytes)
    }
}

/// Writes one request on `reader`'s stream and reads the response head.
fn exchange(
    mut reader: BufReader<UnixStream>,
    method: &str,
    path: &str,
    body: Option<(&str, u64, &mut dyn Read)>,
    close: bool,
) -> Result<Response, ClientError> {
    let stream = reader.get_mut();
    let connection = if close { "close" } else { "keep-alive" };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: renv\r\nConnection: {connection}\r\n");
    match &body {
        Some((content_type, len, _)) => head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {len}\r\n\r\n"
        )),
        None => head.push_str("Content-Length: 0\r\n\r\n"),
    }
    stream.write_all(head.as_bytes())?;
    if let Some((_, _, body)) = body {
        match std::io::copy(body, stream) {
            // The daemon answered early (a body over its limit) and closed: read why.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            other => {
                other?;
            }
        }
    }
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {line:?}")))?;
    let (mut chunked, mut remaining) = (false, None);
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => remaining = value.parse().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
    }
    let done = method == "HEAD";
    Ok(Response {
        status,
        reader,
        chunked,
        remaining,
        chunk_left: 0,
        done,
    })
}

impl Response {
    pub fn into_json(mut self) -> Result<Value, ClientError> {
        let mut bytes = Vec::new();
        self.read_to_end(&mut bytes)?;
        Response::to_json(self.status, &bytes)
    }

    fn to_json(status: u16, bytes: &[u8]) -> Result<Value, ClientError> {
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(bytes)
                .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(bytes))))?
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let error = &value["error"];
        Err(ClientError::Api {
            status,
            kind: error["kind"].as_str().unwrap_or("unknown").to_string(),
            field: error["field"].as_str().map(str::to_string),
            message: error["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string),
        })
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.chunked {
            if self.chunk_left == 0 {
                let mut line = String::new();
                self.reader.read_line(&mut line)?;
                if line.trim().is_empty() {
                    line.clear();
                    self.reader.read_line(&mut line)?;
                }
                let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // The blank line that ends the (empty) trailer section.
                    line.clear();
                    self.reader.read_line(&mut line)?;
                    self.done = true;
                    return Ok(0);
                }
                self.chunk_left = size;
            }
            let want = buf.len().min(self.chunk_left as usize);
            let n = self.reader.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.chunk_left -= n as u64;
            return Ok(n);
        }
        match self.remaining {
            Some(0) => {
                self.done = true;
                Ok(0)
            }
            Some(left) => {
                let want = buf.len().min(left as usize);
                let n = self.reader.read(&mut buf[..want])?;
                self.remaining = Some(left - n as u64);
                if n == 0 {
                    self.done = true;
                }
                Ok(n)
            }
            None => self.reader.read(buf),
        }
    }
}
