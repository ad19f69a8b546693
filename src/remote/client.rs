//! Reading and writing objects through `object_store`, behind a blocking API: the store
//! and the sources are synchronous (they run on the CLI's thread or the daemon's blocking
//! pool), so the requests run on one small runtime of their own and callers wait.
//!
//! Credentials and endpoints come from the standard chains of this process's environment
//! (`AWS_*`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, `GOOGLE_APPLICATION_CREDENTIALS`,
//! instance metadata), never from a request. Requests are retried with backoff by
//! `object_store`; a download whose body breaks off is started again (the object must
//! still be the one its `HEAD` described: `If-Match` on its ETag).

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, GetOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use tokio::io::AsyncWriteExt;

use super::uri::{RemoteUri, Scheme};

/// Timeouts and retries for every remote request.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    pub connect_timeout: Duration,
    /// A response (or its body) that sends nothing for this long fails (and is retried).
    pub idle_timeout: Duration,
    /// Attempts after the first, for a request and for a download that breaks off.
    pub retries: usize,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            retries: 3,
        }
    }
}

/// Bytes per second below which a download is abandoned (see [`RemoteClient::download`]).
const MIN_THROUGHPUT: u64 = 256 << 10;

/// What a `HEAD` says of an object: enough to know, next time, whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// Seconds since the epoch.
    pub last_modified: i64,
}

impl ObjectInfo {
    /// The object's identity as of this `HEAD`: its version, else its ETag, else (a
    /// server that sends neither) its modification time and size.
    pub fn revision(&self) -> String {
        match (&self.version, &self.etag) {
            (Some(version), _) => format!("version:{version}"),
            (None, Some(etag)) => format!("etag:{etag}"),
            (None, None) => format!("modified:{}:{}", self.last_modified, self.size),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{uri}: no such object")]
    NotFound { uri: String },
    #[error("{uri}: {size} bytes is over the limit of {limit} bytes")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("{uri} changed while it was being downloaded; nothing was kept, try again")]
    Changed { uri: String },
    #[error("{uri}: access denied ({message}); the daemon uses its own credentials")]
    Denied { uri: String, message: String },
    #[error("{uri}: {message}")]
    Failed { uri: String, message: String },
}

impl RemoteError {
    /// The request's fault (a missing or forbidden object), not the node's.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, RemoteError::Failed { .. })
    }

    fn of(uri: &RemoteUri, e: object_store::Error) -> RemoteError {
        let uri = uri.to_string();
        match e {
            object_store::Error::NotFound { .. } => RemoteError::NotFound { uri },
            object_store::Error::Precondition { .. } => RemoteError::Changed { uri },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => RemoteError::Denied {
                uri,
                message: source.to_string(),
            },
            other => RemoteError::Failed {
                uri,
                message: error_chain(&other),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = inner.source();
    }
    message
}

/// A client for every remote this process names, one `object_store` per bucket or host.
pub struct RemoteClient {
    options: RemoteOptions,
    stores: Mutex<HashMap<(Scheme, String), Arc<dyn ObjectStore>>>,
    /// What it moved, for the daemon's `/metrics`.
    pub stats: TransferStats,
}

/// Counters of completed transfers.
#[derive(Debug, Default)]
pub struct TransferStats {
    pub downloads: AtomicU64,
    pub download_bytes: AtomicU64,
    pub uploads: AtomicU64,
}

/// The runtime remote requests run on, made on first use; never dropped (dropping a
/// runtime from within the daemon's would panic).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("renv-remote")
            .enable_all()
            .build()
            .expect("the remote runtime starts")
    })
}

impl RemoteClient {
    pub fn new(options: RemoteOptions) -> RemoteClient {
        RemoteClient {
            options,
            stores: Mutex::new(HashMap::new()),
            stats: TransferStats::default(),
        }
    }

    pub fn options(&self) -> RemoteOptions {
        self.options
    }

    /// The object's size and revision.
    pub fn head(&self, uri: &RemoteUri) -> Result<ObjectInfo, RemoteError> {
        if uri.scheme() == Scheme::File {
            return shared_file::head(uri);
        }
        let (store, path) = self.store_for(uri)?;
        // Bounded as a whole, retries included: a server trickling its headers must not
        // hold the request (and a blocking thread) forever.
        let deadline = self.options.idle_timeout * (self.options.retries as u32 + 2);
        let meta = runtime()
            .block_on(async { tokio::time::timeout(deadline, store.head(&path)).await })
            .map_err(|_| RemoteError::Failed {
                uri: uri.to_string(),
                message: format!("no answer to HEAD within {} s", deadline.as_secs()),
            })?
            .map_err(|e| RemoteError::of(uri, e))?;
        Ok(ObjectInfo {
            size: meta.size,
            etag: meta.e_tag,
            version: meta.version,
            last_modified: meta.last_modified.timestamp(),
        })
    }

    /// Whether the object exists.
    pub fn exists(&self, uri: &RemoteUri) -> Result<bool, RemoteError> {
        match self.head(uri) {
            Ok(_) => Ok(true),
            Err(RemoteError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Downloads the object `info` describes into `file` (from its start), refusing more
    /// than `limit` bytes. A body that breaks off is fetched again from the start, up to
    /// the retry count; an object that changed since `info` is [`RemoteError::Changed`].
    /// Returns the bytes written.
    pub fn download(
        &self,
        uri: &RemoteUri,
        info: &ObjectInfo,
        file: &mut std::fs::File,
        limit: u64,
    ) -> Result<u64, RemoteError> {
        let too_large = |size| RemoteError::TooLarge {
            uri: uri.to_string(),
            size,
            limit,
        };
        if info.size > limit {
            return Err(too_large(info.size));
        }
        if uri.scheme() == Scheme::File {
            let written = shared_file::download(uri, info, file, limit)?;
            self.stats.downloads.fetch_add(1, Ordering::Relaxed);
            self.stats.download_bytes.fetch_add(written, Ordering::Relaxed);
            return Ok(written);
        }
        let (store, path) = self.store_for(uri)?;
        let io_error = |e: std::io::Error| RemoteError::Failed {
            uri: uri.to_string(),
            message: format!("writing the download: {e}"),
        };
        let mut attempt = 0;
        loop {
            file.set_len(0).map_err(io_error)?;
            file.rewind().map_err(io_error)?;
            let options = GetOptions {
                if_match: info.etag.clone(),
                version: info.version.clone(),
                ..GetOptions::default()
            };
            let transfer = async {
                let got = store.get_opts(&path, options).await?;
                // Without an ETag to send as If-Match, the object must still be the one
                // its HEAD described (a server's own time and size), or its alias would
                // name the wrong revision.
                let meta = &got.meta;
                if meta.size != info.size
                    || (info.etag.is_none() && meta.last_modified.timestamp() != info.last_modified)
                {
                    return Ok(Err(RemoteError::Changed { uri: uri.to_string() }));
                }
                let mut stream = got.into_stream();
                let mut written = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    written += chunk.len() as u64;
                    if written > limit {
                        return Ok(Err(too_large(written)));
                    }
                    // A blocking write on the remote runtime's thread: this runtime serves
                    // only these requests, and the disk is not the slow part.
                    file.write_all(&chunk).map_err(|e| object_store::Error::Generic {
                        store: "renv",
                        source: Box::new(e),
                    })?;
                }
                Ok::<_, object_store::Error>(Ok(written))
            };
            // A server that sends a byte just often enough to beat the read timeout must
            // still end: the whole download gets a deadline from the size its HEAD gave.
            let deadline = self.options.idle_timeout + Duration::from_secs(info.size / MIN_THROUGHPUT);
            let result = match runtime().block_on(async { tokio::time::timeout(deadline, transfer).await }) {
                Ok(result) => result,
                Err(_) => {
                    return Err(RemoteError::Failed {
                        uri: uri.to_string(),
                        message: format!(
                            "the download took more than {} s (slower than {} KiB/s)",
                            deadline.as_secs(),
                            MIN_THROUGHPUT >> 10
                        ),
                    });
                }
            };
            match result {
                Ok(Ok(written)) if written == info.size => {
                    self.stats.downloads.fetch_add(1, Ordering::Relaxed);
                    self.stats.download_bytes.fetch_add(written, Ordering::Relaxed);
                    return Ok(written);
                }
                Ok(Ok(written)) => {
                    return Err(RemoteError::Failed {
                        uri: uri.to_string(),
                        message: format!("got {written} bytes, its HEAD said {}", info.size),
                    });
                }
                Ok(Err(e)) => return Err(e),
                Err(object_store::Error::Generic {
                    store: "renv",
                    source,
                }) => {
                    return Err(RemoteError::Failed {
                        uri: uri.to_string(),
                        message: format!("writing the download: {source}"),
                    });
                }
                Err(e) => {
                    let e = RemoteError::of(uri, e);
                    if !matches!(e, RemoteError::Failed { .. }) || attempt >= self.options.retries {
                        return Err(e);
                    }
                    attempt += 1;
                    tracing::warn!(%uri, attempt, error = %e, "download broke off; starting again");
                    std::thread::sleep(Duration::from_millis(200 << attempt.min(5)));
                }
            }
        }
    }

    /// Downloads the object `info` describes once, handing its bytes as they arrive to
    /// `consume`, which runs on a thread of its own (an unpack overlapping the download),
    /// and returns what it returned and how long the download took. Nothing is retried and nothing is written here: a
    /// caller whose `consume` failed, or that got [`RemoteError::Failed`], starts again
    /// with [`Self::download`]. `consume`'s reads fail if the download breaks off; if
    /// `consume` returns before the end, the download stops.
    pub fn download_streaming<T: Send>(
        &self,
        uri: &RemoteUri,
        info: &ObjectInfo,
        limit: u64,
        consume: impl FnOnce(&mut dyn Read) -> T + Send,
    ) -> Result<(T, Duration), StreamFailed> {
        let final_error = |error| StreamFailed { error, retry: false };
        let too_large = |size| RemoteError::TooLarge {
            uri: uri.to_string(),
            size,
            limit,
        };
        if info.size > limit {
            return Err(final_error(too_large(info.size)));
        }
        if uri.scheme() == Scheme::File {
            return Err(final_error(RemoteError::Failed {
                uri: uri.to_string(),
                message: "a shared file is not streamed".into(),
            }));
        }
        let (store, path) = self.store_for(uri).map_err(final_error)?;
        // A few pieces in flight: the download runs ahead of the consumer by at most
        // PIECES × PIECE_BYTES, and each hand-over (a wake-up) carries many chunks.
        const PIECES: usize = 4;
        const PIECE_BYTES: usize = 1 << 20;
        let (tx, rx) = std::sync::mpsc::sync_channel(PIECES);
        let options = GetOptions {
            if_match: info.etag.clone(),
            version: info.version.clone(),
            ..GetOptions::default()
        };
        let transfer = async {
            // Owned by the transfer: when it ends, however it ends, the consumer's reads
            // end too.
            let tx = tx;
            let got = store.get_opts(&path, options).await?;
            // As in `download`: without an ETag to send as If-Match, the object must still
            // be the one its HEAD described.
            let meta = &got.meta;
            if meta.size != info.size
                || (info.etag.is_none() && meta.last_modified.timestamp() != info.last_modified)
            {
                return Ok(Err(RemoteError::Changed { uri: uri.to_string() }));
            }
            let mut stream = got.into_stream();
            let mut written = 0u64;
            let mut piece = Vec::new();
            let mut piece_bytes = 0;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                written += chunk.len() as u64;
                if written > limit {
                    return Ok(Err(too_large(written)));
                }
                piece_bytes += chunk.len();
                piece.push(chunk);
                // A blocking send on the thread that runs this future (block_on): the
                // consumer sets the pace, as the disk did in `download`.
                if piece_bytes >= PIECE_BYTES {
                    piece_bytes = 0;
                    if tx.send(Piece::Data(std::mem::take(&mut piece))).is_err() {
                        return Ok(Ok(false));
                    }
                }
            }
            if written != info.size {
                return Ok(Err(RemoteError::Failed {
                    uri: uri.to_string(),
                    message: format!("got {written} bytes, its HEAD said {}", info.size),
                }));
            }
            let sent = tx.send(Piece::Data(piece)).is_ok() && tx.send(Piece::End).is_ok();
            Ok::<_, object_store::Error>(Ok(sent))
        };
        let deadline = self.options.idle_timeout + Duration::from_secs(info.size / MIN_THROUGHPUT);
        std::thread::scope(|scope| {
            let consumer = scope.spawn(move || {
                let mut reader = PieceReader {
                    rx,
                    pieces: std::collections::VecDeque::new(),
                    at: 0,
                    ended: false,
                };
                consume(&mut reader)
            });
            let started = std::time::Instant::now();
            let produced = runtime().block_on(async { tokio::time::timeout(deadline, transfer).await });
            let took = started.elapsed();
            // Whatever happened, the consumer must see the end of its input.
            let consumed = consumer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            match produced {
                Err(_) => Err(final_error(RemoteError::Failed {
                    uri: uri.to_string(),
                    message: format!(
                        "the download took more than {} s (slower than {} KiB/s)",
                        deadline.as_secs(),
                        MIN_THROUGHPUT >> 10
                    ),
                })),
                // As `download` retries: a failure that is not the object's (a body that
                // broke off, a server error after object_store's own retries).
                Ok(Err(e)) => {
                    let error = RemoteError::of(uri, e);
                    let retry = matches!(error, RemoteError::Failed { .. });
                    Err(StreamFailed { error, retry })
                }
                Ok(Ok(Err(e))) => Err(final_error(e)),
                // Sent whole, or the consumer stopped reading: its answer says which.
                Ok(Ok(Ok(_))) => {
                    self.stats.downloads.fetch_add(1, Ordering::Relaxed);
                    self.stats.download_bytes.fetch_add(info.size, Ordering::Relaxed);
                    Ok((consumed, took))
                }
            }
        })
    }

    /// Uploads the file at `path` as the object (in parts when large), unless it exists
    /// already. Returns whether it was uploaded. The object appears whole or not at all.
    pub fn put_file(&self, uri: &RemoteUri, path: &Path) -> Result<bool, RemoteError> {
        if self.exists(uri)? {
            return Ok(false);
        }
        if uri.scheme() == Scheme::File {
            shared_file::put(uri, path)?;
            self.stats.uploads.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        let (store, object) = self.store_for(uri)?;
        let failed = |message: String| RemoteError::Failed {
            uri: uri.to_string(),
            message,
        };
        let mut file =
            std::fs::File::open(path).map_err(|e| failed(format!("reading {}: {e}", path.display())))?;
        runtime().block_on(async {
            let mut writer = object_store::buffered::BufWriter::new(store, object);
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(|e| failed(format!("reading {}: {e}", path.display())))?;
                if n == 0 {
                    break;
                }
                if let Err(e) = writer.write_all(&buf[..n]).await {
                    let _ = writer.abort().await;
                    return Err(failed(format!("uploading: {e}")));
                }
            }
            writer
                .shutdown()
                .await
                .map_err(|e| failed(format!("uploading: {e}")))
        })?;
        self.stats.uploads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn store_for(&self, uri: &RemoteUri) -> Result<(Arc<dyn ObjectStore>, ObjectPath), RemoteError> {
        let failed = |message: String| RemoteError::Failed {
            uri: uri.to_string(),
            message,
        };
        let path =
            ObjectPath::from_url_path(uri.key()).map_err(|e| failed(format!("not an object path: {e}")))?;
        let key = (uri.scheme(), uri.authority().to_string());
        let mut stores = self.stores.lock().unwrap();
        if let Some(store) = stores.get(&key) {
            return Ok((Arc::clone(store), path));
        }
        let store = self.build_store(uri).map_err(|e| failed(error_chain(&e)))?;
        stores.insert(key, Arc::clone(&store));
        Ok((store, path))
    }

    fn build_store(&self, uri: &RemoteUri) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        // One TLS implementation for every client, chosen before the first is built
        // (ring: no C toolchain needed to build renv). A second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let o = self.options;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: o.retries,
            retry_timeout: Duration::from_secs(120),
        };
        // No overall deadline on a request: a large download may take minutes. Stalls are
        // caught by the read timeout instead.
        let client = [
            (
                ClientConfigKey::ConnectTimeout,
                format!("{}s", o.connect_timeout.as_secs()),
            ),
            (
                ClientConfigKey::ReadTimeout,
                format!("{}s", o.idle_timeout.as_secs()),
            ),
            (ClientConfigKey::Timeout, format!("{}s", 24 * 3600)),
        ];
        Ok(match uri.scheme() {
            Scheme::S3 => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(uri.authority())
                    .with_http_connector(NoRedirects)
                    .with_retry(retry);
                for (key, value) in client {
                    builder = builder.with_config(object_store::aws::AmazonS3ConfigKey::Client(key), value);
                }
                Arc::new(builder.build()?)
            }
            Scheme::Gcs => {
                let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(uri.authority())
                    .with_http_connector(NoRedirects)
                    .with_retry(retry);
                for (key, value) in client {
                    builder = builder.with_config(object_store::gcp::GoogleConfigKey::Client(key), value);
                }
                Arc::new(builder.build()?)
            }
            Scheme::Https | Scheme::Http => {
                let mut builder = object_store::http::HttpBuilder::new()
                    .with_url(format!("{}://{}", uri.scheme().as_str(), uri.authority()))
                    .with_http_connector(NoRedirects)
                    .with_retry(retry)
                    // Whether plain http may be named at all is the operator's
                    // --allow-remote decision, made before this.
                    .with_config(ClientConfigKey::AllowHttp, "true");
                for (key, value) in client {
                    builder = builder.with_config(key, value);
                }
                Arc::new(builder.build()?)
            }
            // Read and written by renv itself (see `shared_file`), never through here.
            Scheme::File => {
                return Err(object_store::Error::NotSupported {
                    source: "file:// objects are read by renv itself".into(),
                });
            }
        })
    }
}

/// Why [`RemoteClient::download_streaming`] failed, and whether another try may succeed.
#[derive(Debug)]
pub struct StreamFailed {
    pub error: RemoteError,
    pub retry: bool,
}

/// What [`RemoteClient::download_streaming`] hands its consumer: chunks as they came.
enum Piece<B> {
    Data(Vec<B>),
    End,
}

/// The consumer's side: a `Read` over the pieces, without copying them on the way.
struct PieceReader<B> {
    rx: std::sync::mpsc::Receiver<Piece<B>>,
    pieces: std::collections::VecDeque<B>,
    /// How much of the front piece was read.
    at: usize,
    ended: bool,
}

impl<B: AsRef<[u8]>> Read for PieceReader<B> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(front) = self.pieces.front() {
                let front = front.as_ref();
                let rest = &front[self.at..];
                let n = rest.len().min(out.len());
                out[..n].copy_from_slice(&rest[..n]);
                self.at += n;
                if self.at == front.len() {
                    self.pieces.pop_front();
                    self.at = 0;
                }
                if n > 0 || out.is_empty() {
                    return Ok(n);
                }
                continue;
            }
            if self.ended {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Piece::Data(chunks)) => self.pieces.extend(chunks),
                Ok(Piece::End) => self.ended = true,
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the download broke off",
                    ));
                }
            }
        }
    }
}

/// An HTTP client that never follows a redirect: an allowed server answering 302 must
/// not make the daemon fetch from a host `--allow-remote` does not name (the instance
/// metadata service, a port on 127.0.0.1). A redirect is an error. Otherwise built as
/// `object_store` builds its own (its timeouts, plain http only when allowed, no
/// transparent decompression: sizes must be the objects').
#[derive(Debug)]
struct NoRedirects;

impl object_store::client::HttpConnector for NoRedirects {
    fn connect(
        &self,
        options: &object_store::ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        let duration =
            |key: ClientConfigKey| options.get_config_value(&key).and_then(|v| humantime_seconds(&v));
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("renv/", env!("CARGO_PKG_VERSION")))
            .https_only(options.get_config_value(&ClientConfigKey::AllowHttp).as_deref() != Some("true"));
        if let Some(timeout) = duration(ClientConfigKey::ConnectTimeout) {
            builder = builder.connect_timeout(timeout);
        }
        if let Some(timeout) = duration(ClientConfigKey::ReadTimeout) {
            builder = builder.read_timeout(timeout);
        }
        if let Some(timeout) = duration(ClientConfigKey::Timeout) {
            builder = builder.timeout(timeout);
        }
        let client = builder.build().map_err(|e| object_store::Error::Generic {
            store: "renv",
            source: Box::new(e),
        })?;
        Ok(object_store::client::HttpClient::new(client))
    }
}

/// `"30s"` (as renv writes the client options above) as a duration.
fn humantime_seconds(value: &str) -> Option<Duration> {
    value.strip_suffix('s')?.parse().ok().map(Duration::from_secs)
}

/// Objects on a shared filesystem (`file://`), read and written by renv itself rather
/// than through `object_store`: whoever can write the shared directory (every user who
/// pushes there) must not make a root daemon follow a symlink, block on a FIFO, or write
/// elsewhere. An object is `<base>/pkgs/<name>`: `<base>` is the operator's and opened as
/// named; below it everything is resolved with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS)`, opened without blocking, and must be a regular file, read
/// through that one descriptor. Its revision is its device, inode, mtime and size. A
/// push writes a new file beside the object (`O_EXCL`) and renames it into place.
mod shared_file {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};

    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use rustix::io::Errno;

    use super::{ObjectInfo, RemoteError, RemoteUri};

    fn failed(uri: &RemoteUri, message: String) -> RemoteError {
        RemoteError::Failed {
            uri: uri.to_string(),
            message,
        }
    }

    fn errno(uri: &RemoteUri, e: Errno) -> RemoteError {
        match e {
            Errno::NOENT => RemoteError::NotFound { uri: uri.to_string() },
            Errno::ACCESS | Errno::PERM => RemoteError::Denied {
                uri: uri.to_string(),
                message: e.to_string(),
            },
            Errno::LOOP | Errno::XDEV => failed(
                uri,
                "reached through a symlink; renv reads and writes only real files and directories below a shared remote"
                    .into(),
            ),
            e => failed(uri, e.to_string()),
        }
    }

    /// `<base>` (as named) and the object's place below it (`pkgs/<name>`).
    fn split(uri: &RemoteUri) -> Result<(PathBuf, PathBuf), RemoteError> {
        let path = url::Url::parse(uri.as_str())
            .ok()
            .and_then(|url| url.to_file_path().ok())
            .ok_or_else(|| failed(uri, "not a file path".into()))?;
        let mut parts: Vec<_> = path.components().collect();
        let below = parts.split_off(parts.len().saturating_sub(2));
        Ok((parts.iter().collect(), below.iter().collect()))
    }

    const BENEATH: ResolveFlags = ResolveFlags::BENEATH
        .union(ResolveFlags::NO_SYMLINKS)
        .union(ResolveFlags::NO_MAGICLINKS);

    fn open_base(uri: &RemoteUri, base: &Path) -> Result<rustix::fd::OwnedFd, RemoteError> {
        rustix::fs::open(
            base,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno(uri, e))
    }

    fn info_of(meta: &std::fs::Metadata) -> ObjectInfo {
        ObjectInfo {
            size: meta.len(),
            etag: Some(format!(
                "{:x}-{:x}-{:x}.{:x}-{:x}",
                meta.dev(),
                meta.ino(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.len()
            )),
            version: None,
            last_modified: meta.mtime(),
        }
    }

    fn open(uri: &RemoteUri) -> Result<(std::fs::File, ObjectInfo), RemoteError> {
        let (base, below) = split(uri)?;
        let base = open_base(uri, &base)?;
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd =
            rustix::fs::openat2(&base, &below, flags, Mode::empty(), BENEATH).map_err(|e| errno(uri, e))?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(|e| failed(uri, e.to_string()))?;
        if !meta.is_file() {
            return Err(failed(uri, "not a regular file".into()));
        }
        let info = info_of(&meta);
        Ok((file, info))
    }

    pub(super) fn head(uri: &RemoteUri) -> Result<ObjectInfo, RemoteError> {
        open(uri).map(|(_, info)| info)
    }

    pub(super) fn download(
        uri: &RemoteUri,
        expected: &ObjectInfo,
        dest: &mut std::fs::File,
        limit: u64,
    ) -> Result<u64, RemoteError> {
        let (file, info) = open(uri)?;
        if info != *expected {
            return Err(RemoteError::Changed { uri: uri.to_string() });
        }
        let written = std::io::copy(&mut file.take(limit + 1), dest)
            .and_then(|n| dest.flush().map(|()| n))
            .map_err(|e| failed(uri, format!("copying: {e}")))?;
        if written > limit {
            return Err(RemoteError::TooLarge {
                uri: uri.to_string(),
                size: written,
                limit,
            });
        }
        if written != info.size {
            return Err(RemoteError::Changed { uri: uri.to_string() });
        }
        Ok(written)
    }

    /// Writes the file at `source` as the object: a new file in the object's directory
    /// (made if missing, never through a symlink), synced, then renamed into place.
    pub(super) fn put(uri: &RemoteUri, source: &Path) -> Result<(), RemoteError> {
        let (base, below) = split(uri)?;
        let base = open_base(uri, &base)?;
        let (Some(dir), Some(name)) = (below.parent(), below.file_name()) else {
            return Err(failed(uri, "no object name".into()));
        };
        let dir_flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir = match rustix::fs::openat2(&base, dir, dir_flags, Mode::empty(), BENEATH) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&base, dir, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(errno(uri, e)),
                }
                rustix::fs::openat2(&base, dir, dir_flags, Mode::empty(), BENEATH)
            }
            other => other,
        }
        .map_err(|e| errno(uri, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = format!(".renv-push-{}-{nanos}", std::process::id());
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| errno(uri, e))?;
        let written = (|| -> std::io::Result<()> {
            let mut out = std::fs::File::from(fd);
            std::io::copy(&mut std::fs::File::open(source)?, &mut out)?;
            out.sync_all()
        })();
        let renamed = written
            .map_err(|e| failed(uri, format!("writing: {e}")))
            .and_then(|()| rustix::fs::renameat(&dir, tmp.as_str(), &dir, name).map_err(|e| errno(uri, e)));
        if renamed.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        }
        renamed
    }
}
