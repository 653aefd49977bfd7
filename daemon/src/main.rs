//! `lorad`: the daemon, and its internal `worker`, `demo` and `make-tiny-model` commands.
mod admin;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lorad::config::{default_paths, Config, FileConfig};
use std::io::{Read, Write};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "lorad", version, about = "LoRA fine-tuning daemon")]
struct Cli {
    /// TOML config file (default: ~/.config/lorad/lorad.toml with --user, /etc/lorad/lorad.toml otherwise, if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Socket to listen on.
    #[arg(long, env = "LORAD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// State directory (journal, job logs, adapters).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Directory to load plugins from, after the default ones (repeatable).
    #[arg(long)]
    plugin_dir: Vec<PathBuf>,
    /// Search only the --plugin-dir directories, not the defaults (next to lorad,
    /// <prefix>/lib/lorad/plugins, /etc/lorad/plugins.d, ~/.local/share/lorad/plugins).
    #[arg(long)]
    no_default_plugins: bool,
    /// Detach from the terminal and run in the background; exits 0 once the daemon serves, or non-zero
    /// with the reason if it cannot start.
    #[arg(long)]
    daemonize: bool,
    /// Pid file of a daemonized lorad (default: <state dir>/lorad.pid).
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// Rolling log files in this directory instead of stderr (default when daemonized:
    /// <state dir>/logs; under systemd the journal is used).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, or per module ("lorad=debug"); RUST_LOG wins.
    #[arg(long)]
    log_level: Option<String>,
    /// Check the configuration (file, flags, groups, paths), print it, and exit.
    #[arg(long)]
    check_config: bool,
    /// Run as a per-user daemon ($XDG_RUNTIME_DIR/lorad.sock, $XDG_STATE_HOME/lorad).
    #[arg(long, global = true)]
    user: bool,
    /// The socket's group in system mode (default: lorad); its members may connect.
    #[arg(long)]
    socket_group: Option<String>,
    /// Members of this group may see and control every user's jobs.
    #[arg(long)]
    admin_group: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: train one job, or run one export (started by the daemon with its task on fd 3).
    #[command(hide = true)]
    Worker {
        /// Run an exporter plugin instead of training.
        #[arg(long, conflicts_with = "check")]
        export: bool,
        /// Check a job's files at submit instead of training.
        #[arg(long)]
        check: bool,
        /// Train the task in this directory, reporting to files there (a Slurm job's worker),
        /// instead of over fd 3.
        #[arg(long, conflicts_with_all = ["export", "check"])]
        channel_dir: Option<PathBuf>,
    },
    /// Run a private daemon on a tiny model: submit, watch, print where the adapter is.
    Demo {
        /// Keep the demo's files here instead of a new temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Internal: greedily complete a prompt with a base model (HF dir or GGUF file), for checks and benches.
    #[command(hide = true)]
    Generate {
        /// HF model directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// The user message (rendered with the model's chat template unless --raw).
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_new: usize,
        /// Feed the prompt as-is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// PEFT LoRA adapter directory to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// cpu, auto or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Check the journal: redb's integrity check and every record decoded (the daemon must be stopped).
    Check,
    /// Rebuild a missing, empty or damaged journal from the job directories (the daemon must be stopped).
    RecoverJournal,
    /// Write a consistent copy of the journal into DIR (through the running daemon, or directly).
    Backup {
        /// Directory for the copy (made if missing).
        dir: PathBuf,
    },
    /// Write a random-initialised tiny Llama in HF layout (for tests and the demo).
    MakeTinyModel {
        /// Output directory.
        dir: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // A log line that cannot be written (a full disk under job.log) is dropped, never reported
        // on stderr: that would panic, and a worker must survive its log's disk filling up.
        .log_internal_errors(false)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Worker {
            channel_dir: Some(dir),
            ..
        }) => {
            init_tracing();
            let code = lorad::worker::process::run_in_dir(&dir)?;
            std::process::exit(code);
        }
        Some(Command::Worker { export, check, .. }) => {
            init_tracing();
            use lorad::worker::process::Mode;
            let mode = match (export, check) {
                (true, _) => Mode::Export,
                (_, true) => Mode::Check,
                _ => Mode::Train,
            };
            let code = lorad::worker::process::run(mode)?;
            std::process::exit(code);
        }
        Some(Command::MakeTinyModel { dir, seed }) => {
            lorad::worker::tiny::make_tiny_model(&dir, seed)
                .with_context(|| format!("cannot write the tiny model to {}", dir.display()))?;
            println!("{}", dir.display());
            Ok(())
        }
        Some(Command::Demo { dir }) => lorad::demo::run(dir),
        Some(Command::Check) => {
            let (_, state) = paths(&cli)?;
            std::process::exit(admin::check(&state)?)
        }
        Some(Command::RecoverJournal) => {
            let (_, state) = paths(&cli)?;
            std::process::exit(admin::recover_journal(&state)?)
        }
        Some(Command::Backup { ref dir }) => {
            let (socket, state) = paths(&cli)?;
            std::process::exit(admin::backup(&socket, &state, dir)?)
        }
        Some(Command::Generate {
            model,
            prompt,
            max_new,
            raw,
            adapter,
            device,
        }) => {
            let req = lorad::generate::GenerateRequest {
                model,
                prompt,
                max_new,
                raw,
                adapter,
                device,
            };
            let out = lorad::generate::generate(&req)?;
            println!(
                "--- prompt ({} tokens)\n{}",
                out.prompt_ids.len(),
                out.prompt_text
            );
            println!(
                "--- completion ({} tokens)\n{}",
                out.completion_ids.len(),
                out.completion
            );
            println!("--- prompt ids {:?}", out.prompt_ids);
            println!("--- completion ids {:?}", out.completion_ids);
            println!("--- top5 last-position logits {:?}", out.first_top5);
            println!(
                "--- load {:.1} s, {:.2} tokens/s (greedy, no KV cache)",
                out.load_s, out.tokens_per_s
            );
            Ok(())
        }
        None => serve(cli),
    }
}

/// The config file: `--config`, else the default one for the mode if it exists, else empty.
fn file_config(cli: &Cli) -> anyhow::Result<FileConfig> {
    let config_path = cli.config.clone().or_else(|| {
        let p = if cli.user {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/lorad/lorad.toml"))
        } else {
            Some(PathBuf::from("/etc/lorad/lorad.toml"))
        };
        p.filter(|p| p.exists())
    });
    Ok(match &config_path {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    })
}

/// The socket and state dir the flags (or the config file, or the defaults) name.
fn paths(cli: &Cli) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (default_socket, default_state) = default_paths(cli.user)?;
    let file = file_config(cli)?;
    Ok((
        cli.socket.clone().or(file.socket).unwrap_or(default_socket),
        cli.state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or(default_state),
    ))
}

/// What the daemon runs with, resolved from flags, the config file and defaults: every configuration
/// error surfaces here, before `--daemonize` detaches.
struct Setup {
    config: Config,
    socket_gid: Option<u32>,
    log_dir: Option<PathBuf>,
    log_rotation: lorad::logging::Rotation,
    log_keep: usize,
    log_level: String,
    pidfile: PathBuf,
}

fn setup(cli: &Cli) -> anyhow::Result<Setup> {
    let (default_socket, default_state) = default_paths(cli.user)?;
    let file = file_config(cli)?;
    let socket = cli.socket.clone().or(file.socket).unwrap_or(default_socket);
    let state_dir = cli
        .state_dir
        .clone()
        .or(file.state_dir)
        .unwrap_or(default_state);
    let mut config = Config::new(socket, state_dir);
    if let Some(m) = file.max_frame {
        config.max_frame = m;
    }
    if let Some(g) = file.kill_grace_s {
        config.kill_grace = std::time::Duration::from_secs(g);
    }
    config.system = !cli.user;
    config.socket_mode = file
        .socket_mode
        .unwrap_or(if config.system { 0o660 } else { 0o600 });
    config.socket_group = cli
        .socket_group
        .clone()
        .or(file.socket_group)
        .or_else(|| config.system.then(|| "lorad".to_string()));
    config.admin_group = cli.admin_group.clone().or(file.admin_group);
    config.limits = file.limits.unwrap_or_default();
    config.cpu_slots = file.cpu_slots.unwrap_or(1).max(1);
    config.cpu_threads = file
        .cpu_threads
        .unwrap_or_else(|| lorad::config::default_cpu_threads(config.cpu_slots))
        .max(1);
    config.auto_cpu = file.auto_cpu.unwrap_or(true);
    if let Some(dir) = file.rapl_dir {
        config.rapl_dir = dir;
    }
    config.price_per_kwh = file.price_per_kwh;
    config.price_per_hour = file.price_per_hour;
    config.cpu_memory = file.cpu_memory_gb.map(|gb| (gb * 1e9) as u64);
    config.hooks = file.hooks.unwrap_or_default();
    config.executor = file.executor.unwrap_or_default();
    config.slurm = file.slurm.unwrap_or_default();
    if let Some(p) = config
        .slurm
        .partition
        .as_deref()
        .filter(|p| !lorad_schema::valid_slurm_option(p))
    {
        anyhow::bail!("[slurm] partition = \"{p}\" is not a Slurm partition name");
    }
    if config.executor == lorad::config::Executor::Slurm {
        // Every job that does not choose goes to Slurm: without sbatch none could run.
        lorad::supervisor::slurm::check_sbatch(&config.slurm)
            .map_err(|e| anyhow::anyhow!("executor = \"slurm\" in the config: {e}"))?;
    }
    let socket_gid = match &config.socket_group {
        Some(name) => Some(lorad::config::group_id(name)?),
        None => None,
    };
    let mut plugin_dirs = file.plugin_dirs.unwrap_or_default();
    plugin_dirs.extend(cli.plugin_dir.iter().cloned());
    let defaults = !cli.no_default_plugins && file.default_plugins.unwrap_or(true);
    config.set_plugin_dirs(defaults, &plugin_dirs);
    let layout = config.layout();
    let log_dir = cli.log_dir.clone().or(file.log_dir);
    Ok(Setup {
        log_dir: log_dir.or_else(|| cli.daemonize.then(|| layout.logs())),
        log_rotation: file.log_rotation.unwrap_or_default(),
        log_keep: file.log_keep.unwrap_or(7),
        log_level: cli
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".into()),
        pidfile: cli
            .pidfile
            .clone()
            .or(file.pidfile)
            .unwrap_or_else(|| layout.pidfile()),
        config,
        socket_gid,
    })
}

fn serve(cli: Cli) -> anyhow::Result<()> {
    let mut setup = setup(&cli)?;
    if cli.check_config {
        let c = &setup.config;
        println!(
            "config ok: socket {} (mode {:o}, group {}), state dir {}, {} plugin dirs, log {}",
            c.socket.display(),
            c.socket_mode,
            c.socket_group.as_deref().unwrap_or("-"),
            c.state_dir.display(),
            c.plugin_dirs.len(),
            setup
                .log_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "stderr".into())
        );
        return Ok(());
    }
    // The socket systemd passed, if any: read before anything forks or starts a thread.
    let activated = lorad::systemd::activated_listener()?;
    let ready_pipe = match cli.daemonize {
        true => Some(daemonize(&setup)?),
        false => None,
    };
    // From here on a start-up failure of a daemonized lorad goes to the waiting parent too.
    let pipe = std::sync::Mutex::new(ready_pipe);
    let result = run_daemon(&mut setup, activated, &pipe);
    if let Err(e) = &result {
        tell_parent(&pipe, &format!("error: {e:#}"));
    }
    result
}

/// Sets up logging and the runtime, takes or binds the socket, and runs the daemon until it stops.
fn run_daemon(
    setup: &mut Setup,
    activated: Option<(std::os::fd::OwnedFd, Option<PathBuf>)>,
    pipe: &std::sync::Mutex<Option<std::fs::File>>,
) -> anyhow::Result<()> {
    let target = lorad::logging::target(
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        lorad::logging::stderr_dev_ino(),
        setup.log_dir.clone(),
        setup.log_rotation,
        setup.log_keep,
    );
    let _log_guard = lorad::logging::init(&target, &setup.log_level)
        .with_context(|| format!("cannot open the log ({target:?})"))?;
    // What the daemon creates is its own unless it says otherwise (job dirs, logs, the journal).
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let config = &mut setup.config;
    lorad::server::raise_fd_limit(&mut config.limits);
    let mut config = config.clone();
    let socket_gid = setup.socket_gid;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // A socket from systemd is systemd's: its mode and group come from lorad.socket, and it is
        // never unlinked here.
        let (listener, ours) = match activated {
            Some((fd, path)) => {
                if let Some(path) = path {
                    config.socket = path;
                }
                tracing::info!(socket = %config.socket.display(), "listening on the socket systemd passed");
                (lorad::server::from_activation(fd)?, false)
            }
            None => {
                let l = lorad::server::bind(&config.socket, config.socket_mode, socket_gid)
                    .with_context(|| format!("cannot listen on {}", config.socket.display()))?;
                (l, true)
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signals(shutdown.clone()));
        let socket = config.socket.clone();
        let on_ready = || tell_parent(pipe, "ready");
        let result = lorad::run_with(config, listener, shutdown, on_ready).await;
        if ours {
            let _ = std::fs::remove_file(&socket);
        }
        result.map_err(anyhow::Error::from)
    })
}

/// Detaches (double fork, new session, pid file). The parent waits for the daemon's word on the pipe
/// and exits 0 once it serves, or 1 with its reason; only the daemon returns, with the pipe's write end.
fn daemonize(setup: &Setup) -> anyhow::Result<std::fs::File> {
    let state_dir = &setup.config.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot make the state dir {}", state_dir.display()))?;
    // Refused here, with the owner named, rather than after detaching (the daemon checks again).
    drop(lorad::statelock::StateLock::acquire(state_dir)?);
    let log_dir = setup
        .log_dir
        .clone()
        .unwrap_or_else(|| setup.config.layout().logs());
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("cannot make the log dir {}", log_dir.display()))?;
    // What escapes tracing (a panic message) lands next to the log, not in /dev/null.
    let stderr = {
        use std::os::unix::fs::OpenOptionsExt;
        let path = log_dir.join("lorad.stderr");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?
    };
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let outcome = daemonize::Daemonize::new()
        .pid_file(&setup.pidfile)
        .working_directory("/")
        .umask(0o077)
        .stderr(stderr)
        .execute();
    match outcome {
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(write);
            std::process::exit(wait_for_daemon(std::fs::File::from(read), &log_dir))
        }
        daemonize::Outcome::Parent(Err(e)) => anyhow::bail!("cannot daemonize: {e}"),
        daemonize::Outcome::Child(Ok(_)) => {
            drop(read);
            Ok(std::fs::File::from(write))
        }
        daemonize::Outcome::Child(Err(e)) => {
            let mut write = std::fs::File::from(write);
            let pidfile = setup.pidfile.display();
            let _ = writeln!(write, "error: cannot daemonize (pid file {pidfile}): {e}");
            std::process::exit(1)
        }
    }
}

/// The parent of `--daemonize`: reads the daemon's one line ("ready" or "error: ...") and returns the
/// exit code.
fn wait_for_daemon(mut pipe: std::fs::File, log_dir: &std::path::Path) -> i32 {
    let mut said = String::new();
    let _ = pipe.read_to_string(&mut said);
    match said.lines().next() {
        Some("ready") => 0,
        Some(line) => {
            eprintln!("lorad: {}", line.strip_prefix("error: ").unwrap_or(line));
            1
        }
        None => {
            eprintln!(
                "lorad: the daemon exited during start-up; see the log in {}",
                log_dir.display()
            );
            1
        }
    }
}

/// Sends `line` to the waiting `--daemonize` parent, once; then the pipe is closed.
fn tell_parent(pipe: &std::sync::Mutex<Option<std::fs::File>>, line: &str) {
    let taken = pipe.lock().map(|mut p| p.take()).unwrap_or(None);
    if let Some(mut f) = taken {
        let _ = writeln!(f, "{line}");
    }
}

async fn on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
