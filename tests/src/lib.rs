//! Test support: a real `lorad` daemon in a temp dir, and the files a job needs.
//!
//! [`TestDaemon`] starts the `lorad` binary built by this workspace on a temp socket and state dir,
//! waits until it answers, and kills it on drop. Tests drive it through `lorad-client`, as users do.
use lorad_client::blocking::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A binary of this workspace (`lorad`, `loractl`): `$LORAD_BIN_DIR/<name>`, or next to the test
/// executable's `deps/` directory (where `cargo test` puts the workspace's binaries).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("LORAD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// The plugins bundled with lorad, as cargo names their libraries.
pub const BUNDLED_PLUGINS: [&str; 4] = [
    "lorad_templates",
    "lorad_export_peft",
    "lorad_export_merged",
    "lorad_export_zip",
];

/// The library `lib<name>.so` of a plugin crate of this workspace: the newer of `target/<profile>/`
/// (where `cargo build` puts it) and `target/<profile>/deps/` (where `cargo test` leaves it).
pub fn plugin_lib(name: &str) -> PathBuf {
    let file = format!("lib{name}.so");
    let dir = bin("lorad")
        .parent()
        .map(Path::to_path_buf)
        .expect("target dir");
    let candidates = [dir.join(&file), dir.join("deps").join(&file)];
    candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!("{file} is not built; run the tests with `cargo test --workspace`")
        })
}

/// SIGTERM to `child`, then wait for it (up to 30 s, then SIGKILL).
pub fn stop_child(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits until a daemon started as `child` answers `status` on `socket`; `Err` says how it did not
/// ("exited during start (...)", "did not answer within ...").
pub fn wait_until_serving(
    socket: &Path,
    child: &mut Child,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(c) = Client::connect(socket) {
            if c.status().is_ok() {
                return Ok(());
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited during start ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!("did not answer within {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running daemon owned by a test.
pub struct TestDaemon {
    /// Holds the socket, state dir and anything else the test writes.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
}

impl TestDaemon {
    /// Starts a daemon in a new temp dir.
    pub fn start() -> TestDaemon {
        Self::start_with_env(&[])
    }

    /// Starts a daemon whose environment (and so its workers') has these extra variables.
    pub fn start_with_env(env: &[(&str, &str)]) -> TestDaemon {
        Self::start_with(env, &BUNDLED_PLUGINS)
    }

    /// Starts a daemon with the bundled plugins and this `lorad.toml` (written into its dir).
    pub fn start_with_config(toml: &str) -> TestDaemon {
        Self::start_full(&[], &BUNDLED_PLUGINS, Some(toml))
    }

    /// Starts a daemon with extra environment variables and only these plugins (library names as in
    /// [`plugin_lib`]), linked into its private plugin dir ([`TestDaemon::plugin_dir`]).
    pub fn start_with(env: &[(&str, &str)], plugins: &[&str]) -> TestDaemon {
        Self::start_full(env, plugins, None)
    }

    fn start_full(env: &[(&str, &str)], plugins: &[&str], toml: Option<&str>) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("lorad-test-")
            .tempdir()
            .expect("tempdir");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = toml.map(|text| {
            let path = dir.path().join("lorad.toml");
            std::fs::write(&path, text).expect("lorad.toml");
            path
        });
        let d = TestDaemon {
            dir,
            child: None,
            env,
            config,
        };
        std::fs::create_dir_all(d.plugin_dir()).expect("plugin dir");
        for name in plugins {
            d.add_plugin(name);
        }
        let mut d = d;
        d.restart();
        d
    }

    /// The daemon's only plugin directory (`--no-default-plugins --plugin-dir`).
    pub fn plugin_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// Links the plugin library `name` (see [`plugin_lib`]) into the plugin dir; a running daemon sees
    /// it after [`TestDaemon::sighup`].
    pub fn add_plugin(&self, name: &str) -> PathBuf {
        let link = self.plugin_dir().join(format!("lib{name}.so"));
        std::os::unix::fs::symlink(plugin_lib(name), &link).expect("link plugin");
        link
    }

    /// Sends SIGHUP: the daemon rescans its plugin dirs (asynchronously; poll `status`).
    pub fn sighup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP");
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("lorad.sock")
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("daemon not running")
    }

    /// Starts the daemon (again) on the same socket and state dir, and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon.log");
        let mut cmd = Command::new(bin("lorad"));
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .arg("--user")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--no-default-plugins")
            .arg("--plugin-dir")
            .arg(self.plugin_dir())
            .env("RUST_LOG", "lorad=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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
            panic!("lorad {why}; log:\n{}", self.daemon_log());
        }
    }

    /// A new client connection.
    pub fn client(&self) -> Client {
        Client::connect(self.socket()).expect("connect")
    }

    /// `kill -9` of the daemon (its workers notice and exit by themselves).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (up to 30 s, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_child(child);
        }
    }

    /// The daemon's own log so far (for assertion messages).
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tiny model, made once per test process with `lorad make-tiny-model` (seed 0).
pub fn tiny_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = MODEL.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("lorad-tiny-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("tiny-model");
        let out = Command::new(bin("lorad"))
            .arg("make-tiny-model")
            .arg(&path)
            .output()
            .expect("make-tiny-model");
        assert!(
            out.status.success(),
            "make-tiny-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, path)
    });
    path
}

/// The first `lines` lines of the demo's dataset (`{"text"}` JSONL), the dataset of the tests.
pub fn write_dataset(path: &Path, lines: usize) {
    lorad::demo::write_dataset(path, lines).expect("write dataset");
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state is the field after the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

pub mod system;
