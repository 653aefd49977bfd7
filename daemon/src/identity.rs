//! Whose work a process does. A root daemon runs every process that touches a user's files (training
//! and export workers, the submit-time checks) as that user: their uid, primary gid and supplementary
//! groups, a minimal environment and a private umask. The daemon itself opens no path a client named.
use std::ffi::CString;
use std::path::PathBuf;

/// The umask of every worker: what it writes is its owner's alone.
pub const WORKER_UMASK: u32 = 0o077;

/// The user a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Every group the user is in (primary included), as `initgroups` would set them.
    pub groups: Vec<u32>,
    /// Home directory (HOME in the worker's environment).
    pub home: PathBuf,
}

/// Why an identity could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The uid has no passwd entry (a deleted user, or one only a container knows).
    #[error("uid {0} has no user account (passwd entry); lorad runs work only as a known user")]
    NoUser(u32),
    /// The passwd or group database could not be read.
    #[error("cannot look up uid {uid}: {detail}")]
    Lookup {
        /// The uid.
        uid: u32,
        /// Why.
        detail: String,
    },
}

impl Identity {
    /// Looks up `uid` in the user database (blocking: NSS may read files or ask a service).
    pub fn of_uid(uid: u32) -> Result<Identity, IdentityError> {
        let lookup = |detail: String| IdentityError::Lookup { uid, detail };
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map_err(|e| lookup(e.to_string()))?
            .ok_or(IdentityError::NoUser(uid))?;
        let name = CString::new(user.name.clone()).map_err(|e| lookup(e.to_string()))?;
        let groups = nix::unistd::getgrouplist(&name, user.gid)
            .map_err(|e| lookup(format!("groups of {}: {e}", user.name)))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Identity {
            name: user.name,
            uid,
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
        })
    }
}

/// Who a process for `owner_uid`'s work must run as: `None` when it runs as the daemon itself (the
/// daemon is not root, so it cannot switch, and its socket admits only its own user; or the owner is
/// root). Blocking (user database).
pub fn for_owner(owner_uid: u32) -> Result<Option<Identity>, IdentityError> {
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 || owner_uid == me {
        return Ok(None);
    }
    Identity::of_uid(owner_uid).map(Some)
}

/// Environment variables a worker inherits from the daemon besides the ones set for it: lorad's own
/// settings (LORAD_*), logging, thread counts and the GPU selection. Everything else is dropped.
fn inherited(key: &str) -> bool {
    (key.starts_with("LORAD_") && key != "LORAD_SOCKET")
        || matches!(
            key,
            "RUST_BACKTRACE" | "RAYON_NUM_THREADS" | "CUDA_VISIBLE_DEVICES" | "TZ"
        )
}

/// Makes `cmd` start with a minimal, explicit environment and umask [`WORKER_UMASK`], and, with an
/// identity, as that user (supplementary groups, then gid, then uid, in the child before exec).
pub fn apply(cmd: &mut tokio::process::Command, who: Option<&Identity>) {
    let kept: Vec<(String, String)> = std::env::vars().filter(|(k, _)| inherited(k)).collect();
    cmd.env_clear();
    cmd.envs(kept);
    cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    cmd.env("LANG", "C.UTF-8");
    let (home, user) = match who {
        Some(id) => (id.home.clone(), id.name.clone()),
        None => (
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/")),
            std::env::var("USER").unwrap_or_default(),
        ),
    };
    cmd.env("HOME", home);
    if !user.is_empty() {
        cmd.env("USER", &user).env("LOGNAME", &user);
    }
    // The user's own home need not be readable by anyone else; the working directory must be.
    cmd.current_dir("/");
    let switch = who.map(|id| {
        let groups: Vec<libc::gid_t> = id.groups.clone();
        (id.uid, id.gid, groups)
    });
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (umask, setgroups, setgid, setuid) on data prepared before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(WORKER_UMASK as libc::mode_t);
            if let Some((uid, gid, groups)) = &switch {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // setuid from root drops every privilege; make sure it did. (No allocation here:
                // a raw OS error.)
                if libc::setuid(0) == 0 {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lorad_settings_and_a_few_runtime_variables_pass() {
        assert!(inherited("LORAD_TEST_HANG_AT_STEP"));
        assert!(inherited("CUDA_VISIBLE_DEVICES"));
        assert!(!inherited("LORAD_SOCKET"));
        assert!(!inherited("LD_PRELOAD"));
        assert!(!inherited("SSH_AUTH_SOCK"));
        assert!(!inherited("HOME"));
    }

    #[test]
    fn root_resolves_with_its_groups() {
        let root = Identity::of_uid(0).unwrap();
        assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
        assert!(root.groups.contains(&0));
    }

    #[test]
    fn a_uid_without_an_account_is_refused() {
        assert!(matches!(
            Identity::of_uid(3_999_999_000),
            Err(IdentityError::NoUser(_))
        ));
    }
}
