//! `lorad-hog --socket S --idle N --slow M --seconds T [--until-stdin-eof]`: holds connections to a
//! lorad socket to see whether other clients are still served (tests/integration/security.rs).
//!
//! - N idle connections: each sends `hello`, gets `welcome`, then stays silent.
//! - M slow connections, each announcing a 1 KiB frame (`--announce BYTES` for another size) and then sending 1 byte of it per second: the
//!   even ones before the handshake (the hello frame itself is slow), the odd ones after it (a slow
//!   request).
//!
//! The slow ones are opened first, so a per-user cap on connections leaves room for them.
//! Connections the daemon refuses (a full backlog, an `error` handshake, a close) are counted, not
//! retried. Prints `ready ...` once everything is opened, then `done ...` and exits after T seconds, or
//! as soon as stdin closes with `--until-stdin-eof`. Uses only lorad-schema's wire types.
use lorad_schema::frame::{decode, encode, frame_bytes, read_frame, FrameError};
use lorad_schema::{Handshake, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    socket: PathBuf,
    idle: usize,
    slow: usize,
    announce: u32,
    seconds: u64,
    until_stdin_eof: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        socket: PathBuf::new(),
        idle: 0,
        slow: 0,
        announce: 1024,
        seconds: 60,
        until_stdin_eof: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--socket" => args.socket = PathBuf::from(value()?),
            "--idle" => args.idle = number(value()?)? as usize,
            "--slow" => args.slow = number(value()?)? as usize,
            "--seconds" => args.seconds = number(value()?)?,
            "--announce" => {
                args.announce = u32::try_from(number(value()?)?).map_err(|e| e.to_string())?
            }
            "--until-stdin-eof" => args.until_stdin_eof = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.socket.as_os_str().is_empty() {
        return Err("--socket is required".into());
    }
    Ok(args)
}

/// Why a connection did not open.
enum Refused {
    /// This process ran out of file descriptors (not the daemon's doing).
    Local,
    /// The daemon's backlog was full, it closed the connection, or it answered with an error.
    ByDaemon,
}

/// A non-blocking connect (a full backlog is EAGAIN, not a hang), then a blocking stream.
fn connect(path: &Path) -> Result<UnixStream, Refused> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| match e {
        nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE => Refused::Local,
        _ => Refused::ByDaemon,
    })?;
    let addr = UnixAddr::new(path).map_err(|_| Refused::Local)?;
    connect(fd.as_raw_fd(), &addr).map_err(|_| Refused::ByDaemon)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(|_| Refused::Local)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .map_err(|_| Refused::Local)?;
    Ok(stream)
}

fn hello() -> Vec<u8> {
    let msg = Handshake::Hello {
        protocol: PROTOCOL_VERSION,
        client: "hog".into(),
    };
    frame_bytes(&encode(&msg).expect("encode hello")).expect("frame hello")
}

/// The handshake's answer: Some(true) welcome, Some(false) refused or closed, None no answer in time.
fn read_welcome(stream: &mut UnixStream, timeout: Duration) -> Option<bool> {
    let _ = stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))));
    match read_frame(stream, 1 << 20) {
        Ok(bytes) => Some(matches!(
            decode::<Handshake>(&bytes),
            Ok(Handshake::Welcome { .. })
        )),
        Err(FrameError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(false),
    }
}

/// Whether the daemon closed `stream` (EOF or an error on a non-blocking read).
fn closed_by_peer(stream: &mut UnixStream) -> bool {
    let _ = stream.set_nonblocking(true);
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lorad-hog: {e}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    let stop = Arc::new(AtomicBool::new(false));
    if args.until_stdin_eof {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            stop.store(true, Ordering::SeqCst);
        });
    }
    raise_fd_limit((args.idle + args.slow + 64) as u64);
    let hello = hello();

    // Slow first (a per-user cap on connections would otherwise leave none for them): a 1 KiB frame
    // announced, its bytes to follow one per second.
    let header = args.announce.to_be_bytes();
    let (mut slow, mut slow_refused, mut local_errors) = (Vec::new(), 0usize, 0usize);
    for i in 0..args.slow {
        let mut s = match connect(&args.socket) {
            Ok(s) => s,
            Err(Refused::Local) => {
                local_errors += 1;
                continue;
            }
            Err(Refused::ByDaemon) => {
                slow_refused += 1;
                continue;
            }
        };
        if i % 2 == 1 {
            let welcomed = s.write_all(&hello).is_ok()
                && read_welcome(&mut s, Duration::from_secs(5)) == Some(true);
            if !welcomed {
                slow_refused += 1;
                continue;
            }
        }
        match s.write_all(&header) {
            Ok(()) => slow.push(s),
            Err(_) => slow_refused += 1,
        }
    }
    // Idle: connect and send hello on all first (the daemon may accept late), then read the welcomes.
    let (mut idle, mut idle_refused) = (Vec::new(), 0usize);
    for _ in 0..args.idle {
        if stop.load(Ordering::SeqCst) || Instant::now() >= end {
            break;
        }
        match connect(&args.socket) {
            Ok(mut s) => match s.write_all(&hello) {
                Ok(()) => idle.push(s),
                Err(_) => idle_refused += 1,
            },
            Err(Refused::Local) => local_errors += 1,
            Err(Refused::ByDaemon) => idle_refused += 1,
        }
    }
    let answers_by = Instant::now() + Duration::from_secs(10);
    let (mut idle_opened, mut idle_pending) = (0usize, 0usize);
    idle.retain_mut(|s| {
        match read_welcome(s, answers_by.saturating_duration_since(Instant::now())) {
            Some(true) => {
                idle_opened += 1;
                true
            }
            Some(false) => {
                idle_refused += 1;
                false
            }
            None => {
                idle_pending += 1;
                true
            }
        }
    });

    println!(
        "ready idle_opened={idle_opened} idle_pending={idle_pending} idle_refused={idle_refused} \
         slow_opened={} slow_refused={slow_refused} local_errors={local_errors} after_ms={}",
        slow.len(),
        start.elapsed().as_millis()
    );

    let mut slow_closed = 0usize;
    let mut next_byte = Instant::now() + Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        if Instant::now() >= next_byte {
            next_byte += Duration::from_secs(1);
            slow.retain_mut(|s| {
                let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
                let ok = s.write_all(&[0u8]).is_ok();
                if !ok {
                    slow_closed += 1;
                }
                ok
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle_closed = idle.iter_mut().map(closed_by_peer).filter(|c| *c).count();
    let slow_closed_now = slow.iter_mut().map(closed_by_peer).filter(|c| *c).count();
    println!(
        "done idle_held={} idle_closed_by_daemon={idle_closed} slow_held={} \
         slow_closed_by_daemon={} after_ms={}",
        idle.len() - idle_closed,
        slow.len() - slow_closed_now,
        slow_closed + slow_closed_now,
        start.elapsed().as_millis()
    );
}
