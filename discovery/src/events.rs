//! The event plane's transport: a worker publishes signed messages on a ZeroMQ PUB socket; a
//! coordinator subscribes to each worker it admitted and gets the messages that verify under
//! the cluster key. What a message says (load, KV events, their sequence numbers) is the
//! caller's: this module moves opaque payloads and vouches for who signed them.
//!
//! worker --PUB [topic, payload, signature]--> coordinator SUB (one socket per worker)
//!
//! A message is three frames: the topic [`TOPIC`], the payload, and a keyed BLAKE3 hash of the
//! payload under a key derived from the cluster key for events (distinct from the adverts'
//! key, so neither can stand for the other). PUB drops messages for a subscriber that does not
//! keep up (bounded queues), so a reader must expect gaps: the payload carries sequence
//! numbers and the reader resynchronises over gRPC when it sees one.

use std::net::SocketAddr;

use zeromq::{PubSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::advert::ClusterKey;
use crate::error::{Error, Refusal, Result};

/// The one topic baton publishes.
pub const TOPIC: &[u8] = b"baton.v1.WorkerEvent";

/// Largest payload a reader accepts (a worker's whole KV index, 8192 block names, is about
/// 300 KiB).
pub const MAX_PAYLOAD: usize = 4 << 20;

/// Largest message either socket reads from a peer: a publisher's three frames, or a
/// subscriber's subscription. Past it the peer's connection ends before anything is reserved
/// for the frame (zeromq's own decoder would reserve whatever a frame header declares: the
/// crate is patched for this, third_party/zeromq).
pub const MAX_MESSAGE: usize = MAX_PAYLOAD + 4096;

fn options() -> SocketOptions {
    let mut options = SocketOptions::default();
    options.max_message_size(MAX_MESSAGE);
    options
}

fn zmq_error(e: zeromq::ZmqError) -> Error {
    Error::Backend {
        backend: "events",
        reason: e.to_string(),
    }
}

/// A worker's publisher.
pub struct EventPublisher {
    socket: PubSocket,
    key: ClusterKey,
    port: u16,
}

impl EventPublisher {
    /// Binds `at` (port 0: the OS chooses; [`EventPublisher::port`] says which).
    pub async fn bind(at: SocketAddr, key: ClusterKey) -> Result<Self> {
        let listener = std::net::TcpListener::bind(at).map_err(|e| Error::Backend {
            backend: "events",
            reason: format!("bind {at}: {e}"),
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Backend {
                backend: "events",
                reason: e.to_string(),
            })?
            .port();
        let mut socket = PubSocket::with_options(options());
        socket.bind_listener(listener).await.map_err(zmq_error)?;
        Ok(Self { socket, key, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Signs and sends `payload`. A subscriber whose queue is full misses it (it sees the
    /// gap in the payload's sequence numbers).
    pub async fn publish(&mut self, payload: Vec<u8>) -> Result<()> {
        let signature = self.key.sign_event(&payload);
        let mut message = ZmqMessage::from(TOPIC.to_vec());
        message.push_back(payload.into());
        message.push_back(signature.to_vec().into());
        self.socket.send(message).await.map_err(zmq_error)
    }
}

/// A coordinator's subscription to one worker's publisher.
pub struct EventSubscriber {
    socket: SubSocket,
    key: ClusterKey,
}

impl EventSubscriber {
    /// Connects to a publisher at `endpoint` (`host:port`), waiting at most until the
    /// connection is up (the caller bounds it).
    pub async fn connect(endpoint: &str, key: ClusterKey) -> Result<Self> {
        let mut socket = SubSocket::with_options(options());
        socket
            .subscribe(std::str::from_utf8(TOPIC).unwrap_or_default())
            .await
            .map_err(zmq_error)?;
        socket
            .connect(&format!("tcp://{endpoint}"))
            .await
            .map_err(zmq_error)?;
        Ok(Self { socket, key })
    }

    /// The next message's payload: `Ok(Ok(payload))` when it verifies, `Ok(Err(refusal))`
    /// when it does not (the caller counts it), `Err` when the connection is gone for good.
    pub async fn next(&mut self) -> Result<std::result::Result<Vec<u8>, Refusal>> {
        let message = self.socket.recv().await.map_err(zmq_error)?;
        Ok(self.read(message))
    }

    fn read(&self, message: ZmqMessage) -> std::result::Result<Vec<u8>, Refusal> {
        read_frames(&self.key, &message.into_vec())
    }
}

/// A message's frames as a subscriber reads them: the payload, when the topic is baton's and
/// the signature verifies under `key`. Public only for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub fn read_frames<F: AsRef<[u8]>>(
    key: &ClusterKey,
    frames: &[F],
) -> std::result::Result<Vec<u8>, Refusal> {
    let [topic, payload, signature] = frames else {
        return Err(Refusal::Malformed(format!(
            "{} frames, not 3",
            frames.len()
        )));
    };
    let (payload, signature) = (payload.as_ref(), signature.as_ref());
    if topic.as_ref() != TOPIC {
        return Err(Refusal::Malformed("unknown topic".into()));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(Refusal::Malformed(format!(
            "payload of {} bytes, over {MAX_PAYLOAD}",
            payload.len()
        )));
    }
    let Ok(signature) = <[u8; 32]>::try_from(signature) else {
        return Err(Refusal::Unsigned);
    };
    if !key.verify_event(payload, &signature) {
        return Err(Refusal::BadSignature);
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClusterKey {
        ClusterKey::new(s.as_bytes()).expect("key")
    }

    fn message(frames: &[&[u8]]) -> ZmqMessage {
        let mut m = ZmqMessage::from(frames[0].to_vec());
        for f in &frames[1..] {
            m.push_back(f.to_vec().into());
        }
        m
    }

    #[tokio::test]
    async fn only_messages_signed_with_the_cluster_key_are_read() {
        let k = key("events-test-key-0123456789abcdef");
        let reader = EventSubscriber {
            socket: SubSocket::new(),
            key: k.clone(),
        };
        let signature = k.sign_event(b"payload");
        assert_eq!(
            reader.read(message(&[TOPIC, b"payload", &signature])),
            Ok(b"payload".to_vec())
        );
        assert_eq!(
            reader.read(message(&[TOPIC, b"payloaX", &signature])),
            Err(Refusal::BadSignature)
        );
        let other = key("another-events-key-0123456789ab").sign_event(b"payload");
        assert_eq!(
            reader.read(message(&[TOPIC, b"payload", &other])),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            reader.read(message(&[TOPIC, b"payload", b"short"])),
            Err(Refusal::Unsigned)
        );
        assert!(matches!(
            reader.read(message(&[TOPIC, b"payload"])),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            reader.read(message(&[b"other.topic", b"payload", &signature])),
            Err(Refusal::Malformed(_))
        ));
        // An advert signature over the same bytes is not an event signature.
        assert_ne!(k.sign_event(b"x"), k.sign_advert(b"x"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_receives_what_a_publisher_sends() {
        let k = key("events-test-key-0123456789abcdef");
        let mut publisher = EventPublisher::bind("127.0.0.1:0".parse().expect("addr"), k.clone())
            .await
            .expect("bind");
        let mut subscriber =
            EventSubscriber::connect(&format!("127.0.0.1:{}", publisher.port()), k)
                .await
                .expect("connect");
        // A subscription reaches the publisher a moment after the connection: publish until
        // one arrives (PUB drops what no subscriber has asked for yet).
        let received = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut n = 0u32;
            loop {
                n += 1;
                publisher
                    .publish(n.to_le_bytes().to_vec())
                    .await
                    .expect("publish");
                if let Ok(Ok(got)) =
                    tokio::time::timeout(std::time::Duration::from_millis(20), subscriber.next())
                        .await
                {
                    return got;
                }
            }
        })
        .await
        .expect("a message arrives");
        let got = received.expect("verifies");
        assert_eq!(got.len(), 4);
    }

    /// Receives until one message verifies, publishing meanwhile (bounded).
    async fn round_trip(publisher: &mut EventPublisher, subscriber: &mut EventSubscriber) {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                publisher.publish(vec![7; 16]).await.expect("publish");
                if let Ok(Ok(Ok(_))) =
                    tokio::time::timeout(std::time::Duration::from_millis(20), subscriber.next())
                        .await
                {
                    return;
                }
            }
        })
        .await
        .expect("a message arrives");
    }

    /// A peer that declares a frame of 2^45 bytes (14 bytes on the wire) made the process
    /// abort in zeromq's decoder, which reserved whatever a header declared. With the cap it
    /// loses its connection and the publisher goes on serving its subscribers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_declaring_a_huge_frame_is_dropped_and_the_publisher_serves_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let k = key("events-test-key-0123456789abcdef");
        let mut publisher = EventPublisher::bind("127.0.0.1:0".parse().expect("addr"), k.clone())
            .await
            .expect("bind");
        let at = format!("127.0.0.1:{}", publisher.port());
        let mut attacker = tokio::net::TcpStream::connect(&at).await.expect("connect");
        // ZMTP 3.0 greeting (NULL mechanism), then a READY command as a SUB socket.
        let mut greeting = vec![0xff];
        greeting.extend([0u8; 8]);
        greeting.push(0x7f);
        greeting.extend([3, 0]);
        greeting.extend(b"NULL");
        greeting.extend([0u8; 16]);
        greeting.push(0);
        greeting.extend([0u8; 31]);
        attacker.write_all(&greeting).await.expect("greeting");
        let mut theirs = [0u8; 64];
        attacker
            .read_exact(&mut theirs)
            .await
            .expect("the publisher's greeting");
        let mut ready = vec![5];
        ready.extend(b"READY");
        ready.push(11);
        ready.extend(b"Socket-Type");
        ready.extend(3u32.to_be_bytes());
        ready.extend(b"SUB");
        attacker
            .write_all(&[0x04, ready.len() as u8])
            .await
            .expect("command");
        attacker.write_all(&ready).await.expect("ready");
        // A long message frame declaring 2^45 bytes.
        attacker.write_all(&[0x02]).await.expect("flags");
        attacker
            .write_all(&(1u64 << 45).to_be_bytes())
            .await
            .expect("length");
        // The publisher hangs up on it (reads end), instead of reserving 32 TiB.
        let mut rest = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            attacker.read_to_end(&mut rest),
        )
        .await
        .expect("the publisher closes the connection")
        .ok();
        // And serves a real subscriber afterwards.
        let mut subscriber = EventSubscriber::connect(&at, k).await.expect("connect");
        round_trip(&mut publisher, &mut subscriber).await;
    }
}
