//! The MQTT codec over one connection's byte stream: complete packets out of
//! a read buffer that exists only while a packet is incomplete, and packets
//! written in bounded chunks that shutdown or a kick can cut short.
//!
//! Idle connections hold no buffers: bytes are read into a stack buffer only
//! once the socket is readable, and kept only while a packet is incomplete.
//! That keeps a connected, idle machine at a few hundred bytes of heap (plus
//! rustls' connection state on the TLS listener).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::Error as CodecError;
use tokio::time::timeout;

use super::super::stream::Stream;
use super::close::{CloseReason, StopSignals};

/// Bytes read per readiness event.
pub(super) const READ_CHUNK: usize = 4096;
/// Outbound packets can be large (service clients); the codec wants a cap.
const MAX_OUTGOING: usize = 16 * 1024 * 1024;
/// A write that cannot complete in this time means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing packets are encoded and written at most this many bytes at a
/// time (plus one packet), whatever is queued.
pub(super) const WRITE_CHUNK: usize = 64 * 1024;

pub(super) enum ReadError {
    Eof,
    Malformed(&'static str),
    TooLarge,
}

/// How far [`Framed::write_now`] got.
enum WriteNow {
    /// Everything, this many bytes.
    Done(usize),
    /// The socket's buffer is full: `written` bytes went out, `buf` is the
    /// rest of the current chunk, `packets[rest..]` are not encoded yet.
    Blocked {
        written: usize,
        buf: BytesMut,
        rest: usize,
    },
}

/// A byte stream framed into MQTT 3.1.1 packets.
pub(super) struct Framed {
    pub(super) stream: Stream,
    /// Bytes of a packet not yet complete; empty (and unallocated) between
    /// packets.
    pub(super) rbuf: BytesMut,
    /// The largest packet accepted: `max_connect_size` until the client has
    /// authenticated, `max_packet_size` after.
    pub(super) max_packet: usize,
}

impl Framed {
    pub(super) fn new(stream: Stream, max_packet: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            max_packet,
        }
    }

    /// Wait for readability and append what is there to `rbuf`.
    pub(super) async fn fill(&mut self) -> Result<(), ReadError> {
        loop {
            if self.stream.readable().await.is_err() {
                return Err(ReadError::Eof);
            }
            match self.try_fill() {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Non-blocking read; Ok(false) on a spurious wake-up.
    pub(super) fn try_fill(&mut self) -> Result<bool, ReadError> {
        let mut chunk = [0u8; READ_CHUNK];
        match self.stream.try_read(&mut chunk) {
            Ok(Some(0)) => Err(ReadError::Eof),
            Ok(Some(n)) => {
                let chunk = chunk.get(..n).ok_or(ReadError::Eof)?;
                self.rbuf.extend_from_slice(chunk);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(_) => Err(ReadError::Eof),
        }
    }

    /// Next complete packet already buffered, if any.
    pub(super) fn next_packet(&mut self) -> Result<Option<Packet>, ReadError> {
        if self.rbuf.is_empty() {
            return Ok(None);
        }
        match Packet::read(&mut self.rbuf, self.max_packet) {
            Ok(p) => {
                if self.rbuf.is_empty() {
                    // Drop the (now shared) allocation so an idle connection
                    // holds no buffer.
                    self.rbuf = BytesMut::new();
                }
                Ok(Some(p))
            }
            Err(CodecError::InsufficientBytes(_)) => Ok(None),
            Err(CodecError::PayloadSizeLimitExceeded(_)) => Err(ReadError::TooLarge),
            Err(_) => Err(ReadError::Malformed("malformed packet")),
        }
    }

    /// Write `buf` once the socket takes it, within [`WRITE_TIMEOUT`],
    /// unless a take-over or shutdown comes first.
    async fn write_waiting(
        &mut self,
        buf: &[u8],
        stop: &StopSignals<'_>,
    ) -> Result<(), CloseReason> {
        tokio::select! {
            biased;
            reason = stop.fired() => Err(reason),
            r = timeout(WRITE_TIMEOUT, self.stream.write_all(buf)) => match r {
                Ok(Ok(())) => Ok(()),
                _ => Err(CloseReason::SocketClosed),
            },
        }
    }

    /// Encode `packets` in chunks of about [`WRITE_CHUNK`] bytes and write
    /// what the socket takes now, without waiting: `Done(bytes)`, or where
    /// it stopped (`write_rest` finishes that).
    fn write_now(&mut self, packets: &[Packet]) -> Result<WriteNow, CloseReason> {
        let mut written = 0;
        let mut rest = packets;
        while !rest.is_empty() {
            let mut buf = BytesMut::new();
            encode_chunk(&mut buf, &mut rest)?;
            // Most writes fit the socket's send buffer: written at once,
            // without arming the write timer or the stop signals' waiters.
            let now = self
                .stream
                .try_write_now(&buf)
                .map_err(|_| CloseReason::SocketClosed)?;
            written += now;
            if now < buf.len() {
                let _ = buf.split_to(now);
                return Ok(WriteNow::Blocked {
                    written,
                    buf,
                    rest: packets.len() - rest.len(),
                });
            }
        }
        Ok(WriteNow::Done(written))
    }

    /// Encode and write `packets` in chunks of about [`WRITE_CHUNK`] bytes,
    /// so what is queued is never encoded into one buffer. What the socket
    /// does not take at once must be written within [`WRITE_TIMEOUT`] per
    /// chunk; a take-over or shutdown ends the write at once instead of
    /// waiting for a peer that does not read. The waiting part is boxed and
    /// made only when needed: inline, its state (a timer, the stop
    /// signals' waiters) would be part of every idle connection's task.
    pub(super) async fn write_packets(
        &mut self,
        packets: &[Packet],
        stop: &StopSignals<'_>,
    ) -> Result<usize, CloseReason> {
        let waiting = match self.write_now(packets)? {
            WriteNow::Done(n) => return Ok(n),
            WriteNow::Blocked { written, buf, rest } => {
                Box::pin(self.write_rest(written, buf, packets.get(rest..).unwrap_or(&[]), stop))
            }
        };
        waiting.await
    }

    /// The rest of a write the socket did not take at once: `buf` (the
    /// unwritten end of a chunk), then `packets`.
    async fn write_rest(
        &mut self,
        mut written: usize,
        buf: BytesMut,
        packets: &[Packet],
        stop: &StopSignals<'_>,
    ) -> Result<usize, CloseReason> {
        self.write_waiting(&buf, stop).await?;
        written += buf.len();
        drop(buf);
        let mut rest = packets;
        let mut buf = BytesMut::new();
        while !rest.is_empty() {
            buf.clear();
            encode_chunk(&mut buf, &mut rest)?;
            self.write_waiting(&buf, stop).await?;
            written += buf.len();
        }
        Ok(written)
    }
}

/// Encode packets from the front of `rest` into `buf` until it holds about
/// [`WRITE_CHUNK`] bytes (or `rest` is empty), advancing `rest` past them.
fn encode_chunk(buf: &mut BytesMut, rest: &mut &[Packet]) -> Result<(), CloseReason> {
    while let Some((p, tail)) = rest.split_first() {
        if buf.len() >= WRITE_CHUNK {
            break;
        }
        if p.write(buf, MAX_OUTGOING).is_err() {
            return Err(CloseReason::Protocol("outgoing packet too large"));
        }
        *rest = tail;
    }
    Ok(())
}
