//! The systemd units in systemd/: `systemd-analyze verify` accepts every one of them with the binary
//! they name in place, each socket listens where the daemon of its mode looks by default, and every
//! setting of the system service says why it is there.
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the units expect lorad to be installed.
const INSTALLED: &str = "/usr/local/bin/lorad";

/// Sandbox settings the system service must keep (each with its reason, checked below).
const HARDENING: [&str; 25] = [
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "PrivateUsers",
    "PrivateDevices",
    "DevicePolicy",
    "DeviceAllow",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "RestrictAddressFamilies",
    "SystemCallArchitectures",
    "SystemCallFilter",
    "UMask",
];

/// The repository's systemd/ directory (system units; user units in its user/).
fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// The `*.service` and `*.socket` files directly in `dir`, sorted.
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "service" || e == "socket")
        })
        .collect();
    units.sort();
    units
}

/// `systemd-analyze` on PATH or in the usual places (a test's PATH may be minimal); `None` prints the
/// skip line.
fn systemd_analyze() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|p| p.is_file());
    if found.is_none() {
        println!("skipped: systemd-analyze not installed");
    }
    found
}

/// The value of every `key=` line of `unit`, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Copies `units` into a temp dir with the installed lorad path replaced by this build's lorad (so
/// the executable they name exists), runs `systemd-analyze [--user] verify` on the copies and fails
/// on a non-zero exit or on any line of output about them: systemd-analyze exits 0 after warnings
/// such as an unknown setting, and names the unit file in each.
fn verify(units: &[PathBuf], user: bool) {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    assert!(!units.is_empty(), "no units found");
    let dir = tempfile::Builder::new().prefix("units-").tempdir().unwrap();
    let binary = lorad_tests::bin("lorad");
    // '%' starts a specifier in a unit file.
    let binary = binary.to_str().unwrap().replace('%', "%%");
    let copies: Vec<PathBuf> = units
        .iter()
        .map(|unit| {
            let copy = dir.path().join(unit.file_name().unwrap());
            std::fs::write(&copy, read(unit).replace(INSTALLED, &binary)).unwrap();
            copy
        })
        .collect();
    let mut cmd = Command::new(&analyze);
    if user {
        // A user manager, even systemd-analyze's offline one, needs $XDG_RUNTIME_DIR (for %t); a
        // private HOME keeps the caller's own user units out of the check.
        let runtime = dir.path().join("runtime");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::create_dir(&runtime).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
        cmd.arg("--user")
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("HOME", &home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_STATE_HOME");
    }
    let out = cmd
        .args(["verify", "--man=no", "--generators=no"])
        .args(&copies)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("lorad") || l.contains(&*dir.path().to_string_lossy()))
        .collect();
    // Anything else is about the host's own units: shown, not judged.
    if !text.trim().is_empty() {
        println!("systemd-analyze said:\n{text}");
    }
    assert!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze {}verify {:?}: {}\n{}",
        if user { "--user " } else { "" },
        units,
        out.status,
        text
    );
}

#[test]
fn system_units_pass_systemd_analyze_verify() {
    verify(&units_in(&units_dir()), false);
}

#[test]
fn user_units_pass_systemd_analyze_verify() {
    verify(&units_in(&units_dir().join("user")), true);
}

#[test]
fn each_socket_listens_where_the_daemon_of_its_mode_binds_by_default() {
    // In a user manager %t is $XDG_RUNTIME_DIR: give the daemon's default one to expand it with.
    // (Rust serializes this with the other tests' reads of the environment.)
    let runtime = "/run/user/4242";
    std::env::set_var("XDG_RUNTIME_DIR", runtime);
    for (user, dir) in [(false, units_dir()), (true, units_dir().join("user"))] {
        let socket = read(&dir.join("lorad.socket"));
        let listen = values(&socket, "ListenStream");
        assert_eq!(listen.len(), 1, "{}: one ListenStream=", dir.display());
        let listen = match listen[0].strip_prefix("%t/") {
            Some(rest) if user => Path::new(runtime).join(rest),
            _ => PathBuf::from(listen[0]),
        };
        let (default_socket, _) = lorad::config::default_paths(user).unwrap();
        assert_eq!(listen, default_socket, "{}/lorad.socket", dir.display());

        // The service that socket starts runs lorad in the same mode.
        let service = read(&dir.join("lorad.service"));
        let exec = values(&service, "ExecStart");
        assert_eq!(exec.len(), 1, "{}: one ExecStart=", dir.display());
        let args: Vec<&str> = exec[0].split_whitespace().collect();
        assert_eq!(args[0], INSTALLED);
        assert_eq!(args[1..].contains(&"--user"), user, "{}", exec[0]);
    }
}

/// The key a `Key=value` line sets.
fn key_of(line: &str) -> Option<&str> {
    let line = line.trim();
    if line.starts_with('#') || line.starts_with('[') {
        return None;
    }
    line.split_once('=').map(|(k, _)| k.trim())
}

#[test]
fn every_setting_of_the_system_service_says_why() {
    let text = read(&units_dir().join("lorad.service"));
    let lines: Vec<&str> = text.lines().collect();
    let mut section = "";
    let mut keys = Vec::new();
    let mut unexplained = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with('[') {
            section = line.trim();
            continue;
        }
        let Some(key) = key_of(line) else { continue };
        if section != "[Service]" {
            continue;
        }
        keys.push(key);
        // A comment directly above, or above the run of lines setting the same key (one comment
        // for a list, like the DeviceAllow= lines).
        let mut above = i;
        while above > 0 && key_of(lines[above - 1]) == Some(key) {
            above -= 1;
        }
        let explained = above > 0
            && lines[above - 1]
                .trim()
                .strip_prefix('#')
                .is_some_and(|c| !c.trim().is_empty());
        if !explained {
            unexplained.push(format!("line {}: {line}", i + 1));
        }
    }
    assert!(
        unexplained.is_empty(),
        "lorad.service: settings without a comment saying why:\n{}",
        unexplained.join("\n")
    );
    let missing: Vec<&str> = HARDENING
        .into_iter()
        .filter(|k| !keys.contains(k))
        .collect();
    assert!(missing.is_empty(), "lorad.service lacks {missing:?}");
}
