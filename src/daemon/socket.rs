//! Creating the daemon's socket without ever exposing it.
//!
//! Refuse a directory that others can write without the sticky bit, or that belongs to
//! another user (someone else could swap the socket). An existing path is replaced only
//! if it is a stale socket of ours (nothing answers on it). The socket is bound under a
//! umask that makes it 0600 from its first moment, under a private name; the users and
//! groups of `--allow-uid`/`--allow-gid` are then granted access by a POSIX ACL naming
//! exactly them (never a world-writable socket), and only then is it renamed into place.
//! Where the filesystem has no ACLs, a single `--allow-gid` group gets the socket's group
//! ownership (0660) instead; anything more is refused with the reason.

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
    #[error(
        "{dir}: cannot grant the allowed users and groups access to the socket: {reason}; \
         put the socket (--socket) on a filesystem with POSIX ACLs, or allow a single group (--allow-gid) only"
    )]
    NoAcl { dir: String, reason: std::io::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Who besides the daemon's own user (and root) may connect.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

pub fn bind(path: &Path, access: &Access) -> Result<std::os::unix::net::UnixListener, SocketError> {
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
    let placed = grant(&staged, access, dir).and_then(|()| Ok(fs_err::rename(&staged, path)?));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Grants `access` on the (still private) socket at `staged`.
fn grant(staged: &Path, access: &Access, dir: &Path) -> Result<(), SocketError> {
    if access.uids.is_empty() && access.gids.is_empty() {
        return Ok(());
    }
    match crate::sys::grant_read_write(staged, &access.uids, &access.gids) {
        Ok(()) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                && access.uids.is_empty()
                && access.gids.len() == 1 =>
        {
            std::os::unix::fs::lchown(staged, None, Some(access.gids[0]))?;
            fs_err::set_permissions(staged, std::fs::Permissions::from_mode(0o660))?;
            Ok(())
        }
        Err(reason) => Err(SocketError::NoAcl {
            dir: dir.display().to_string(),
            reason,
        }),
    }
}
