//! A tunnel stream as one byte stream, whichever transport carries it,
//! counted while it is open.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::StreamGuard;

/// What both transports' streams are.
pub(crate) trait StreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> StreamIo for T {}

/// A stream plus the guard that keeps it counted in `mesh_streams_open`.
pub struct TunnelStream {
    io: Box<dyn StreamIo>,
    _open: StreamGuard,
}

impl TunnelStream {
    pub(crate) fn new(io: Box<dyn StreamIo>, open: StreamGuard) -> Self {
        TunnelStream { io, _open: open }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The two halves of a bidirectional QUIC stream.
pub(crate) struct QuicStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf).map_err(std::io::Error::from)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

/// An HTTP/2 stream (the TLS-over-TCP transport): request body one way,
/// response body the other, with h2's flow control. Received data is
/// released to the peer's window only once the reader has taken it, so a
/// slow reader slows only its own stream.
pub(crate) struct H2Stream {
    pub send: h2::SendStream<Bytes>,
    pub recv: H2Recv,
    /// Received but not yet read.
    pub pending: Bytes,
}

/// The receiving half: at the dialer, the response body once its head has
/// arrived (the far edge sends the head at once, then its answer).
pub(crate) enum H2Recv {
    Waiting(h2::client::ResponseFuture),
    Body(h2::RecvStream),
}

impl H2Stream {
    pub fn new(send: h2::SendStream<Bytes>, recv: H2Recv) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
        }
    }
}

fn h2_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| std::io::Error::other("h2"))
    } else {
        std::io::Error::new(std::io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            let body = match &mut this.recv {
                H2Recv::Body(body) => body,
                H2Recv::Waiting(response) => {
                    let response = ready!(Pin::new(response).poll(cx)).map_err(h2_error)?;
                    if response.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(std::io::Error::other(format!(
                            "the peer answered HTTP {}",
                            response.status()
                        ))));
                    }
                    this.recv = H2Recv::Body(response.into_body());
                    match &mut this.recv {
                        H2Recv::Body(body) => body,
                        H2Recv::Waiting(_) => return Poll::Pending,
                    }
                }
            };
            match ready!(body.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                // End of stream.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        let chunk = this.pending.split_to(n);
        buf.put_slice(&chunk);
        if let H2Recv::Body(body) = &mut this.recv {
            let _ = body.flow_control().release_capacity(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(0)) | None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_error)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(h2_error(e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // h2 sends what it was given as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.send.send_data(Bytes::new(), true).map_err(h2_error)?;
        Poll::Ready(Ok(()))
    }
}
