//! Creating the daemon's socket without ever exposing it.
//!
//! Refuse a directory that others can write without the sticky bit, or that belongs to
//! another user (someone else could swap the socket). An existing path is replaced only
//! if it is a stale socket of ours (nothing answers on it). The socket is bound under a
//! umask that makes it 0600 from its first moment; `--allow-gid` then widens it to 0660.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{dir}: refusing a socket directory that others can write (mode {mode:o}, no sticky bit)")]
    WorldWritable { dir: String, mode: u32 },
    #[error("{dir}: refusing a socket directory owned by uid {owner}")]
    ForeignOwner { dir: String, owner: u32 },
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("{0}: another daemon is already serving on this socket")]
    InUse(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub fn bind(path: &Path, group_access: bool) -> Result<std::os::unix::net::UnixListener, SocketError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs_err::create_dir_all(dir)?;
    let meta = fs_err::metadata(dir)?;
    let me = crate::sys::geteuid();
    if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
        return Err(SocketError::WorldWritable {
            dir: dir.display().to_string(),
            mode: meta.mode() & 0o7777,
        });
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SocketError::ForeignOwner {
            dir: dir.display().to_string(),
            owner: meta.uid(),
        });
    }
    match fs_err::symlink_metadata(path) {
        Ok(existing) => {
            if !existing.file_type().is_socket() || existing.uid() != me {
                return Err(SocketError::NotASocket(path.display().to_string()));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.display().to_string())),
                Err(_) => fs_err::remove_file(path)?,
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    // Bound (and listening) under a private name, then renamed into place: a client that
    // waits for the socket to appear can connect at once, never before anyone listens.
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staged = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    // The umask is process-wide; the daemon binds before it starts any other work.
    let listener = crate::sys::with_umask(0o177, || std::os::unix::net::UnixListener::bind(&staged))?;
    let placed = (|| {
        if group_access {
            fs_err::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
        }
        fs_err::rename(&staged, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e.into());
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}
