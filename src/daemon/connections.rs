//! Who may hold a connection, and how many: decided when a connection is accepted, from
//! its SO_PEERCRED credentials, before a byte of it is read and before it holds anything.
//!
//! A connection is admitted if its peer passes the policy ([`PeerPolicy`]), its uid holds
//! fewer than `--max-connections-per-uid` connections, and one of the `--max-connections`
//! slots is free — checked in that order, so a refused peer never holds a slot and a uid
//! at its cap never takes one either. Root and the daemon's own user (the scheduler, the
//! operator: they act for everyone) are exempt from the per-uid cap and are held only to
//! the global one; every other uid has the same cap of its own, so one user's slow or
//! idle clients cannot take the slots everyone else needs.
//!
//! A refused connection is answered at once with a complete HTTP response naming the
//! limit (403, 429 or 503, the API's error body, `Connection: close`), without waiting for
//! its request, and is closed soon after: the daemon reads and discards what the client
//! sends for a moment, so that a client still writing its request can read the answer
//! rather than fail with a broken pipe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::peer::{Caller, PeerCred, PeerPolicy};

/// Longest a refused connection is kept (to let its client finish writing and read the
/// answer), and most it may send meanwhile.
const REFUSED_LINGER: Duration = Duration::from_secs(2);

/// Refused connections being answered at once, in all and per uid; more are closed
/// without an answer, so a flood can neither use up the daemon's descriptors nor take
/// every answer from other users.
const MAX_ANSWERED_REFUSALS: usize = 64;
const MAX_ANSWERED_REFUSALS_PER_UID: usize = 8;

/// Who is being answered a refusal right now: at most 64 in all, 8 per uid.
#[derive(Default)]
pub struct Refusals(std::sync::Mutex<(usize, HashMap<u32, usize>)>);

/// One refusal being answered; dropped when it is done.
pub struct RefusalSlot {
    refusals: Arc<Refusals>,
    uid: u32,
}

impl Refusals {
    /// A slot to answer a refusal of `uid` (an unknown peer counts as `u32::MAX`), if any.
    pub fn take(self: &Arc<Self>, uid: u32) -> Option<RefusalSlot> {
        let mut guard = self.0.lock().unwrap();
        let (total, by_uid) = &mut *guard;
        let mine = by_uid.entry(uid).or_default();
        if *total >= MAX_ANSWERED_REFUSALS || *mine >= MAX_ANSWERED_REFUSALS_PER_UID {
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(RefusalSlot {
            refusals: Arc::clone(self),
            uid,
        })
    }
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        let mut guard = self.refusals.0.lock().unwrap();
        let (total, by_uid) = &mut *guard;
        *total -= 1;
        if let Some(mine) = by_uid.get_mut(&self.uid) {
            *mine -= 1;
            if *mine == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}
const REFUSED_DRAIN_BYTES: usize = 1 << 20;

/// The admission policy and what admitted connections hold.
pub struct Admission {
    peers: PeerPolicy,
    max_connections: usize,
    slots: Arc<Semaphore>,
    max_per_uid: usize,
    per_uid: Arc<Mutex<HashMap<u32, usize>>>,
}

/// An admitted connection: its caller, and what it holds until it is dropped.
pub struct Admitted {
    pub caller: Arc<Caller>,
    _slot: OwnedSemaphorePermit,
    _uid: Option<UidSlot>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The peer policy does not let this user in (or its credentials could not be read).
    Forbidden,
    /// This uid already holds `--max-connections-per-uid` connections.
    PerUid { uid: u32, cap: usize },
    /// All `--max-connections` slots are taken.
    Busy { max: usize },
}

impl Refused {
    pub fn status(&self) -> StatusCode {
        match self {
            Refused::Forbidden => StatusCode::FORBIDDEN,
            Refused::PerUid { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refused::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Refused::Forbidden => "forbidden",
            Refused::PerUid { .. } => "too_many_connections",
            Refused::Busy { .. } => "busy",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refused::Forbidden => {
                "this user may not use the renv daemon; ask for --allow-uid or --allow-gid".into()
            }
            Refused::PerUid { uid, cap } => format!(
                "uid {uid} already holds {cap} connections, the most one user may hold \
                 (--max-connections-per-uid {cap}); close one or retry later"
            ),
            Refused::Busy { max } => {
                format!("too many connections: all {max} are in use (--max-connections {max}); retry later")
            }
        }
    }

    /// The complete HTTP/1.1 answer: the API's error body, and the connection closes.
    pub fn response(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {"kind": self.kind(), "field": null, "message": self.message()}
        })
        .to_string();
        let status = self.status();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }
}

impl Admission {
    pub fn new(peers: PeerPolicy, max_connections: usize, max_per_uid: usize) -> Admission {
        Admission {
            peers,
            max_connections,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_per_uid,
            per_uid: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Admits or refuses a connection whose peer the kernel reported as `cred` (`None`:
    /// it could not say).
    pub fn admit(&self, cred: Option<PeerCred>) -> Result<Admitted, Refused> {
        let PeerCred { uid, gid, groups } = cred.ok_or(Refused::Forbidden)?;
        let caller = self.peers.admit(uid, gid, groups).ok_or(Refused::Forbidden)?;
        let uid_slot = if caller.admin {
            None
        } else {
            Some(self.take_uid_slot(uid)?)
        };
        // Dropping `uid_slot` on this error gives the uid's place back.
        let slot = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Refused::Busy {
                max: self.max_connections,
            })?;
        Ok(Admitted {
            caller: Arc::new(caller),
            _slot: slot,
            _uid: uid_slot,
        })
    }

    fn take_uid_slot(&self, uid: u32) -> Result<UidSlot, Refused> {
        let mut open = self.per_uid.lock().unwrap();
        let held = open.entry(uid).or_insert(0);
        if *held >= self.max_per_uid {
            return Err(Refused::PerUid {
                uid,
                cap: self.max_per_uid,
            });
        }
        *held += 1;
        Ok(UidSlot {
            uid,
            open: Arc::clone(&self.per_uid),
        })
    }

    /// Connections `uid` holds now (for tests).
    #[cfg(test)]
    fn held_by(&self, uid: u32) -> usize {
        self.per_uid.lock().unwrap().get(&uid).copied().unwrap_or(0)
    }
}

/// One of a uid's connections; gives its place back when dropped.
struct UidSlot {
    uid: u32,
    open: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap();
        if let Some(held) = open.get_mut(&self.uid) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Answers a refused connection at once and closes it (see the module doc).
pub async fn refuse(mut stream: UnixStream, refused: Refused) {
    let answer = async {
        stream.write_all(&refused.response()).await?;
        stream.shutdown().await?;
        let mut buf = vec![0u8; 16 << 10];
        let mut drained = 0;
        while drained < REFUSED_DRAIN_BYTES {
            match stream.read(&mut buf).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSED_LINGER, answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_answered_a_few_per_uid_and_a_few_dozen_in_all() {
        let refusals = Arc::new(Refusals::default());
        let flood: Vec<_> = std::iter::from_fn(|| refusals.take(1000)).take(100).collect();
        assert_eq!(flood.len(), MAX_ANSWERED_REFUSALS_PER_UID, "one uid gets its few");
        assert!(
            refusals.take(1001).is_some(),
            "and another uid still gets answers"
        );
        let many: Vec<_> = (2000..2100).filter_map(|uid| refusals.take(uid)).collect();
        assert_eq!(many.len(), MAX_ANSWERED_REFUSALS - MAX_ANSWERED_REFUSALS_PER_UID);
        drop(flood);
        assert!(refusals.take(1000).is_some(), "slots come back when answered");
    }

    fn cred(uid: u32, gid: u32) -> PeerCred {
        PeerCred {
            uid,
            gid,
            groups: vec![],
        }
    }

    fn admission(max: usize, per_uid: usize) -> Admission {
        let peers = PeerPolicy {
            me: 4242,
            uids: vec![1000, 1001],
            gids: vec![],
        };
        Admission::new(peers, max, per_uid)
    }

    #[test]
    fn a_uid_at_its_cap_is_refused_and_others_are_not() {
        let admission = admission(10, 2);
        let a = admission.admit(Some(cred(1000, 1000))).unwrap();
        let _b = admission.admit(Some(cred(1000, 1000))).unwrap();
        let refused = admission.admit(Some(cred(1000, 1000))).err().unwrap();
        assert_eq!(refused, Refused::PerUid { uid: 1000, cap: 2 });
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.message().contains("--max-connections-per-uid 2"));
        assert!(admission.admit(Some(cred(1001, 1001))).is_ok(), "another uid");
        // Root and the daemon's own user have no per-uid cap.
        let admins: Vec<_> = (0..4)
            .map(|i| {
                admission
                    .admit(Some(cred(if i % 2 == 0 { 0 } else { 4242 }, 0)))
                    .unwrap()
            })
            .collect();
        assert_eq!(admins.len(), 4);
        drop(a);
        assert_eq!(admission.held_by(1000), 1);
        assert!(
            admission.admit(Some(cred(1000, 1000))).is_ok(),
            "its place came back"
        );
    }

    #[test]
    fn a_refused_peer_or_a_full_daemon_holds_nothing() {
        let admission = admission(2, 5);
        assert_eq!(
            admission.admit(Some(cred(1002, 1002))).err(),
            Some(Refused::Forbidden)
        );
        assert_eq!(admission.admit(None).err(), Some(Refused::Forbidden));
        let _a = admission.admit(Some(cred(1000, 1000))).unwrap();
        let _b = admission.admit(Some(cred(1001, 1001))).unwrap();
        assert_eq!(
            admission.admit(Some(cred(1000, 1000))).err(),
            Some(Refused::Busy { max: 2 })
        );
        assert_eq!(
            admission.held_by(1000),
            1,
            "the refused one gave its uid place back"
        );
    }

    #[test]
    fn a_refusal_is_a_complete_http_answer() {
        let text = String::from_utf8(Refused::Busy { max: 7 }.response()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("connection: close"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"]["kind"], "busy");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("--max-connections 7")
        );
    }
}
