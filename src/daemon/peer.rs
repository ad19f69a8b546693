//! Who is calling. Every connection's peer is read with SO_PEERCRED when it is accepted
//! (its supplementary groups from `/proc/<pid>/status`), checked against the daemon's
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

/// Who may talk to the daemon: its own uid, root, and the configured uids and gids.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    pub me: u32,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    /// The caller behind a connection's credentials, if the policy lets it in.
    pub fn admit(&self, uid: u32, gid: u32, pid: Option<i32>) -> Option<Caller> {
        let groups = pid
            .and_then(|pid| supplementary_groups(pid, uid, gid))
            .unwrap_or_default();
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

/// The peer's supplementary groups, from `/proc/<pid>/status` — only if that process
/// still has the uid and gid the kernel reported for the connection. The pid is from
/// connect time: if the peer exited and another user's process got its pid, its groups
/// are not the peer's (`None`: no supplementary groups).
fn supplementary_groups(pid: i32, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ids = |key: &str| -> Option<Vec<u32>> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        Some(line.split_whitespace().filter_map(|n| n.parse().ok()).collect())
    };
    // "Uid: real effective saved fs"; SO_PEERCRED reports the effective ids.
    if ids("Uid:")?.get(1) != Some(&uid) || ids("Gid:")?.get(1) != Some(&gid) {
        return None;
    }
    ids("Groups:")
}
