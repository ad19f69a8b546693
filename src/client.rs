//! The HTTP/1.1 client for the daemon's Unix socket, used by `renv submit` and friends.
//!
//! The HTTP itself is hyper's (`hyper::client::conn::http1`, the client half of what the
//! daemon serves with), so framing — `Content-Length`, chunked bodies such as the streamed
//! logs of `renv logs --follow`, HEAD answers without a body, keep-alive — is the same code
//! on both ends rather than a second, hand-written parser that has to agree with it.
//!
//! The CLI is synchronous, so the client is too. Each thread has one current-thread tokio
//! runtime for its connections, made on first use: a connection's task is spawned on its
//! thread's runtime and makes progress whenever the caller blocks on it (sending a
//! request, or [`Read`]ing a response body). Threads share nothing, so threads that each
//! follow a stream (stdout and stderr of a job) never wait on each other; a connection
//! holds its runtime by `Rc`, so it cannot leave its thread (where nothing would drive
//! it). Reusing the runtime matters: making one (epoll, eventfd, timer) costs more than a
//! request to the daemon. Dropping a [`Response`] or [`Session`] closes its connection at
//! once. Not for use from async code: it blocks, and a runtime cannot start inside another.
//!
//! A request body is read from the caller's [`Read`] in chunks and handed to hyper over a
//! small channel (`UploadBody`), so a package upload is never in memory whole. hyper
//! wants a body it can own (`'static`) while the caller's reader is only borrowed; the
//! channel bridges the two, with the reading done on the caller's thread.
//!
//! The daemon may answer before it has read the whole body (413 for a declared length over
//! its limit) and hang up. The socket wrapper (`Socket`) then swallows further writes and
//! tells the uploader to stop reading, so the answer already on the socket is read and
//! returned rather than lost to a broken pipe.
//!
//! Dependencies: hyper's `client` feature (which brings `want` and `try-lock` along) and
//! hyper-util's `TokioIo`. No `http-body-util`: the one `Body` call needed (`poll_frame`)
//! is made directly through `hyper::body`.

use std::io::{self, IoSlice, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

/// How much of a request body is read from the caller's `Read` at a time.
const UPLOAD_CHUNK: usize = 64 << 10;

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

/// A request body: its content type, its length, and where to read it from.
pub type RequestBody<'a> = (&'a str, u64, &'a mut dyn Read);

#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request on a connection of its own (`Connection: close`); the body, if
    /// any, is copied from the reader (exactly its stated length).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<RequestBody<'_>>,
    ) -> Result<Response, ClientError> {
        let mut conn = self.connect()?;
        let (status, body, unsent) = conn.exchange(method, path, body, true)?;
        Ok(Response {
            status,
            body,
            chunk: Bytes::new(),
            unsent,
            conn,
        })
    }

    /// A keep-alive connection for several requests in a row.
    pub fn session(&self) -> Result<Session, ClientError> {
        Ok(Session {
            conn: Some(self.connect()?),
        })
    }

    /// A JSON request; a non-2xx answer becomes [`ClientError::Api`].
    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        with_json_body(body, |body| self.send(method, path, body)?.into_json())
    }

    fn connect(&self) -> Result<Conn, ClientError> {
        let runtime = thread_runtime()?;
        let hung_up = Arc::new(AtomicBool::new(false));
        let sender = runtime.block_on(async {
            let stream = UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
            let socket = Socket {
                stream,
                hung_up: Arc::clone(&hung_up),
            };
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
                .await
                .map_err(hyper_error)?;
            // The connection's own errors reach the request or body in flight.
            Ok::<_, ClientError>((sender, tokio::spawn(connection)))
        })?;
        let (sender, task) = sender;
        Ok(Conn {
            runtime,
            sender,
            hung_up,
            task,
        })
    }
}

/// Calls `send` with `body` serialized as a JSON request body.
fn with_json_body<T>(body: Option<&Value>, send: impl FnOnce(Option<RequestBody<'_>>) -> T) -> T {
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
    /// `None` once a request failed or left the connection unusable.
    conn: Option<Conn>,
}

impl Session {
    pub fn json(&mut self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| ClientError::Protocol("session closed".into()))?;
        let (status, body, unsent) = with_json_body(body, |body| conn.exchange(method, path, body, false))?;
        let mut response = Response {
            status,
            body,
            chunk: Bytes::new(),
            unsent,
            conn,
        };
        let mut bytes = Vec::new();
        response.read_to_end(&mut bytes)?;
        // A request whose body was cut short by an early answer leaves nothing to reuse.
        if response.unsent.is_none() {
            self.conn = Some(response.conn);
        }
        Response::to_json(status, &bytes)
    }
}

thread_local! {
    /// This thread's runtime for its connections (see the module doc).
    static RUNTIME: std::cell::RefCell<Option<Rc<Runtime>>> = const { std::cell::RefCell::new(None) };
}

fn thread_runtime() -> io::Result<Rc<Runtime>> {
    RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some(runtime) = cell.as_ref() {
            return Ok(Rc::clone(runtime));
        }
        let runtime = Rc::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?,
        );
        *cell = Some(Rc::clone(&runtime));
        Ok(runtime)
    })
}

/// One connection: the runtime its task runs on, and the handle requests are sent with.
struct Conn {
    runtime: Rc<Runtime>,
    sender: SendRequest<UploadBody>,
    /// Set by [`Socket`] when the daemon hung up on a write.
    hung_up: Arc<AtomicBool>,
    /// The connection itself, driven by the runtime.
    task: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Cancelled and driven to the end here, so the socket closes now, not whenever
        // this thread next uses its runtime.
        self.task.abort();
        let task = &mut self.task;
        let _ = self.runtime.block_on(task);
    }
}

impl Conn {
    /// Sends one request, streaming its body, and waits for the answer's head. Also returns
    /// the body's sender if the answer came before the whole body was sent: kept open, so
    /// that hyper does not fail the connection (and the answer's body) for a short body.
    fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<RequestBody<'_>>,
        close: bool,
    ) -> Result<(u16, Incoming, Option<mpsc::Sender<Bytes>>), ClientError> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "renv");
        if close {
            request = request.header(header::CONNECTION, "close");
        }
        let (upload_body, upload) = match body {
            None => (UploadBody { rx: None, left: 0 }, None),
            Some((content_type, len, reader)) => {
                request = request
                    .header(header::CONTENT_TYPE, content_type)
                    .header(header::CONTENT_LENGTH, len);
                let (tx, rx) = mpsc::channel(1);
                (
                    UploadBody {
                        rx: Some(rx),
                        left: len,
                    },
                    Some((tx, len, reader)),
                )
            }
        };
        let request = request
            .body(upload_body)
            .map_err(|e| ClientError::Protocol(format!("cannot send {method} {path}: {e}")))?;
        let Conn {
            runtime,
            sender,
            hung_up,
            ..
        } = self;
        runtime.block_on(async move {
            sender.ready().await.map_err(hyper_error)?;
            let mut answer = std::pin::pin!(sender.send_request(request));
            let mut unsent = None;
            if let Some((tx, len, reader)) = upload {
                let mut left = len;
                while left > 0 && !hung_up.load(Ordering::Relaxed) {
                    let mut chunk = vec![0u8; left.min(UPLOAD_CHUNK as u64) as usize];
                    let n = match reader.read(&mut chunk) {
                        Ok(0) => {
                            return Err(ClientError::Io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("the request body ended {left} bytes short of its length {len}"),
                            )));
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e.into()),
                    };
                    chunk.truncate(n);
                    tokio::select! {
                        biased;
                        early = &mut answer => {
                            let response = early.map_err(hyper_error)?;
                            let status = response.status().as_u16();
                            return Ok((status, response.into_body(), Some(tx)));
                        }
                        sent = tx.send(Bytes::from(chunk)) => {
                            if sent.is_err() {
                                // hyper dropped the body: the answer says why.
                                break;
                            }
                        }
                    }
                    left -= n as u64;
                }
                if left > 0 {
                    unsent = Some(tx);
                }
            }
            let response = answer.await.map_err(hyper_error)?;
            Ok((response.status().as_u16(), response.into_body(), unsent))
        })
    }
}

/// An answer from the daemon: its status, and its body to [`Read`] as it arrives.
pub struct Response {
    pub status: u16,
    body: Incoming,
    /// What is left of the body frame last received.
    chunk: Bytes,
    /// The request body's sender, when the answer came before all of it was sent.
    unsent: Option<mpsc::Sender<Bytes>>,
    conn: Conn,
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
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.chunk.is_empty() {
            let Response { body, conn, .. } = self;
            let frame = conn
                .runtime
                .block_on(std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)));
            match frame {
                None => return Ok(0),
                Some(Err(e)) => {
                    return Err(match hyper_error(e) {
                        ClientError::Io(e) => e,
                        other => io::Error::other(other.to_string()),
                    });
                }
                // Trailers, if any, are of no interest.
                Some(Ok(frame)) => self.chunk = frame.into_data().unwrap_or_default(),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// hyper's error with its causes (its own message names only the step that failed); one
/// that comes from the socket stays an I/O error of the same kind.
fn hyper_error(e: hyper::Error) -> ClientError {
    let mut message = e.to_string();
    let mut kind = None;
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            kind.get_or_insert(io.kind());
        }
        source = cause.source();
    }
    match kind {
        Some(kind) => ClientError::Io(io::Error::new(kind, message)),
        None => ClientError::Protocol(message),
    }
}

/// A request body fed by [`Conn::exchange`] from the caller's reader, chunk by chunk.
struct UploadBody {
    rx: Option<mpsc::Receiver<Bytes>>,
    left: u64,
}

impl Body for UploadBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let Some(rx) = this.rx.as_mut().filter(|_| this.left > 0) else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(match ready!(rx.poll_recv(cx)) {
            Some(chunk) => {
                this.left = this.left.saturating_sub(chunk.len() as u64);
                Ok(Frame::data(chunk))
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the request body ended early",
            )),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// The connection's socket. Once the daemon has hung up (a write failed with a broken pipe
/// or a reset), writes are swallowed and `hung_up` is set, so that hyper goes on to read
/// the answer the daemon sent before hanging up instead of failing on the write.
struct Socket {
    stream: UnixStream,
    hung_up: Arc<AtomicBool>,
}

impl Socket {
    fn wrote(&self, result: io::Result<usize>, len: usize) -> io::Result<usize> {
        match result {
            Err(e) if is_hang_up(&e) => {
                self.hung_up.store(true, Ordering::Relaxed);
                Ok(len)
            }
            other => other,
        }
    }

    fn has_hung_up(&self) -> bool {
        self.hung_up.load(Ordering::Relaxed)
    }
}

fn is_hang_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.has_hung_up() {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = ready!(Pin::new(&mut this.stream).poll_write(cx, buf));
        Poll::Ready(this.wrote(result, buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.has_hung_up() {
            return Poll::Ready(Ok(len));
        }
        let result = ready!(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs));
        Poll::Ready(this.wrote(result, len))
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.has_hung_up() {
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(&mut this.stream).poll_shutdown(cx)) {
            Err(e) if is_hang_up(&e) || e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}
