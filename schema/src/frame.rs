//! Framing: a 4-byte big-endian length, then that many bytes of MessagePack.
//!
//! The length is checked against the limit before anything is allocated, and decoding never panics:
//! every failure is a [`FrameError`].
use serde::{de::DeserializeOwned, Serialize};
use std::io::{Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The default largest frame (16 MiB) either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

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

/// Decodes a MessagePack payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(bytes).map_err(|e| FrameError::Decode(e.to_string()))
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

fn check_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Reads one raw frame payload from an async stream.
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        got += n;
    }
    let len = check_len(header, max)?;
    let mut buf = vec![0u8; len];
    match r.read_exact(&mut buf).await {
        Ok(_) => Ok(buf),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Reads and decodes one message from an async stream.
pub async fn read_msg_async<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    decode(&read_frame_async(r, max).await?)
}

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

/// Reads one raw frame payload from a blocking stream.
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = match r.read(&mut header[got..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        got += n;
    }
    let len = check_len(header, max)?;
    let mut buf = vec![0u8; len];
    match r.read_exact(&mut buf) {
        Ok(()) => Ok(buf),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
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
        // A cheap deterministic fuzz: every prefix of every byte pattern decodes to an error or a value.
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
