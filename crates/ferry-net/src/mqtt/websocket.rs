//! MQTT over WebSocket at `/mqtt` on the HTTP listener (`ws://`, or `wss://` when the HTTP
//! listener has TLS): subprotocol `mqtt`, binary frames carrying MQTT bytes in any split. The
//! socket is adapted to a byte stream ([`WsStream`]) and runs the same connection task as TCP.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use axum::routing::get;
use axum::Extension;
use axum::Router;
use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{spawn_connection, MqttHandle};
use crate::http_serve::ConnectionSlot;
use crate::server::PeerAddr;

/// The path MQTT over WebSocket is served at.
pub const PATH: &str = "/mqtt";

/// The `/mqtt` route, to merge into the HTTP router (needs connect info of type [`PeerAddr`]).
pub fn router(mqtt: MqttHandle) -> Router {
    Router::new().route(PATH, get(upgrade)).with_state(mqtt)
}

async fn upgrade(
    State(mqtt): State<MqttHandle>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    // The upgraded connection keeps its place in the HTTP listener's connection counts.
    let slot = slot.map(|Extension(s)| s);
    let max = mqtt.shared.config.max_packet_size;
    ws.protocols(["mqtt"])
        .max_message_size(max.saturating_add(16))
        .on_upgrade(move |socket| async move {
            spawn_connection(&mqtt.shared, WsStream::new(socket, slot), peer);
        })
}

/// A WebSocket as a byte stream: binary frames in, each write a binary frame out.
pub(crate) struct WsStream {
    ws: WebSocket,
    /// The rest of the last frame read.
    read: Bytes,
    /// The HTTP connection's place in the listener's counts, held as long as the socket.
    _slot: Option<ConnectionSlot>,
}

impl WsStream {
    pub(crate) fn new(ws: WebSocket, slot: Option<ConnectionSlot>) -> Self {
        WsStream {
            ws,
            read: Bytes::new(),
            _slot: slot,
        }
    }
}

fn ws_error(e: axum::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.read.is_empty() {
                let n = buf.remaining().min(this.read.len());
                buf.put_slice(&this.read[..n]);
                this.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.read = b,
                // End of stream: a read of 0 bytes.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary frames, got a text frame",
                    )))
                }
                // Pings are answered by the WebSocket layer.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(ws_error)
    }
}
