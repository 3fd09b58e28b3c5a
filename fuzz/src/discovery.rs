//! Discovery: adverts as an etcd watcher reads them (values of `key=value` lines, signed pairs,
//! the member set they feed), and the event plane's signed messages.

use baton_discovery::advert::Advert;
use baton_discovery::etcd::fuzzing::{EtcdReader, resign};
use baton_discovery::etcd::prefix;
use baton_discovery::events::{TOPIC, read_frames};
use baton_discovery::{ClusterKey, Membership};

use crate::Input;

/// The cluster the targets read for.
pub const CLUSTER: &str = "lab";

/// The cluster key the targets verify with (and sign with, to reach past the signature).
pub fn cluster_key() -> ClusterKey {
    ClusterKey::new(b"fuzz-cluster-key-0123456789abcdef").expect("a key of 33 bytes")
}

/// A sequence of etcd events, as one watcher sees them. Each starts with a byte: its low two
/// bits choose a put, a delete or a full listing; bit 4 puts the key inside the cluster's
/// prefix; bit 5 signs a value's pairs again under the cluster key (as a worker holding the key
/// could write anything; the fuzzer cannot forge a keyed hash). Keys are a length byte and
/// bytes, values two length bytes and bytes.
///
/// Checks that every member it admits carries an advert that signs and reads back the same.
pub fn discovery_advert(data: &[u8]) {
    let key = cluster_key();
    let mut reader = EtcdReader::new(CLUSTER, key.clone());
    let mut input = Input::new(data);
    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        let op = input.byte();
        let etcd_key = |input: &mut Input| {
            let name = input.field();
            if op & 0x10 != 0 {
                let mut k = prefix(CLUSTER).into_bytes();
                k.extend_from_slice(name);
                k
            } else {
                name.to_vec()
            }
        };
        let value = |input: &mut Input| {
            let v = input.long_field();
            if op & 0x20 != 0 {
                resign(v, &key).unwrap_or_else(|| v.to_vec())
            } else {
                v.to_vec()
            }
        };
        let changes = match op & 3 {
            0 => {
                let k = etcd_key(&mut input);
                let v = value(&mut input);
                reader.put(&k, &v)
            }
            1 => reader.delete(&etcd_key(&mut input)),
            _ => {
                let n = input.byte() % 8;
                let kvs: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                    .map(|_| (etcd_key(&mut input), value(&mut input)))
                    .collect();
                let borrowed: Vec<(&[u8], &[u8])> = kvs
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                reader.resync(&borrowed)
            }
        };
        for change in changes {
            if let Membership::Joined(m) | Membership::Changed(m) = change {
                let advert = m.advert.expect("an etcd member comes from an advert");
                assert_eq!(advert.worker_id, m.id);
                assert_eq!(
                    Advert::from_pairs(&advert.to_pairs(&key), &key, CLUSTER).as_ref(),
                    Ok(&advert),
                    "an admitted advert signs and reads back the same"
                );
            }
        }
    }
}

/// An event-plane message as a subscriber reads it: up to seven frames (the first byte's low
/// bits), each cut from the input; the first byte's bits 4 and 5 put baton's topic first and
/// sign the payload under the cluster key (the fuzzer cannot forge a keyed hash), to reach past
/// each check.
pub fn discovery_event(data: &[u8]) {
    let key = cluster_key();
    let mut input = Input::new(data);
    let mode = input.byte();
    let mut frames: Vec<Vec<u8>> = (0..mode & 7).map(|_| input.long_field().to_vec()).collect();
    if mode & 0x10 != 0
        && let Some(topic) = frames.first_mut()
    {
        *topic = TOPIC.to_vec();
    }
    if mode & 0x20 != 0 && frames.len() == 3 {
        frames[2] = key.sign_event(&frames[1]).to_vec();
    }
    if let Ok(payload) = read_frames(&key, &frames) {
        assert_eq!(payload, frames[1], "a read message is its payload");
    }
}
