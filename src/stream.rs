//! A read buffer under a codec (WebSocket, TLS) that exists only while a
//! connection is busy. Used by the relay's connections and by the client.
//!
//! tungstenite reads roughly one WebSocket frame per read call (its own buffer
//! is kept tiny so idle clients stay cheap, and it zeroes whatever it reads
//! into), and rustls reads at most one 4 KiB chunk per call: a syscall per
//! frame or record on a busy connection. This wrapper notices when reads come
//! back full and switches to reading ahead in large chunks, serving the codec
//! from memory; when traffic dies down it drops its buffer and reads straight
//! through again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const START: usize = 16 << 10;
const MAX: usize = 64 << 10;

pub struct ReadAhead<S> {
    inner: S,
    buf: BytesMut,
    /// Size of the next read-ahead; 0 = pass reads straight through.
    hint: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            hint: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() && this.hint == 0 {
            let want = out.remaining();
            let before = out.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            if want > 0 && out.filled().len() - before == want {
                this.hint = START; // the socket had at least as much as asked: busy
            }
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_empty() {
            this.buf.reserve(this.hint);
            let spare = this.buf.spare_capacity_mut();
            let mut rb = ReadBuf::uninit(spare);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
            unsafe { this.buf.set_len(n) };
            if n == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
            if n == this.hint {
                this.hint = (this.hint * 2).min(MAX);
            } else if n < this.hint / 8 {
                this.hint /= 2;
                if this.hint < START {
                    this.hint = 0; // quiet again: release the buffer once drained
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && this.hint == 0 {
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_through_unchanged_in_both_modes() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31) as u8).collect();
        let sent = data.clone();
        let w = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let mut r = ReadAhead::new(b);
        let mut got = Vec::new();
        let mut chunk = [0u8; 700]; // small reads, like tungstenite's
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        w.await.unwrap();
        assert_eq!(got, data);
        assert!(r.buf.capacity() == 0 || r.hint > 0);
    }
}
