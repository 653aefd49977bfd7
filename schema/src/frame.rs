//! Framing: a 4-byte big-endian length, then that many bytes of MessagePack.
//!
//! The length is checked against the limit before anything is allocated, the body's buffer grows
//! with the bytes that actually arrive (never to the announced length up front), and decoding never
//! panics: every failure is a [`FrameError`]. Reading is split into header ([`read_len`],
//! [`read_len_async`]) and body ([`read_body`], [`read_body_async`]) so a server can reserve memory
//! for the announced length in between.
use serde::{de::DeserializeOwned, Serialize};
use std::io::{Read, Write};
#[cfg(feature = "async")]
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The default largest frame (16 MiB) either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The deepest nesting of arrays and maps [`decode`] accepts: a value may sit inside `MAX_DEPTH`
/// containers, not one more.
///
/// Unknown fields are ignored, so any message can carry an arbitrarily nested value, and serde's
/// internally tagged and untagged enums (every request, the handshake,
/// [`ServerFrame`](crate::ServerFrame)) buffer such a value by recursing once per level.
/// rmp-serde's own limit of 1024 levels takes ~0.65 MiB of stack in the workspace's dev profile and
/// ~4.3 MiB at opt-level 0, more than a tokio worker's 2 MiB. Our messages nest fewer than 10
/// levels; 128 leave room for newer peers' fields and take ~90 KiB in the dev profile, ~0.55 MiB at
/// opt-level 0. Deeper values are refused before any recursion (tests/fuzz.rs decodes values at the
/// limit, and 100,000 levels deep, on a 2 MiB thread).
pub const MAX_DEPTH: usize = 128;

/// Longest [`FrameError::Decode`] message: decoding errors quote the peer's strings, and the
/// message goes into logs and replies.
const MAX_ERROR_LEN: usize = 512;

/// How much of a body is read per call, and the smallest step by which its buffer grows.
const CHUNK: usize = 64 * 1024;

/// Why a frame could not be read, written or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer closed the stream cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The announced length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not valid MessagePack for the expected message.
    #[error("cannot decode frame: {0}")]
    Decode(String),
    /// The message could not be encoded (a bug).
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as MessagePack with named fields (maps, not arrays).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    rmp_serde::to_vec_named(msg).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Decodes a MessagePack payload: the first value in `bytes`, which must nest at most [`MAX_DEPTH`]
/// levels and be complete; bytes after it are ignored.
///
/// The value's shape is checked first, without recursing or allocating. rmp-serde hands each
/// array's and map's announced length to serde, which preallocates up to 1 MiB for it: unchecked,
/// each level of a nest of arrays announcing 2^32 elements would cost 1 MiB for 5 bytes (128 MiB
/// for a 640-byte frame at `MAX_DEPTH`). Once the shape is checked, the lengths announced add up to
/// fewer than `bytes.len()`, so preallocations stay within a small multiple of the payload. Strings
/// are read from `bytes` as needed and never preallocated.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    check_shape(bytes)?;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // A backstop only: check_shape refused deeper values, and rmp-serde counts an extension at the
    // innermost level as one more and stops one short of its limit.
    de.set_max_depth(MAX_DEPTH + 2);
    T::deserialize(&mut de).map_err(|e| decode_error(e.to_string()))
}

/// A `Decode` error whose message is cut to [`MAX_ERROR_LEN`] bytes.
fn decode_error(mut message: String) -> FrameError {
    if message.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    FrameError::Decode(message)
}

/// Checks that `bytes` starts with one complete MessagePack value nesting at most [`MAX_DEPTH`]
/// levels, each of whose arrays, maps, strings, binaries and extensions announces no more than the
/// bytes left.
///
/// Iterative and allocation-free. `owed` counts the values announced but not yet read, across all
/// open containers; each takes at least one byte, so `owed` never exceeds the bytes left, and the
/// lengths announced in the whole value add up to fewer than `bytes.len()`.
fn check_shape(bytes: &[u8]) -> Result<(), FrameError> {
    let bad =
        |at: usize, why: &str| decode_error(format!("malformed MessagePack at byte {at}: {why}"));
    // Values still to read in each open container, outermost first; slot 0 holds the top-level
    // value.
    let mut open = [0usize; MAX_DEPTH + 1];
    open[0] = 1;
    let mut depth = 0;
    let mut owed = 1usize;
    let mut pos = 0;
    loop {
        while open[depth] == 0 {
            if depth == 0 {
                return Ok(());
            }
            depth -= 1;
        }
        open[depth] -= 1;
        owed -= 1;
        let at = pos;
        let marker = *bytes
            .get(pos)
            .ok_or_else(|| bad(at, "the value is truncated"))?;
        pos += 1;
        // The big-endian length of `n` bytes at `pos`.
        let mut length = |n: usize| -> Result<usize, FrameError> {
            let field = bytes
                .get(pos..pos + n)
                .ok_or_else(|| bad(at, "the value is truncated"))?;
            pos += n;
            Ok(field
                .iter()
                .fold(0usize, |acc, b| acc << 8 | usize::from(*b)))
        };
        // Either bytes to skip or values to read.
        let (skip, values) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, None),
            0x80..=0x8f => (0, Some(2 * usize::from(marker & 0x0f))),
            0x90..=0x9f => (0, Some(usize::from(marker & 0x0f))),
            0xa0..=0xbf => (usize::from(marker & 0x1f), None),
            0xc1 => return Err(bad(at, "reserved marker 0xc1")),
            // bin and str 8/16/32
            0xc4 | 0xd9 => (length(1)?, None),
            0xc5 | 0xda => (length(2)?, None),
            0xc6 | 0xdb => (length(4)?, None),
            // ext 8/16/32: the length, then a type byte and the data
            0xc7 => (length(1)?.saturating_add(1), None),
            0xc8 => (length(2)?.saturating_add(1), None),
            0xc9 => (length(4)?.saturating_add(1), None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xca | 0xce | 0xd2 => (4, None),
            0xcb | 0xcf | 0xd3 => (8, None),
            // fixext 1/2/4/8/16, with their type byte
            0xd4 => (2, None),
            0xd5 => (3, None),
            0xd6 => (5, None),
            0xd7 => (9, None),
            0xd8 => (17, None),
            0xdc => (0, Some(length(2)?)),
            0xdd => (0, Some(length(4)?)),
            0xde => (0, Some(length(2)?.saturating_mul(2))),
            0xdf => (0, Some(length(4)?.saturating_mul(2))),
        };
        let left = bytes.len() - pos;
        if skip > left {
            return Err(bad(at, &format!("announces {skip} bytes, {left} remain")));
        }
        pos += skip;
        if let Some(values) = values {
            if depth == MAX_DEPTH {
                return Err(bad(at, &format!("nested deeper than {MAX_DEPTH} levels")));
            }
            owed = owed.saturating_add(values);
            if owed > left {
                return Err(bad(
                    at,
                    &format!("announces {values} values, {left} bytes remain"),
                ));
            }
            depth += 1;
            open[depth] = values;
        }
    }
}

/// Prefixes an encoded payload with its length.
pub fn frame_bytes(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// The header's length, or `TooLarge` when it exceeds `max`.
fn check_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// The error for a stream that ended after `got` bytes of a header.
fn header_eof(got: usize) -> FrameError {
    if got == 0 {
        FrameError::Closed
    } else {
        FrameError::Truncated
    }
}

/// Makes room for the next read of a `len`-byte body of which `filled` bytes have arrived, and
/// returns where that read goes: `buf[filled..end]`, at most [`CHUNK`] bytes.
///
/// The buffer grows only once the bytes already in it have arrived, by an eighth of them (at least
/// one chunk) and never past `len`: a peer that announces 16 MiB and sends 8 costs at most 9 MiB +
/// 64 KiB. Growing by a fixed chunk would keep closer to what arrived, but each growth may copy the
/// buffer; with many connections interleaving, glibc's realloc does, and a 16 MiB body then costs
/// 256 copies (~80 ms at -O3). A geometric step keeps the copying within a few times the body.
fn next_read(buf: &mut Vec<u8>, filled: usize, len: usize) -> usize {
    if filled == buf.len() {
        let grown = filled.saturating_add((filled / 8).max(CHUNK)).min(len);
        // `reserve_exact` first: `resize` alone may round the capacity up past `len`.
        buf.reserve_exact(grown - filled);
        buf.resize(grown, 0);
    }
    buf.len().min(filled.saturating_add(CHUNK))
}

#[cfg(feature = "async")]
/// Reads a frame's 4-byte header from an async stream and returns the announced length.
///
/// `Closed` if the stream ends before the header's first byte, `Truncated` if it ends inside the
/// header, `TooLarge` if the length exceeds `max`. Nothing is allocated.
pub async fn read_len_async<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<usize, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(header_eof(got));
        }
        got += n;
    }
    check_len(header, max)
}

#[cfg(feature = "async")]
/// Reads a `len`-byte frame body from an async stream; `Truncated` if the stream ends first.
///
/// The buffer follows the bytes received (never more than 9/8 of them plus 64 KiB, never past
/// `len`) instead of being allocated to `len` up front; still, check `len` against a limit before
/// calling this ([`read_len_async`] does).
pub async fn read_body_async<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    let mut filled = 0;
    while filled < len {
        let end = next_read(&mut buf, filled, len);
        let n = r.read(&mut buf[filled..end]).await?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        filled += n;
    }
    Ok(buf)
}

#[cfg(feature = "async")]
/// Reads one raw frame payload from an async stream: [`read_len_async`], then [`read_body_async`].
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let len = read_len_async(r, max).await?;
    read_body_async(r, len).await
}

#[cfg(feature = "async")]
/// Reads and decodes one message from an async stream.
pub async fn read_msg_async<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    decode(&read_frame_async(r, max).await?)
}

#[cfg(feature = "async")]
/// Encodes and writes one message to an async stream.
pub async fn write_msg_async<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    let bytes = frame_bytes(&encode(msg)?)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// `r.read(buf)`, retried while it is interrupted by a signal.
fn read_retrying<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return Ok(other?),
        }
    }
}

/// Reads a frame's 4-byte header from a blocking stream and returns the announced length.
///
/// `Closed` if the stream ends before the header's first byte, `Truncated` if it ends inside the
/// header, `TooLarge` if the length exceeds `max`. Nothing is allocated.
pub fn read_len<R: Read>(r: &mut R, max: usize) -> Result<usize, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = read_retrying(r, &mut header[got..])?;
        if n == 0 {
            return Err(header_eof(got));
        }
        got += n;
    }
    check_len(header, max)
}

/// Reads a `len`-byte frame body from a blocking stream; `Truncated` if the stream ends first.
///
/// The buffer follows the bytes received (never more than 9/8 of them plus 64 KiB, never past
/// `len`) instead of being allocated to `len` up front; still, check `len` against a limit before
/// calling this ([`read_len`] does).
pub fn read_body<R: Read>(r: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    let mut filled = 0;
    while filled < len {
        let end = next_read(&mut buf, filled, len);
        let n = read_retrying(r, &mut buf[filled..end])?;
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        filled += n;
    }
    Ok(buf)
}

/// Reads one raw frame payload from a blocking stream: [`read_len`], then [`read_body`].
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let len = read_len(r, max)?;
    read_body(r, len)
}

/// Reads and decodes one message from a blocking stream.
pub fn read_msg<T: DeserializeOwned, R: Read>(r: &mut R, max: usize) -> Result<T, FrameError> {
    decode(&read_frame(r, max)?)
}

/// Encodes and writes one message to a blocking stream.
pub fn write_msg<T: Serialize, W: Write>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let bytes = frame_bytes(&encode(msg)?)?;
    w.write_all(&bytes)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ClientFrame, Request};

    #[test]
    fn roundtrip_blocking() {
        let msg = ClientFrame {
            id: 7,
            req: Request::Get {
                job: crate::JobId(42),
            },
        };
        let mut buf = Vec::new();
        write_msg(&mut buf, &msg).unwrap();
        let back: ClientFrame = read_msg(&mut buf.as_slice(), MAX_FRAME).unwrap();
        assert_eq!(back.id, 7);
        assert!(matches!(back.req, Request::Get { job } if job.0 == 42));
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = read_frame(&mut bytes.as_slice(), MAX_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == u32::MAX as usize));
    }

    #[test]
    fn truncated_and_closed_are_distinguished() {
        assert!(matches!(
            read_frame(&mut [].as_slice(), MAX_FRAME),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut [0, 0].as_slice(), MAX_FRAME),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut [0, 0, 0, 9, 1].as_slice(), MAX_FRAME),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every prefix of every byte pattern decodes to an error or a
        // value.
        let mut state = 0x9e3779b97f4a7c15u64;
        for len in 0..200usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode::<ClientFrame>(&bytes);
            let _ = decode::<crate::ServerFrame>(&bytes);
            let _ = read_frame(&mut bytes.as_slice(), 64);
        }
    }

    /// Hands out `data` a piece at a time and checks no read asks for more than a chunk.
    struct Pieces<'a>(&'a [u8]);

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(buf.len() <= CHUNK, "a read of {} bytes", buf.len());
            let n = buf.len().min(self.0.len()).min(1000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn header_and_body_read_separately() {
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut stream = frame_bytes(&body).unwrap();
        stream.extend_from_slice(&frame_bytes(b"next").unwrap());
        let mut r = Pieces(&stream);
        let len = read_len(&mut r, MAX_FRAME).unwrap();
        assert_eq!(len, body.len());
        let got = read_body(&mut r, len).unwrap();
        assert_eq!(got, body);
        assert!(got.capacity() <= len, "grew past the announced length");
        assert_eq!(read_frame(&mut r, MAX_FRAME).unwrap(), b"next");
        assert!(matches!(
            read_len(&mut r, MAX_FRAME),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_len(&mut [0, 0, 1, 0].as_slice(), 255),
            Err(FrameError::TooLarge { len: 256, max: 255 })
        ));
        assert!(read_body(&mut [].as_slice(), 0).unwrap().is_empty());
    }

    #[test]
    fn a_body_grows_with_what_arrives() {
        // 100 KiB of an announced 16 MiB: the buffer never went past the bytes plus a chunk.
        let sent = vec![7u8; 100 * 1024];
        let mut buf = Vec::new();
        let mut filled = 0;
        while filled < sent.len() {
            let end = next_read(&mut buf, filled, MAX_FRAME);
            assert!(end - filled <= CHUNK);
            filled = end.min(sent.len());
            assert!(buf.len() <= filled + filled / 8 + CHUNK);
        }
        assert!(matches!(
            read_body(&mut sent.as_slice(), MAX_FRAME),
            Err(FrameError::Truncated)
        ));
    }

    /// `depth` arrays of one element around nil.
    fn nested(depth: usize) -> Vec<u8> {
        let mut v = vec![0x91; depth];
        v.push(0xc0);
        v
    }

    #[test]
    fn nesting_is_limited_before_decoding() {
        assert!(check_shape(&nested(MAX_DEPTH)).is_ok());
        let err = check_shape(&nested(MAX_DEPTH + 1)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("nested deeper than {MAX_DEPTH} levels")),
            "{err}"
        );
        let err = decode::<serde_json::Value>(&nested(100_000)).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
        let v: serde_json::Value = decode(&nested(MAX_DEPTH)).unwrap();
        assert!(v.is_array());
    }

    #[test]
    fn announced_lengths_must_fit_the_bytes_left() {
        // An array of 2^32 - 1 elements, a map of as many entries, a string, a binary and an
        // extension of 2^32 - 1 bytes, each with a few bytes after it.
        for lying in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0, 0xc0],
            &[0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
            &[0xc6, 0xff, 0xff, 0xff, 0xff, 0],
            &[0xc9, 0xff, 0xff, 0xff, 0xff, 1, 0],
            &[0x92, 0x91, 0xc0],
            &[0xcf, 0, 0],
            &[0xc1],
            &[],
        ] {
            assert!(check_shape(lying).is_err(), "{lying:x?}");
        }
        // Nested arrays each announcing what the bytes after them could hold, together too many.
        assert!(check_shape(&[0x93, 0x93, 0xc0, 0xc0, 0xc0, 0xc0]).is_err());
        assert!(check_shape(&[0x92, 0x92, 0xc0, 0xc0, 0xc0]).is_ok());
        // Trailing bytes are left alone, as rmp-serde does.
        assert!(check_shape(&[0xc0, 0xc1]).is_ok());
    }

    #[test]
    fn decode_errors_are_cut_short() {
        let name = "é".repeat(2000);
        let bytes = encode(&serde_json::json!({"id": 1, "req": {"type": name}})).unwrap();
        let err = decode::<ClientFrame>(&bytes).unwrap_err().to_string();
        assert!(err.contains("unknown variant"), "{err}");
        assert!(err.len() <= MAX_ERROR_LEN + 64, "{} bytes", err.len());
    }

    #[cfg(feature = "async")]
    #[tokio::test]
    async fn async_header_and_body_read_separately() {
        let stream = frame_bytes(&[1, 2, 3]).unwrap();
        let mut r = stream.as_slice();
        let len = read_len_async(&mut r, 16).await.unwrap();
        assert_eq!(read_body_async(&mut r, len).await.unwrap(), [1, 2, 3]);
        assert!(matches!(
            read_len_async(&mut r, 16).await,
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_len_async(&mut [0u8, 0, 0].as_slice(), 16).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_body_async(&mut [1u8, 2].as_slice(), 3).await,
            Err(FrameError::Truncated)
        ));
    }

    #[cfg(feature = "async")]
    #[tokio::test]
    async fn roundtrip_async() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_msg_async(
            &mut a,
            &ClientFrame {
                id: 1,
                req: Request::Status,
            },
        )
        .await
        .unwrap();
        let got: ClientFrame = read_msg_async(&mut b, MAX_FRAME).await.unwrap();
        assert!(matches!(got.req, Request::Status));
    }
}
