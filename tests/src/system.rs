//! System-mode test support: throwaway users and groups, and a `lorad` started as root in system mode.
//!
//! [`TestGroup`] and [`TestUser`] create real accounts (`groupadd`, `useradd`) and delete them on drop,
//! also when the test panics. [`SystemDaemon`] starts `lorad` as root without `--user` (optionally under
//! a umask or a file-descriptor limit), waits until it answers, and stops it on drop. Tests act as an
//! unprivileged user with [`TestUser::loractl`] (`runuser -u USER -- loractl ...`), since the client
//! library always connects as the test process (root, an admin).
//!
//! Declare the group first, the users next and the daemon last: locals drop in reverse order, so the
//! daemon (and its workers, which run as the users) is gone before `userdel` runs.
use crate::{
    bin, plugin_lib, stop_child, tiny_model, wait_until_serving, write_dataset, BUNDLED_PLUGINS,
};
use lorad_client::blocking::Client;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Whether the tests run as root (they create users, so system-mode tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True as root; otherwise prints the skip line and returns false (the test then returns).
pub fn root_or_skip() -> bool {
    if is_root() {
        return true;
    }
    println!("skipped: needs root (creates users)");
    false
}

/// Holds the system-mode tests of this process one at a time: they measure latencies and memory of
/// their daemon, and create accounts.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `useradd` and friends lock /etc/passwd and /etc/group; one at a time within this process.
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// A name no other test of any run on this host has now: `lt<pid % 100000><tag><n>`.
fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "lt{}{tag}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs an account tool; retries while another process holds the account files' locks. Err carries the
/// exit code and stderr.
fn account_tool(tool: &str, args: &[&str]) -> Result<(), (Option<i32>, String)> {
    let _lock = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = (None, String::new());
    for _ in 0..50 {
        let out = Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        last = (out.status.code(), stderr.clone());
        // "cannot lock /etc/passwd; try again later" (and the like) is worth a retry; the rest is not.
        if !stderr.contains("lock") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

/// A Unix group created for one test (`groupadd`), deleted on drop.
pub struct TestGroup {
    /// Its name.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl TestGroup {
    /// Creates a new group with a unique name.
    pub fn new() -> TestGroup {
        loop {
            let name = unique_name("g");
            match account_tool("groupadd", &[&name]) {
                Ok(()) => {
                    let gid = nix::unistd::Group::from_name(&name)
                        .expect("getgrnam")
                        .unwrap_or_else(|| panic!("group {name} missing right after groupadd"))
                        .gid
                        .as_raw();
                    return TestGroup { name, gid };
                }
                // 9: the name is taken (left over from a crashed run); try the next one.
                Err((Some(9), _)) => continue,
                Err((code, stderr)) => panic!("groupadd {name} failed ({code:?}): {stderr}"),
            }
        }
    }
}

impl Default for TestGroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if let Err((code, stderr)) = account_tool("groupdel", &[&self.name]) {
            eprintln!(
                "warning: groupdel {} failed ({code:?}): {stderr}",
                self.name
            );
        }
    }
}

/// A Unix user created for one test (`useradd -M -U`: no home, its own primary group), deleted on drop.
pub struct TestUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary (own) group's gid.
    pub gid: u32,
}

impl TestUser {
    /// Creates a new user, a member of `groups` besides its own group.
    pub fn new(groups: &[&TestGroup]) -> TestUser {
        let extra = groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        loop {
            let name = unique_name("u");
            let mut args = vec!["-M", "-U", "-s", "/usr/sbin/nologin"];
            if !extra.is_empty() {
                args.extend(["-G", extra.as_str()]);
            }
            args.push(&name);
            match account_tool("useradd", &args) {
                Ok(()) => {
                    let user = nix::unistd::User::from_name(&name)
                        .expect("getpwnam")
                        .unwrap_or_else(|| panic!("user {name} missing right after useradd"));
                    return TestUser {
                        uid: user.uid.as_raw(),
                        gid: user.gid.as_raw(),
                        name,
                    };
                }
                Err((Some(9), _)) => continue,
                Err((code, stderr)) => panic!("useradd {name} failed ({code:?}): {stderr}"),
            }
        }
    }

    /// `runuser -u <user> -- <program>`: the program as this user, with its groups; cwd `/`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.arg("-u")
            .arg(&self.name)
            .arg("--")
            .arg(program)
            .current_dir("/")
            .stdin(Stdio::null());
        cmd
    }

    /// `loractl --socket <socket> <args>` as this user (waits for it).
    pub fn loractl(&self, socket: &Path, args: &[&str]) -> Output {
        self.command(bin("loractl"))
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .expect("run loractl through runuser")
    }

    /// Gives `path` (only it, not what is inside) to this user and its group.
    pub fn chown(&self, path: &Path) {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }

    /// Gives `path` and everything under it to this user.
    pub fn chown_r(&self, path: &Path) {
        self.chown(path);
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(path).expect("read_dir") {
                self.chown_r(&entry.expect("dir entry").path());
            }
        }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // userdel refuses (exit 8) while a process of the user runs: workers may take a moment to exit
        // after their daemon stopped.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match account_tool("userdel", &[&self.name]) {
                Ok(()) => break,
                Err((Some(8), _)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err((code, stderr)) => {
                    eprintln!("warning: userdel {} failed ({code:?}): {stderr}", self.name);
                    let _ = account_tool("userdel", &["-f", &self.name]);
                    break;
                }
            }
        }
        // userdel removes the user's own group with USERGROUPS_ENAB; this covers hosts without it.
        if nix::unistd::Group::from_name(&self.name)
            .ok()
            .flatten()
            .is_some()
        {
            let _ = account_tool("groupdel", &[&self.name]);
        }
    }
}

/// How to start a [`SystemDaemon`].
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// `--socket-group`.
    pub socket_group: String,
    /// `--admin-group`.
    pub admin_group: Option<String>,
    /// Text of a TOML config file passed with `--config`.
    pub config: Option<String>,
    /// Start through `prlimit --nofile=N:N`.
    pub nofile: Option<u64>,
    /// Start through `sh -c 'umask M; exec ...'`.
    pub umask: Option<u32>,
    /// More `--plugin-dir`s, after the daemon's own (bundled plugins) dir.
    pub extra_plugin_dirs: Vec<PathBuf>,
}

impl SystemOptions {
    /// Socket group `group`, nothing else.
    pub fn new(group: &TestGroup) -> SystemOptions {
        SystemOptions {
            socket_group: group.name.clone(),
            admin_group: None,
            config: None,
            nofile: None,
            umask: None,
            extra_plugin_dirs: Vec::new(),
        }
    }
}

/// A system-mode daemon (root, no `--user`) owned by a test, in a temp dir every user may traverse.
pub struct SystemDaemon {
    /// Holds the socket, state dir, plugin dir, config and whatever the test writes (mode 0755).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SystemDaemon {
    /// A temp dir (0755) with a root-owned plugin dir linking the bundled plugins; not started yet.
    pub fn new() -> SystemDaemon {
        let dir = tempfile::Builder::new()
            .prefix("lorad-sys-")
            .tempdir()
            .expect("tempdir");
        set_mode(dir.path(), 0o755);
        let d = SystemDaemon { dir, child: None };
        std::fs::create_dir_all(d.plugin_dir()).expect("plugin dir");
        set_mode(&d.plugin_dir(), 0o755);
        for name in BUNDLED_PLUGINS {
            d.add_plugin(name);
        }
        d
    }

    /// [`SystemDaemon::new`], then [`SystemDaemon::start`].
    pub fn started(opts: &SystemOptions) -> SystemDaemon {
        let mut d = SystemDaemon::new();
        d.start(opts);
        d
    }

    /// Starts the daemon and waits until it answers `status`; panics with its log if it does not.
    pub fn start(&mut self, opts: &SystemOptions) {
        if let Err(log) = self.try_start(opts) {
            panic!("lorad (system mode) did not start; log:\n{log}");
        }
    }

    /// Starts the daemon and waits (30 s at most) until it answers `status`; Err(its log) if it
    /// exits first.
    pub fn try_start(&mut self, opts: &SystemOptions) -> Result<(), String> {
        assert!(self.child.is_none(), "daemon already running");
        let mut argv: Vec<OsString> = vec![
            bin("lorad").into(),
            "--socket".into(),
            self.socket().into(),
            "--state-dir".into(),
            self.state_dir().into(),
            "--no-default-plugins".into(),
            "--plugin-dir".into(),
            self.plugin_dir().into(),
        ];
        for extra in &opts.extra_plugin_dirs {
            argv.extend(["--plugin-dir".into(), extra.into()]);
        }
        argv.extend(["--socket-group".into(), opts.socket_group.clone().into()]);
        if let Some(admin) = &opts.admin_group {
            argv.extend(["--admin-group".into(), admin.into()]);
        }
        if let Some(text) = &opts.config {
            let path = self.dir.path().join("lorad.toml");
            std::fs::write(&path, text).expect("write config");
            argv.extend(["--config".into(), path.into()]);
        }
        if let Some(n) = opts.nofile {
            let mut wrapped: Vec<OsString> = vec![
                "prlimit".into(),
                format!("--nofile={n}:{n}").into(),
                "--".into(),
            ];
            wrapped.extend(argv);
            argv = wrapped;
        }
        let mut cmd = match opts.umask {
            Some(mask) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(format!("umask {mask:03o}; exec \"$@\""))
                    .arg("sh")
                    .args(&argv);
                cmd
            }
            None => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("daemon.log");
        // sh and prlimit exec lorad, so the child's pid is the daemon's.
        let child = cmd
            .env("RUST_LOG", "lorad=debug,info")
            .env_remove("LORAD_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn lorad");
        self.child = Some(child);
        let socket = self.socket();
        let started = match self.child.as_mut() {
            Some(child) => wait_until_serving(&socket, child, Duration::from_secs(30)),
            None => Ok(()),
        };
        if let Err(why) = started {
            if why.starts_with("exited") {
                self.child = None;
            } else {
                self.stop();
            }
            return Err(format!("{why}\n{}", self.daemon_log()));
        }
        Ok(())
    }

    /// The daemon's first plugin dir (root-owned, 0755).
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// Links the plugin library `name` (see [`plugin_lib`]) into the plugin dir.
    pub fn add_plugin(&self, name: &str) -> PathBuf {
        let link = self.plugin_dir().join(format!("lib{name}.so"));
        std::os::unix::fs::symlink(plugin_lib(name), &link).expect("link plugin");
        link
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("lorad.sock")
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `<state_dir>/jobs/<id>`.
    pub fn job_dir(&self, id: impl std::fmt::Display) -> PathBuf {
        self.state_dir().join("jobs").join(id.to_string())
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("daemon not running")
    }

    /// A new client connection (as the test process: root, an admin).
    pub fn client(&self) -> Client {
        Client::connect(self.socket()).expect("connect")
    }

    /// SIGTERM and wait (up to 30 s, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The daemon's own log so far (for assertion messages).
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A copy of the tiny model every user can read: `<dir>/model` (0755, files 0644).
    pub fn model(&self) -> PathBuf {
        let path = self.dir.path().join("model");
        if !path.exists() {
            copy_dir(tiny_model(), &path);
        }
        path
    }

    /// `lines` lines of the test dataset at `<dir>/<name>`, readable by everyone.
    pub fn dataset(&self, name: &str, lines: usize) -> PathBuf {
        let path = self.dir.path().join(name);
        write_dataset(&path, lines);
        set_mode(&path, 0o644);
        path
    }

    /// `<dir>/home-<user>`: a directory of `user`'s own, mode 0700.
    pub fn home(&self, user: &TestUser) -> PathBuf {
        let path = self.dir.path().join(format!("home-{}", user.name));
        std::fs::create_dir_all(&path).expect("mkdir home");
        set_mode(&path, 0o700);
        user.chown(&path);
        path
    }
}

impl Default for SystemDaemon {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SystemDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// chmod.
pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// Copies a directory tree of regular files; dirs 0755, files 0644.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    set_mode(to, 0o755);
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
            set_mode(&target, 0o644);
        }
    }
}

/// What a file or directory looked like: mode, owner, size, modification time and contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// st_mode.
    pub mode: u32,
    /// st_uid.
    pub uid: u32,
    /// st_size.
    pub size: u64,
    /// mtime, ns since the epoch (a directory's changes when an entry is added or removed).
    pub mtime_ns: i128,
    /// A regular file's bytes.
    pub contents: Option<Vec<u8>>,
}

/// Every entry at and under `path` (not following symlinks), keyed by path; missing entries are absent.
pub fn snapshot(path: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    snapshot_into(path, &mut out);
    out
}

fn snapshot_into(path: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    let contents = meta
        .file_type()
        .is_file()
        .then(|| std::fs::read(path).ok())
        .flatten();
    out.insert(
        path.to_path_buf(),
        Entry {
            mode: meta.mode(),
            uid: meta.uid(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            contents,
        },
    );
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                snapshot_into(&entry.path(), out);
            }
        }
    }
}

/// Every path at and under `path` with its owner uid (entries that vanish while walking are skipped).
pub fn owners(path: &Path) -> Vec<(PathBuf, u32)> {
    snapshot(path)
        .into_iter()
        .map(|(p, e)| (p, e.uid))
        .collect()
}

/// A field of /proc/<pid>/status ("Uid", "VmRSS"), the text after the colon, trimmed.
pub fn proc_status(pid: u32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == field).then(|| value.trim().to_string())
    })
}

/// A /proc/<pid>/status memory field ("VmRSS", "VmHWM") in KiB.
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    let value = proc_status(pid, field).unwrap_or_else(|| panic!("no {field} for pid {pid}"));
    value
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{field}: {value}"))
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS (`echo 5 > /proc/<pid>/clear_refs`);
/// false where the kernel does not allow it.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The 99th percentile (nearest rank) of `samples`.
pub fn p99(samples: &[Duration]) -> Duration {
    assert!(!samples.is_empty(), "no samples");
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (sorted.len() * 99).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Runs `cmd` to completion, but at most `limit`: Err(elapsed) (after SIGKILL of the process it
/// started) when it takes longer. Ok((output, elapsed)) otherwise.
pub fn output_within(mut cmd: Command, limit: Duration) -> Result<(Output, Duration), Duration> {
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok((out.expect("wait"), start.elapsed())),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = rx.recv_timeout(Duration::from_secs(5));
            Err(start.elapsed())
        }
    }
}
