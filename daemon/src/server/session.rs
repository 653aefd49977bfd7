//! Who is connected and what they may hold: the peer's credentials and admin status, and the
//! admission of connections against the total and per-uid caps.
use crate::config::Config;
use lorad_schema::JobRecord;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A connection's state that requests may change: who it is, where its frames go, its subscriptions.
pub struct Conn {
    /// Who is on the other end.
    pub peer: Peer,
    /// Frames to send; the writer task drains it.
    pub out: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// Live subscriptions by id.
    pub subs: HashMap<u64, tokio::task::AbortHandle>,
}

/// The connected process, from SO_PEERCRED.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Pid (0 if unknown).
    pub pid: u32,
    /// Root, the daemon's own user, or a member of `admin_group`: sees and controls every job and
    /// has no quota.
    pub admin: bool,
}

impl Peer {
    /// A peer that is not an admin unless it is root or the daemon's own user.
    pub fn new(uid: u32, pid: u32) -> Peer {
        let admin = uid == 0 || uid == nix::unistd::geteuid().as_raw();
        Peer { uid, pid, admin }
    }

    /// A peer whose admin status also counts membership in `admin_group` (blocking: user database).
    pub fn resolve(uid: u32, pid: u32, admin_group: Option<&str>) -> Peer {
        let mut peer = Peer::new(uid, pid);
        if !peer.admin {
            if let Some(group) = admin_group {
                peer.admin = in_group(uid, group);
            }
        }
        peer
    }

    /// Whether this peer is an admin.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// Whether this peer may see and control `job`.
    pub fn may_access(&self, job: &JobRecord) -> bool {
        self.admin || job.owner_uid == self.uid
    }
}

/// Whether a daemon running as `daemon_uid` may serve `peer_uid` at all. A system daemon does each
/// user's work as that user, which takes root: one that is not root would run everyone's work as
/// itself (so one user could read another's job files through it), so it serves only its own user
/// and root.
pub fn may_serve(system: bool, daemon_uid: u32, peer_uid: u32) -> Result<(), String> {
    if !system || daemon_uid == 0 || peer_uid == daemon_uid || peer_uid == 0 {
        return Ok(());
    }
    Err(format!(
        "this lorad runs as uid {daemon_uid}, not as root, so it cannot do uid {peer_uid}'s work as uid {peer_uid}; it serves only its own user. Ask the admin to run the system service as root, or start your own daemon with `lorad --user`"
    ))
}

/// Whether `uid` is in `group`: as its primary group or listed as a member.
fn in_group(uid: u32, group: &str) -> bool {
    let (Ok(Some(group)), Ok(Some(user))) = (
        nix::unistd::Group::from_name(group),
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
    ) else {
        return false;
    };
    user.gid == group.gid || group.mem.contains(&user.name)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The daemon holds as many connections as it allows.
    #[error("the daemon has {0} open connections, its limit (max_connections); try again later")]
    Total(usize),
    /// This uid holds as many connections as it may.
    #[error("uid {uid} has {open} open connections, the limit per user (max_connections_per_user); close some")]
    PerUser {
        /// The uid.
        uid: u32,
        /// Its open connections.
        open: usize,
    },
}

/// Open connections, in total and by uid. Admission is a pure decision on these counts.
#[derive(Debug, Default)]
pub struct Admission {
    open: Mutex<HashMap<u32, usize>>,
}

/// A connection's place in [`Admission`]; dropping it frees the place.
pub struct Slot {
    admission: Arc<Admission>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.admission.open.lock() {
            if let Some(n) = open.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.uid);
                }
            }
        }
    }
}

/// Connections admins may open beyond `max_connections` (taken from the descriptors kept for
/// workers), so an admin can always get in to see and stop what floods the daemon.
pub const ADMIN_RESERVE: usize = 16;

/// Whether one more connection of `uid` fits: `total` open in all, `mine` of this uid. Admins have no
/// per-user cap and [`ADMIN_RESERVE`] connections beyond the total.
pub fn admit(
    total: usize,
    mine: usize,
    admin: bool,
    max_total: usize,
    max_mine: usize,
) -> Result<(), Refusal> {
    if admin {
        return if total >= max_total + ADMIN_RESERVE {
            Err(Refusal::Total(total))
        } else {
            Ok(())
        };
    }
    if total >= max_total {
        return Err(Refusal::Total(total));
    }
    if mine >= max_mine {
        return Err(Refusal::PerUser { uid: 0, open: mine });
    }
    Ok(())
}

impl Admission {
    /// Takes a place for `peer` if the caps allow.
    pub fn enter(self: &Arc<Self>, peer: &Peer, config: &Config) -> Result<Slot, Refusal> {
        let uid = peer.uid;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = open.values().sum();
        let mine = open.get(&uid).copied().unwrap_or(0);
        let limits = &config.limits;
        admit(
            total,
            mine,
            peer.admin,
            limits.max_connections,
            limits.max_connections_per_user,
        )
        .map_err(|r| match r {
            Refusal::PerUser { open, .. } => Refusal::PerUser { uid, open },
            other => other,
        })?;
        *open.entry(uid).or_insert(0) += 1;
        Ok(Slot {
            admission: self.clone(),
            uid,
        })
    }
}

/// Frames up to this size need no budget: every connection may always send one (connections are
/// capped, so these are bounded too).
pub const SMALL_FRAME: usize = 64 * 1024;

/// The bytes of large frames being received, in total and per uid. A uid may hold at most a quarter
/// of the total (admins: all of it), so one user's half-sent frames cannot starve everyone else's.
/// Taking is all-or-nothing and never queues: a frame that does not fit now retries until its
/// deadline, so no frame waits behind another user's.
#[derive(Debug)]
pub struct FrameBudget {
    total: usize,
    used: Mutex<(usize, HashMap<u32, usize>)>,
}

/// Bytes held for one frame; given back on drop.
#[derive(Debug)]
pub struct Grant {
    budget: Arc<FrameBudget>,
    uid: u32,
    bytes: usize,
}

impl Drop for Grant {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        used.0 -= self.bytes;
        if let Some(n) = used.1.get_mut(&self.uid) {
            *n -= self.bytes;
            if *n == 0 {
                used.1.remove(&self.uid);
            }
        }
    }
}

/// Whether `len` more bytes fit: `total_used` of `total` in use, `mine` of them this uid's.
pub fn fits(len: usize, total_used: usize, mine: usize, total: usize, admin: bool) -> bool {
    let share = if admin { total } else { total / 4 };
    total_used + len <= total && mine + len <= share
}

impl FrameBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> FrameBudget {
        FrameBudget {
            total,
            used: Mutex::new((0, HashMap::new())),
        }
    }

    /// Holds `len` bytes for `peer`'s frame if they fit now. Small frames always fit and hold nothing.
    pub fn try_take(self: &Arc<Self>, peer: &Peer, len: usize) -> Option<Grant> {
        let bytes = if len <= SMALL_FRAME { 0 } else { len };
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mine = used.1.get(&peer.uid).copied().unwrap_or(0);
        if bytes > 0 && !fits(bytes, used.0, mine, self.total, peer.admin) {
            return None;
        }
        used.0 += bytes;
        if bytes > 0 {
            *used.1.entry(peer.uid).or_insert(0) += bytes;
        }
        Some(Grant {
            budget: self.clone(),
            uid: peer.uid,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_apply_in_total_and_per_uid() {
        assert_eq!(admit(0, 0, false, 10, 2), Ok(()));
        assert_eq!(admit(9, 1, false, 10, 2), Ok(()));
        assert_eq!(admit(10, 0, false, 10, 2), Err(Refusal::Total(10)));
        assert_eq!(
            admit(5, 2, false, 10, 2),
            Err(Refusal::PerUser { uid: 0, open: 2 })
        );
    }

    #[test]
    fn admins_get_in_past_a_full_house_up_to_the_reserve() {
        assert_eq!(admit(10, 5, true, 10, 2), Ok(()));
        assert_eq!(admit(10 + ADMIN_RESERVE - 1, 0, true, 10, 2), Ok(()));
        assert!(admit(10 + ADMIN_RESERVE, 0, true, 10, 2).is_err());
    }

    #[test]
    fn slots_are_given_back_on_drop() {
        let mut config = Config::new("/x".into(), "/y".into());
        config.limits.max_connections_per_user = 2;
        let a = Arc::new(Admission::default());
        let (p7, p8) = (Peer::resolve(7, 1, None), Peer::resolve(8, 1, None));
        let s1 = a.enter(&p7, &config).unwrap();
        let _s2 = a.enter(&p7, &config).unwrap();
        assert!(matches!(
            a.enter(&p7, &config),
            Err(Refusal::PerUser { uid: 7, open: 2 })
        ));
        assert!(a.enter(&p8, &config).is_ok());
        drop(s1);
        assert!(a.enter(&p7, &config).is_ok());
    }

    #[test]
    fn one_user_holds_at_most_a_quarter_of_the_frame_budget() {
        assert!(fits(10, 0, 0, 100, false));
        assert!(fits(25, 0, 0, 100, false));
        assert!(!fits(26, 0, 0, 100, false));
        assert!(!fits(10, 20, 20, 100, false));
        assert!(!fits(10, 95, 0, 100, false));
        assert!(fits(90, 0, 0, 100, true));
        let budget = Arc::new(FrameBudget::new(4 << 20));
        let (a, b) = (Peer::resolve(7, 1, None), Peer::resolve(8, 1, None));
        let held = budget.try_take(&a, 1 << 20).unwrap();
        assert!(budget.try_take(&a, 100 << 10).is_none(), "over a's share");
        assert!(
            budget.try_take(&a, 1000).is_some(),
            "small frames always fit"
        );
        assert!(
            budget.try_take(&b, 1 << 20).is_some(),
            "b is not starved by a"
        );
        drop(held);
        assert!(budget.try_take(&a, 1 << 20).is_some());
    }

    #[test]
    fn a_system_daemon_that_is_not_root_serves_only_its_own_user() {
        assert!(may_serve(true, 0, 1000).is_ok());
        assert!(may_serve(false, 990, 1000).is_ok());
        assert!(may_serve(true, 990, 990).is_ok());
        assert!(may_serve(true, 990, 0).is_ok());
        let e = may_serve(true, 990, 1000).unwrap_err();
        assert!(
            e.contains("runs as uid 990") && e.contains("lorad --user"),
            "{e}"
        );
    }

    #[test]
    fn root_is_admin_and_others_are_not_by_default() {
        assert!(Peer::new(0, 1).is_admin());
        let other = Peer::resolve(3_999_999_000, 1, Some("root"));
        assert!(!other.is_admin());
    }
}
