//! Misbehaving clients lose their own connection, never the daemon.
use lorad_schema::frame;
use lorad_schema::{Handshake, PROTOCOL_VERSION};
use lorad_tests::TestDaemon;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn raw(d: &TestDaemon) -> UnixStream {
    let s = UnixStream::connect(d.socket()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

fn hello(s: &mut UnixStream) {
    frame::write_msg(
        s,
        &Handshake::Hello {
            protocol: PROTOCOL_VERSION,
            client: "raw-test".into(),
        },
    )
    .expect("hello");
    let welcome: Handshake = frame::read_msg(s, frame::MAX_FRAME).expect("welcome");
    assert!(
        matches!(welcome, Handshake::Welcome { protocol: 1, .. }),
        "{welcome:?}"
    );
}

/// Reads until the daemon closes the connection: EOF, or a reset when it closed with our bytes unread.
fn read_to_close(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the daemon did not close the connection: {e}"),
        }
    }
}

#[test]
fn bad_clients_are_cut_off_and_others_keep_working() {
    let d = TestDaemon::start();
    let watcher = d.client();

    // Garbage instead of a handshake.
    let mut s = raw(&d);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    read_to_close(&mut s);

    // Garbage after the handshake: a small frame that is not MessagePack of a request.
    let mut s = raw(&d);
    hello(&mut s);
    s.write_all(&[0, 0, 0, 5, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1])
        .expect("write");
    read_to_close(&mut s);

    // A frame longer than the limit: an error reply (too_large), then the connection closes.
    let mut s = raw(&d);
    hello(&mut s);
    s.write_all(&(64u32 * 1024 * 1024).to_be_bytes())
        .expect("write");
    let reply: lorad_schema::ServerFrame =
        frame::read_msg(&mut s, frame::MAX_FRAME).expect("error frame");
    read_to_close(&mut s);
    match reply {
        lorad_schema::ServerFrame::Reply(r) => {
            assert_eq!(r.err.expect("err").code, lorad_schema::ErrorCode::TooLarge)
        }
        other => panic!("{other:?}"),
    }

    // Disconnect in the middle of a frame.
    let mut s = raw(&d);
    hello(&mut s);
    s.write_all(&[0, 0, 0, 100, 1, 2, 3]).expect("write");
    drop(s);

    // A client of another protocol version is told both versions.
    let mut s = raw(&d);
    frame::write_msg(
        &mut s,
        &Handshake::Hello {
            protocol: 99,
            client: "future".into(),
        },
    )
    .expect("hello");
    match frame::read_msg::<Handshake, _>(&mut s, frame::MAX_FRAME).expect("answer") {
        Handshake::Error { message, .. } => {
            assert!(message.contains("99") && message.contains('1'), "{message}")
        }
        other => panic!("{other:?}"),
    }

    // An unknown request type is answered, and that connection stays usable.
    let mut s = raw(&d);
    hello(&mut s);
    let unknown = serde_json::json!({"id": 5, "req": {"type": "teleport"}});
    let bytes = rmp_serde::to_vec_named(&unknown).expect("encode");
    s.write_all(&frame::frame_bytes(&bytes).expect("frame"))
        .expect("write");
    let reply: lorad_schema::ServerFrame =
        frame::read_msg(&mut s, frame::MAX_FRAME).expect("reply");
    match reply {
        lorad_schema::ServerFrame::Reply(r) => {
            assert_eq!(r.id, 5);
            assert!(r.err.expect("err").message.contains("teleport"));
        }
        other => panic!("{other:?}"),
    }

    // Through all of it, the daemon kept serving the well-behaved client.
    let status = watcher.status().expect("status after abuse");
    assert_eq!(status.protocol, PROTOCOL_VERSION);
    assert!(d.client().list(None, false).is_ok());
}
