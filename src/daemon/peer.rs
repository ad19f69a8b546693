//! Who is calling. Every connection's peer is read with SO_PEERCRED and SO_PEERGROUPS
//! when it is accepted (both fixed by the kernel at connect time), checked against the daemon's
//! policy before it may hold a connection slot, and handed to the handlers as a
//! [`Caller`]: the uid is the boundary. A caller acts as itself (its workers run with its
//! uid, gid and groups) and sees and controls only its own workers and references; the
//! daemon's own user and root see and control everything.

/// The peer of one connection, as the kernel reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Root or the daemon's own user: sees and controls everything.
    pub admin: bool,
}

impl Caller {
    /// Whether this caller may see and control what `owner` started or holds.
    pub fn may_see(&self, owner: u32) -> bool {
        self.admin || self.uid == owner
    }
}

/// A connection's peer as the kernel reported it when the peer connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl PeerCred {
    /// The peer of `stream` (`None`: the kernel could not say). Supplementary groups that
    /// cannot be read count as none: the peer then gets less, never more.
    pub fn of(stream: &tokio::net::UnixStream) -> Option<PeerCred> {
        let cred = stream.peer_cred().ok()?;
        Some(PeerCred {
            uid: cred.uid(),
            gid: cred.gid(),
            groups: crate::sys::peer_groups(stream).unwrap_or_default(),
        })
    }
}

/// Who may talk to the daemon: its own uid, root, and the configured uids and gids.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    pub me: u32,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    /// The caller behind a connection's credentials, if the policy lets it in.
    pub fn admit(&self, uid: u32, gid: u32, groups: Vec<u32>) -> Option<Caller> {
        let allowed = uid == self.me
            || uid == 0
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || groups.iter().any(|g| self.gids.contains(g));
        allowed.then_some(Caller {
            uid,
            gid,
            groups,
            admin: uid == 0 || uid == self.me,
        })
    }
}
