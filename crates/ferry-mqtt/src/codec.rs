//! `tokio_util::codec` adapter (feature `tokio-codec`).

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::error::{DecodeError, EncodeError};
use crate::packet::{Packet, ProtocolVersion};

/// Error of [`MqttCodec`]: the transport's, or the codec's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The underlying transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The peer sent an invalid packet.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A packet could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// A [`Decoder`] and [`Encoder`] of [`Packet`]s.
///
/// Created with a version ([`MqttCodec::new`]) it decodes and encodes with it. Created for a
/// server ([`MqttCodec::server`]) the version is unknown until the first packet, which must be a
/// CONNECT; the codec then adopts its protocol level. Encoding a CONNECT also adopts its level
/// (a client codec can thus start without a version as well). Any other packet encoded before
/// the version is known uses the 3.1.1 layout, which every client can read: that is how a
/// server refuses a CONNECT of an unsupported level (CONNACK return code 0x01).
#[derive(Debug, Clone)]
pub struct MqttCodec {
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
}

impl MqttCodec {
    /// A codec for a connection of a known version.
    pub fn new(version: ProtocolVersion, max_packet_size: usize) -> Self {
        Self {
            version: Some(version),
            max_packet_size,
        }
    }

    /// A codec whose version is set by the first CONNECT decoded or encoded.
    pub fn server(max_packet_size: usize) -> Self {
        Self {
            version: None,
            max_packet_size,
        }
    }

    /// Sets the version (for instance from a CONNECT decoded elsewhere).
    pub fn set_version(&mut self, version: ProtocolVersion) {
        self.version = Some(version);
    }

    /// The negotiated version, once known.
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }
}

impl Decoder for MqttCodec {
    type Item = Packet;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Packet>, CodecError> {
        match self.version {
            Some(version) => Ok(crate::decode(src, version, self.max_packet_size)?),
            None => {
                let connect = crate::decode_connect(src, self.max_packet_size)?;
                if let Some(connect) = &connect {
                    self.version = Some(connect.protocol_version);
                }
                Ok(connect.map(Packet::Connect))
            }
        }
    }
}

impl Encoder<Packet> for MqttCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        <Self as Encoder<&Packet>>::encode(self, &packet, dst)
    }
}

impl Encoder<&Packet> for MqttCodec {
    type Error = CodecError;

    fn encode(&mut self, packet: &Packet, dst: &mut BytesMut) -> Result<(), CodecError> {
        let version = match (packet, self.version) {
            (Packet::Connect(connect), _) => {
                self.version = Some(connect.protocol_version);
                connect.protocol_version
            }
            (_, Some(version)) => version,
            // Before any CONNECT (e.g. refusing one whose level is unsupported): the 3.1.1
            // layout, which every client version can read.
            (_, None) => ProtocolVersion::V311,
        };
        Ok(crate::encode(packet, version, dst)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{ConnAck, Connect, ReasonCode};

    #[test]
    fn server_codec_adopts_the_connect_version() {
        let mut client = MqttCodec::server(1024);
        let mut wire = BytesMut::new();
        client
            .encode(
                Packet::Connect(Connect::new(ProtocolVersion::V311, "c")),
                &mut wire,
            )
            .unwrap();
        assert_eq!(client.version(), Some(ProtocolVersion::V311));
        client.encode(Packet::PingReq, &mut wire).unwrap();

        let mut server = MqttCodec::server(1024);
        assert!(matches!(
            server.decode(&mut wire).unwrap(),
            Some(Packet::Connect(_))
        ));
        assert_eq!(server.version(), Some(ProtocolVersion::V311));
        assert_eq!(server.decode(&mut wire).unwrap(), Some(Packet::PingReq));
        assert_eq!(server.decode(&mut wire).unwrap(), None);
    }

    #[test]
    fn refusal_before_connect_uses_the_v311_layout() {
        let mut server = MqttCodec::server(1024);
        let mut wire = BytesMut::from(&[0xC0, 0x00][..]);
        assert!(matches!(
            server.decode(&mut wire),
            Err(CodecError::Decode(DecodeError::ExpectedConnect(_)))
        ));
        let refusal = ConnAck {
            reason_code: ReasonCode::UnsupportedProtocolVersion,
            ..ConnAck::default()
        };
        let mut out = BytesMut::new();
        server.encode(Packet::ConnAck(refusal), &mut out).unwrap();
        assert_eq!(&out[..], [0x20, 0x02, 0x00, 0x01]);
    }
}
