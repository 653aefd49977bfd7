//! Which plugin files a system daemon may load: a plugin runs inside the root daemon (its descriptive
//! calls) and inside every user's workers, so only files that nobody but root (or the daemon's own user)
//! could have written are loaded. That holds for the file, the directory it is found in, and every
//! directory above both, following links to where the file really is.
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A directory or file is safe when its owner is root or `daemon_uid`, and neither its group nor others
/// may write it; a sticky directory owned by root (like /tmp) is safe to pass through, since no one
/// can replace what another user put there.
pub fn safe_mode(owner: u32, mode: u32, is_dir: bool, daemon_uid: u32) -> Result<(), String> {
    if owner != 0 && owner != daemon_uid {
        return Err(format!("owned by uid {owner}, not by root"));
    }
    let writable = mode & 0o022 != 0;
    let sticky = is_dir && mode & 0o1000 != 0 && owner == 0;
    if writable && !sticky {
        return Err(format!(
            "writable by {} (mode {:04o})",
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Checks `path` and every directory above it. The sticky exception holds only above the plugin's
/// own directory: in a sticky world-writable directory anyone may add a link or a file, so it cannot
/// hold plugins itself.
fn check_chain(path: &Path, daemon_uid: u32, own_dir: &Path) -> Result<(), String> {
    for p in path.ancestors() {
        if p.as_os_str().is_empty() {
            continue;
        }
        let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let sticky_ok = meta.is_dir() && p != own_dir;
        let mode = if sticky_ok {
            meta.mode()
        } else {
            meta.mode() & !0o1000
        };
        safe_mode(meta.uid(), mode, meta.is_dir(), daemon_uid)
            .map_err(|why| format!("{} is {why}", p.display()))?;
    }
    Ok(())
}

/// Whether the plugin directory `dir` may be searched in system mode.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let uid = nix::unistd::geteuid().as_raw();
    check_chain(dir, uid, dir)?;
    let real = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    check_chain(&real, uid, &real)
}

/// Whether the plugin file `file` (found in a checked directory) may be loaded in system mode.
pub fn check_file(file: &Path) -> Result<(), String> {
    let uid = nix::unistd::geteuid().as_raw();
    let real = file
        .canonicalize()
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let own_dir = real.parent().unwrap_or(Path::new("/"));
    check_chain(&real, uid, own_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_owned_unwritable_places_are_safe() {
        assert!(safe_mode(0, 0o755, true, 0).is_ok());
        assert!(safe_mode(0, 0o644, false, 0).is_ok());
        assert!(safe_mode(990, 0o755, true, 990).is_ok());
        assert!(safe_mode(1000, 0o755, true, 0)
            .unwrap_err()
            .contains("owned by uid 1000"));
        assert!(safe_mode(0, 0o777, true, 0)
            .unwrap_err()
            .contains("everyone"));
        assert!(safe_mode(0, 0o775, true, 0)
            .unwrap_err()
            .contains("its group"));
        assert!(safe_mode(0, 0o1777, true, 0).is_ok());
        assert!(safe_mode(0, 0o1777, false, 0).is_err());
        assert!(safe_mode(1000, 0o1777, true, 0).is_err());
    }

    #[test]
    fn a_world_writable_directory_is_refused_with_its_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir(&plugins).unwrap_err();
        assert!(
            e.contains(&plugins.display().to_string()) && e.contains("everyone"),
            "{e}"
        );
    }
}
