//! The byte stream under one MQTT connection: plain TCP or TLS over TCP,
//! read on readiness so that an idle connection holds no read buffer either
//! way (the connection loop waits for the socket to be readable, then reads
//! what is there into a stack chunk).

use std::io;
use std::task::{Context, Poll};

use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub(crate) enum Stream {
    Plain(TcpStream),
    Tls {
        /// Boxed: rustls' connection state is large and the enum sits in
        /// every connection's task.
        tls: Box<TlsStream<TcpStream>>,
        /// The last read returned data, so rustls may hold more decrypted
        /// bytes (or more records may wait in the socket) than that read
        /// took: the next `readable` returns at once and the next read tells.
        more: bool,
    },
}

impl Stream {
    pub(crate) fn tls(tls: TlsStream<TcpStream>) -> Self {
        Self::Tls {
            tls: Box::new(tls),
            // The handshake may already have read the client's first records
            // (CONNECT sent right behind Finished): look before waiting.
            more: true,
        }
    }

    /// Wait until a read may make progress.
    pub(crate) async fn readable(&self) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.readable().await,
            Self::Tls { more: true, .. } => Ok(()),
            Self::Tls { tls, .. } => tls.get_ref().0.readable().await,
        }
    }

    /// [`Stream::readable`] as a poll: no future to hold, so a connection
    /// waiting for bytes keeps only the waker tokio stores for it.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Plain(s) => s.poll_read_ready(cx),
            Self::Tls { more: true, .. } => Poll::Ready(Ok(())),
            Self::Tls { tls, .. } => tls.get_ref().0.poll_read_ready(cx),
        }
    }

    /// Non-blocking read: Ok(Some(n)) with n bytes (0 is end of stream),
    /// Ok(None) when nothing is available now.
    pub(crate) fn try_read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self {
            Self::Plain(s) => match s.try_read(buf) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            },
            Self::Tls { tls, more } => {
                // One poll of the read: it reads TLS records the socket has,
                // decrypts, and copies plaintext; Pending means the socket
                // had nothing more (its readiness is then cleared, so the next
                // `readable` waits for new bytes). Dropping a pending read
                // loses nothing: rustls keeps partial records itself.
                match tls.read(buf).now_or_never() {
                    Some(Ok(n)) => {
                        *more = n > 0;
                        Ok(Some(n))
                    }
                    Some(Err(e)) => Err(e),
                    None => {
                        *more = false;
                        Ok(None)
                    }
                }
            }
        }
    }

    /// Non-blocking write of as much of `buf` as the socket takes now;
    /// how many bytes that was. Plain TCP only (0 on TLS, whose records
    /// `write_all` must frame and flush).
    pub(crate) fn try_write_now(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Self::Plain(s) = self else {
            return Ok(0);
        };
        let mut done = 0;
        while let Some(rest) = buf.get(done..).filter(|r| !r.is_empty()) {
            match s.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Write everything and push it onto the wire (TLS buffers records).
    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.write_all(buf).await,
            Self::Tls { tls, .. } => {
                tls.write_all(buf).await?;
                tls.flush().await
            }
        }
    }
}
