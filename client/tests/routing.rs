//! The client's connection logic against an in-process fake daemon that speaks the framing: the
//! handshake, replies routed by id, pushes routed by subscription, and what happens when the
//! connection drops. The real daemon is exercised by the workspace's integration tests.
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use lorad_client::lorad_schema::frame::{self, FrameError};
use lorad_client::lorad_schema::{
    ClientFrame, DaemonStatus, ErrorCode, Event, EventBody, Handshake, JobId, JobRecord, JobState,
    Progress, Push, Reply, Request, Response, ServerFrame, TrainSettings, WireError, MAX_FRAME,
    PROTOCOL_VERSION,
};
use lorad_client::{Client, ClientError};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// A listening socket in a temp dir, standing in for lorad.
struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: Listener,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lorad.sock");
        let name = path.clone().to_fs_name::<GenericFilePath>().unwrap();
        let listener = ListenerOptions::new().name(name).create_tokio().unwrap();
        Fake {
            _dir: dir,
            path,
            listener,
        }
    }

    /// Accepts one connection and reads its hello.
    async fn accept_hello(&self) -> (Conn, Handshake) {
        let stream = self.listener.accept().await.unwrap();
        let mut conn = Conn { stream };
        let hello: Handshake = frame::read_msg_async(&mut conn.stream, MAX_FRAME)
            .await
            .unwrap();
        (conn, hello)
    }

    /// Accepts one connection and welcomes it.
    async fn accept(&self) -> Conn {
        let (mut conn, _) = self.accept_hello().await;
        let welcome = Handshake::Welcome {
            protocol: PROTOCOL_VERSION,
            daemon_version: "9.9.9-fake".into(),
            features: vec!["subscribe".into()],
        };
        frame::write_msg_async(&mut conn.stream, &welcome)
            .await
            .unwrap();
        conn
    }

    /// A connected client and the fake's end of its connection.
    async fn pair(&self) -> (Client, Conn) {
        let (client, conn) = tokio::join!(Client::connect(&self.path), self.accept());
        (client.unwrap(), conn)
    }
}

/// The fake daemon's end of one connection.
struct Conn {
    stream: Stream,
}

impl Conn {
    async fn recv(&mut self) -> ClientFrame {
        tokio::time::timeout(
            Duration::from_secs(10),
            frame::read_msg_async(&mut self.stream, MAX_FRAME),
        )
        .await
        .expect("no request within 10s")
        .unwrap()
    }

    async fn send(&mut self, f: ServerFrame) {
        frame::write_msg_async(&mut self.stream, &f).await.unwrap();
    }

    async fn reply(&mut self, id: u64, ok: Response) {
        self.send(ServerFrame::Reply(Reply {
            id,
            ok: Some(ok),
            err: None,
        }))
        .await;
    }

    async fn push(&mut self, sub: u64, event: Event) {
        self.send(ServerFrame::Push(Push { sub, event })).await;
    }

    /// Writes any JSON-shaped value as one frame, e.g. a message from a newer daemon.
    async fn send_raw(&mut self, v: serde_json::Value) {
        let bytes = frame::frame_bytes(&rmp_serde::to_vec_named(&v).unwrap()).unwrap();
        self.stream.write_all(&bytes).await.unwrap();
    }
}

fn record(id: u64) -> JobRecord {
    JobRecord {
        id: JobId(id),
        name: format!("job-{id}"),
        state: JobState::Running,
        reason: None,
        owner_uid: 1000,
        priority: 0,
        template: "basic-fine-tune".into(),
        base_model: "/m".into(),
        dataset: "/d.jsonl".into(),
        output_dir: "/o".into(),
        settings: TrainSettings::default(),
        overrides: Default::default(),
        progress: Progress::default(),
        created_at_ms: 1,
        started_at_ms: None,
        finished_at_ms: None,
        adapter_dir: None,
        worker_pid: None,
        resume_checkpoint: None,
        requeued: false,
        memory_estimate: None,
        first_started_at_ms: None,
        after: Vec::new(),
        not_before_ms: None,
        on_finish: None,
    }
}

fn status() -> DaemonStatus {
    DaemonStatus {
        daemon_version: "9.9.9-fake".into(),
        protocol: PROTOCOL_VERSION,
        uptime_s: 3,
        pid: 1,
        state_dir: "/s".into(),
        devices: vec![],
        queued: 0,
        running: 0,
        jobs: 0,
        last_seq: 0,
        plugins: Default::default(),
    }
}

fn state_event(seq: u64, job: u64, to: JobState) -> Event {
    Event {
        seq,
        job: Some(JobId(job)),
        at_ms: seq,
        body: EventBody::StateChanged {
            from: JobState::Running,
            to,
            reason: None,
        },
    }
}

#[tokio::test]
async fn handshake_is_accepted_and_welcome_kept() {
    let fake = Fake::new();
    let (client, (conn, hello)) = tokio::join!(Client::connect(&fake.path), async {
        let (mut conn, hello) = fake.accept_hello().await;
        let welcome = Handshake::Welcome {
            protocol: 1,
            daemon_version: "9.9.9-fake".into(),
            features: vec!["x".into()],
        };
        frame::write_msg_async(&mut conn.stream, &welcome)
            .await
            .unwrap();
        (conn, hello)
    });
    let client = client.unwrap();
    match hello {
        Handshake::Hello { protocol, client } => {
            assert_eq!(protocol, PROTOCOL_VERSION);
            assert!(client.starts_with("lorad-client/"), "{client}");
        }
        other => panic!("expected hello, got {other:?}"),
    }
    assert_eq!(client.server_info().daemon_version, "9.9.9-fake");
    assert_eq!(client.server_info().features, vec!["x".to_string()]);
    drop(conn);
}

#[tokio::test]
async fn handshake_error_names_both_versions() {
    let fake = Fake::new();
    let (client, _conn) = tokio::join!(Client::connect(&fake.path), async {
        let (mut conn, _) = fake.accept_hello().await;
        let refuse = Handshake::Error {
            code: ErrorCode::Unsupported,
            message: "this daemon speaks protocol 2".into(),
        };
        frame::write_msg_async(&mut conn.stream, &refuse)
            .await
            .unwrap();
        conn
    });
    let err = client.unwrap_err();
    assert!(matches!(err, ClientError::Handshake(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("protocol 1") && text.contains("protocol 2") && text.contains("unsupported"),
        "{text}"
    );
}

#[tokio::test]
async fn connect_error_names_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    let err = Client::connect(&path).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        text.contains("is the daemon running? set --socket or LORAD_SOCKET"),
        "{text}"
    );
}

#[tokio::test]
async fn replies_reach_their_callers_when_answered_out_of_order() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let (c1, c2) = (client.clone(), client.clone());
    let first = tokio::spawn(async move { c1.get(JobId(1)).await });
    let second = tokio::spawn(async move { c2.get(JobId(2)).await });
    let (a, b) = (conn.recv().await, conn.recv().await);
    assert_ne!(a.id, b.id, "request ids are unique");
    // Answer the later request first.
    for f in [b, a] {
        let Request::Get { job } = f.req else {
            panic!("expected get, got {:?}", f.req)
        };
        conn.reply(f.id, Response::Job(record(job.0))).await;
    }
    assert_eq!(first.await.unwrap().unwrap().id, JobId(1));
    assert_eq!(second.await.unwrap().unwrap().id, JobId(2));
}

#[tokio::test]
async fn server_errors_keep_their_code() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let call = tokio::spawn(async move { client.cancel(JobId(7)).await });
    let f = conn.recv().await;
    assert_eq!(f.req, Request::Cancel { job: JobId(7) });
    let err = WireError::new(ErrorCode::NotFound, "job 7 not found");
    conn.send(ServerFrame::Reply(Reply {
        id: f.id,
        ok: None,
        err: Some(err.clone()),
    }))
    .await;
    let got = call.await.unwrap().unwrap_err();
    assert_eq!(got.code(), Some(ErrorCode::NotFound));
    assert!(matches!(got, ClientError::Server(w) if w == err));
}

#[tokio::test]
async fn a_response_of_the_wrong_kind_is_unexpected() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let call = tokio::spawn(async move { client.get(JobId(1)).await });
    let f = conn.recv().await;
    conn.reply(f.id, Response::Done).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(
        matches!(err, ClientError::Unexpected { expected: "job", ref got } if got == "done"),
        "{err:?}"
    );
}

#[tokio::test]
async fn pushes_reach_their_subscription() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let server = async {
        for _ in 0..2 {
            let f = conn.recv().await;
            let Request::Subscribe {
                job: Some(job),
                since_seq,
            } = f.req
            else {
                panic!("{:?}", f.req)
            };
            assert_eq!(since_seq, 4);
            conn.reply(
                f.id,
                Response::Subscribed {
                    sub: 100 + job.0,
                    last_seq: 5,
                },
            )
            .await;
        }
        conn.push(102, state_event(6, 2, JobState::Paused)).await;
        conn.push(101, state_event(7, 1, JobState::Completed)).await;
        conn
    };
    let subs = async {
        (
            client.subscribe(Some(JobId(1)), 4).await.unwrap(),
            client.subscribe(Some(JobId(2)), 4).await.unwrap(),
        )
    };
    let ((mut s1, mut s2), _conn) = tokio::join!(subs, server);
    assert_eq!((s1.id(), s2.id()), (101, 102));
    assert_eq!((s1.replay_until(), s1.last_seq()), (5, 4));
    let e1 = s1.next().await.unwrap();
    let e2 = s2.next().await.unwrap();
    assert_eq!((e1.seq, e1.job), (7, Some(JobId(1))));
    assert_eq!((e2.seq, e2.job), (6, Some(JobId(2))));
    assert_eq!((s1.last_seq(), s2.last_seq()), (7, 6));
}

#[tokio::test]
async fn pushes_that_overtake_the_subscribed_reply_are_kept() {
    // The daemon starts replaying as soon as the subscription exists, so its first pushes can be
    // written before the `subscribed` reply.
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let server = async {
        let f = conn.recv().await;
        conn.push(55, state_event(1, 3, JobState::Running)).await;
        conn.push(55, state_event(2, 3, JobState::Completed)).await;
        conn.reply(
            f.id,
            Response::Subscribed {
                sub: 55,
                last_seq: 2,
            },
        )
        .await;
        conn.push(55, state_event(3, 3, JobState::Queued)).await;
        conn
    };
    let (sub, _conn) = tokio::join!(client.subscribe(Some(JobId(3)), 0), server);
    let mut sub = sub.unwrap();
    let seqs = [
        sub.next().await.unwrap().seq,
        sub.next().await.unwrap().seq,
        sub.next().await.unwrap().seq,
    ];
    assert_eq!(seqs, [1, 2, 3]);
}

#[tokio::test]
async fn dropping_a_subscription_unsubscribes() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let server = async {
        let f = conn.recv().await;
        conn.reply(
            f.id,
            Response::Subscribed {
                sub: 9,
                last_seq: 0,
            },
        )
        .await;
        conn
    };
    let (sub, mut conn) = tokio::join!(client.subscribe(None, 0), server);
    drop(sub.unwrap());
    let f = conn.recv().await;
    assert_eq!(f.req, Request::Unsubscribe { sub: 9 });
    // A straggler for the dead subscription and the unsubscribe's reply are ignored; the connection
    // keeps working.
    conn.push(9, state_event(1, 1, JobState::Running)).await;
    conn.reply(f.id, Response::Done).await;
    let call = tokio::spawn(async move { client.status().await });
    let f = conn.recv().await;
    conn.reply(f.id, Response::Status(status())).await;
    assert_eq!(call.await.unwrap().unwrap().daemon_version, "9.9.9-fake");
}

#[tokio::test]
async fn frames_from_a_newer_daemon_do_not_break_the_connection() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let server = async {
        let f = conn.recv().await;
        conn.reply(
            f.id,
            Response::Subscribed {
                sub: 1,
                last_seq: 0,
            },
        )
        .await;
        // An event type this client does not know is skipped...
        conn.send_raw(serde_json::json!({"sub": 1, "event": {"seq": 1, "at_ms": 0,
            "body": {"type": "checkpoint", "meta": {"step": 10}}}}))
            .await;
        conn.push(1, state_event(2, 1, JobState::Completed)).await;
        // ...and a response type it does not know fails only the call it answers.
        let f = conn.recv().await;
        conn.send_raw(serde_json::json!({"id": f.id, "ok": {"type": "hologram"}}))
            .await;
        conn
    };
    let client_side = async {
        let mut sub = client.subscribe(Some(JobId(1)), 0).await.unwrap();
        let event = sub.next().await.unwrap();
        let err = client.status().await.unwrap_err();
        (event, err)
    };
    let ((event, err), _conn) = tokio::join!(client_side, server);
    assert_eq!(event.seq, 2);
    assert!(
        matches!(err, ClientError::Frame(FrameError::Decode(_))),
        "{err:?}"
    );
}

#[tokio::test]
async fn pending_calls_fail_with_closed_when_the_daemon_goes_away() {
    let fake = Fake::new();
    let (client, mut conn) = fake.pair().await;
    let server = async {
        let f = conn.recv().await;
        conn.reply(
            f.id,
            Response::Subscribed {
                sub: 1,
                last_seq: 0,
            },
        )
        .await;
        let _status = conn.recv().await;
        let _list = conn.recv().await;
        drop(conn);
    };
    let client_side = async {
        let mut sub = client.subscribe(Some(JobId(1)), 0).await.unwrap();
        let (c1, c2) = (client.clone(), client.clone());
        let a = tokio::spawn(async move { c1.status().await });
        let b = tokio::spawn(async move { c2.list(None, false).await });
        let ended = sub.next().await;
        (a.await.unwrap(), b.await.unwrap(), ended)
    };
    let ((a, b, ended), ()) = tokio::join!(client_side, server);
    assert!(matches!(a, Err(ClientError::Closed)), "{a:?}");
    assert!(matches!(b, Err(ClientError::Closed)), "{b:?}");
    assert!(ended.is_none(), "the subscription ends with the connection");
    let later = client.get(JobId(1)).await.unwrap_err();
    assert!(
        matches!(later, ClientError::Closed) && later.is_disconnect(),
        "{later:?}"
    );
}

#[test]
fn blocking_client_calls_and_follows() {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let fake = Fake::new();
            tx.send(fake.path.clone()).unwrap();
            let mut conn = fake.accept().await;
            let f = conn.recv().await;
            assert_eq!(f.req, Request::Status);
            conn.reply(f.id, Response::Status(status())).await;
            let f = conn.recv().await;
            conn.reply(
                f.id,
                Response::Subscribed {
                    sub: 3,
                    last_seq: 0,
                },
            )
            .await;
            conn.push(3, state_event(1, 1, JobState::Completed)).await;
            // Stay until the client hangs up.
            let _ = frame::read_frame_async(&mut conn.stream, MAX_FRAME).await;
        });
    });
    let path = rx.recv().unwrap();
    let client = lorad_client::blocking::Client::connect(&path).unwrap();
    assert_eq!(client.status().unwrap().uptime_s, 3);
    let mut sub = client.subscribe(Some(JobId(1)), 0).unwrap();
    let event = sub.next().unwrap();
    assert_eq!(event.seq, 1);
    assert!(
        sub.next_timeout(Duration::from_millis(50)).is_err(),
        "no second event"
    );
    drop(sub);
    drop(client);
    server.join().unwrap();
}
