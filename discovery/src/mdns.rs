//! The mDNS backend (`mdns-sd`): each worker registers a `_baton._tcp.local.` service whose
//! TXT record is its signed advert; a coordinator browses the type and admits the adverts that
//! verify under the cluster key.
//!
//! mDNS says when a worker leaves cleanly (goodbye packets: [`Announcement::withdraw`]) and
//! when its records expire, but a worker killed outright stays in caches until then: the
//! coordinator's health polls, not this backend, notice that one (`leave_after`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use baton_core::WorkerId;
use mdns_sd::{ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::mpsc;

use crate::advert::{Advert, ClusterKey, now_ms};
use crate::backend::{Announcement, Backend, BoxFuture, Members, TaskGuard, WATCH_QUEUE};
use crate::error::{Error, Refusal, Result};
use crate::membership::{Member, MemberSet, Membership, Source};

/// The service type every baton worker registers.
pub const SERVICE_TYPE: &str = "_baton._tcp.local.";

/// How long a withdrawal waits for the daemon to send its goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// Most refused instance names remembered (so each is reported once); past it the memory is
/// cleared rather than grown.
const MAX_REMEMBERED_REFUSALS: usize = 1024;

pub struct MdnsBackend {
    cluster: String,
    key: ClusterKey,
    advertise_host: Option<IpAddr>,
    daemon: ServiceDaemon,
}

impl MdnsBackend {
    /// Starts the mDNS daemon (a thread on UDP 5353, every multicast interface).
    pub fn new(cluster: String, key: ClusterKey, advertise_host: Option<String>) -> Result<Self> {
        let advertise_host = advertise_host
            .map(|h| {
                h.parse::<IpAddr>().map_err(|e| Error::InvalidConfig {
                    field: "discovery.advertise_host",
                    reason: format!("{h:?} is not an IP address (mdns advertises addresses): {e}"),
                })
            })
            .transpose()?;
        let daemon = ServiceDaemon::new().map_err(backend_error)?;
        Ok(Self {
            cluster,
            key,
            advertise_host,
            daemon,
        })
    }
}

fn backend_error(e: mdns_sd::Error) -> Error {
    Error::Backend {
        backend: "mdns",
        reason: e.to_string(),
    }
}

/// A worker's instance name: a DNS label (at most 63 bytes) that a worker id (up to 128) may
/// not fit, so a digest of the id; the TXT record carries the id itself.
fn instance_name(advert: &Advert) -> String {
    let digest = blake3::hash(advert.worker_id.to_string().as_bytes());
    let hex: String = digest.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("baton-{}-{hex}", advert.role.as_str())
}

impl Backend for MdnsBackend {
    fn name(&self) -> &'static str {
        "mdns"
    }

    fn watch(&self) -> BoxFuture<'_, Result<Members>> {
        Box::pin(async move {
            let events = self.daemon.browse(SERVICE_TYPE).map_err(backend_error)?;
            let (tx, rx) = mpsc::channel(WATCH_QUEUE);
            let mut reader = Reader {
                cluster: self.cluster.clone(),
                key: self.key.clone(),
                set: MemberSet::default(),
                names: HashMap::new(),
                refused: HashMap::new(),
            };
            let task = tokio::spawn(async move {
                while let Ok(event) = events.recv_async().await {
                    let change = match event {
                        ServiceEvent::ServiceResolved(service) => reader.resolved(&service),
                        ServiceEvent::ServiceRemoved(_, fullname) => reader.removed(&fullname),
                        _ => None,
                    };
                    if let Some(change) = change
                        && tx.send(change).await.is_err()
                    {
                        return;
                    }
                }
            });
            Ok(Members::new(
                rx,
                (
                    TaskGuard(task),
                    StopBrowse(self.daemon.clone()),
                    self.daemon.clone(),
                ),
            ))
        })
    }

    fn announce(&self, advert: Advert) -> BoxFuture<'_, Result<Announcement>> {
        Box::pin(async move {
            let instance = instance_name(&advert);
            let pairs: Vec<(String, String)> = advert.to_pairs(&self.key).into_iter().collect();
            let host_name = format!("{instance}.local.");
            let info = match self.advertise_host {
                Some(ip) => ServiceInfo::new(
                    SERVICE_TYPE,
                    &instance,
                    &host_name,
                    ip,
                    advert.grpc_port,
                    &pairs[..],
                ),
                None => ServiceInfo::new(
                    SERVICE_TYPE,
                    &instance,
                    &host_name,
                    (),
                    advert.grpc_port,
                    &pairs[..],
                )
                .map(ServiceInfo::enable_addr_auto),
            }
            .map_err(backend_error)?;
            let fullname = info.get_fullname().to_string();
            self.daemon.register(info).map_err(backend_error)?;
            tracing::info!(worker = %advert.worker_id, instance = %fullname, "announced over mdns");
            let registered = Registered {
                daemon: self.daemon.clone(),
                fullname: fullname.clone(),
            };
            let daemon = self.daemon.clone();
            let withdraw: BoxFuture<'static, ()> = Box::pin(async move {
                if let Ok(done) = daemon.unregister(&fullname) {
                    let _ = tokio::time::timeout(GOODBYE_WAIT, done.recv_async()).await;
                }
            });
            Ok(Announcement::new(Some(withdraw), registered))
        })
    }
}

/// Unregisters (sends goodbye) when the announcement drops without a withdrawal.
struct Registered {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Already gone after a withdrawal: the daemon answers with an error nobody reads.
        let _ = self.daemon.unregister(&self.fullname);
    }
}

struct StopBrowse(ServiceDaemon);

impl Drop for StopBrowse {
    fn drop(&mut self) {
        let _ = self.0.stop_browse(SERVICE_TYPE);
    }
}

/// A coordinator's reading of the browse events (pure but for the time).
struct Reader {
    cluster: String,
    key: ClusterKey,
    set: MemberSet,
    /// Instance full name -> the worker it advertised.
    names: HashMap<String, WorkerId>,
    /// Instance full name -> why it was refused, so a re-announced refusal is reported once.
    refused: HashMap<String, Refusal>,
}

impl Reader {
    fn resolved(&mut self, service: &ResolvedService) -> Option<Membership> {
        let pairs: BTreeMap<String, String> = service
            .txt_properties
            .iter()
            .map(|p| (p.key().to_string(), p.val_str().to_string()))
            .collect();
        let addresses: Vec<IpAddr> = service
            .addresses
            .iter()
            .map(mdns_sd::ScopedIp::to_ip_addr)
            .collect();
        match self.admit(&pairs, &addresses) {
            Ok(Some(member)) => {
                self.refused.remove(&service.fullname);
                self.names
                    .insert(service.fullname.clone(), member.id.clone());
                self.set.observe(member)
            }
            Ok(None) => None,
            Err(reason) => {
                // Named as it claims to be (unverified: for the log line only).
                let from = match pairs.get("id") {
                    Some(id) => format!("{} (worker {id:?})", service.fullname),
                    None => service.fullname.clone(),
                };
                if self.refused.get(&service.fullname) == Some(&reason) {
                    return None;
                }
                if self.refused.len() >= MAX_REMEMBERED_REFUSALS {
                    self.refused.clear();
                }
                self.refused
                    .insert(service.fullname.clone(), reason.clone());
                Some(Membership::Refused {
                    from,
                    source: Source::Mdns,
                    reason,
                })
            }
        }
    }

    /// The member an advert describes; `None` while no address is known yet.
    fn admit(
        &self,
        pairs: &BTreeMap<String, String>,
        addresses: &[IpAddr],
    ) -> std::result::Result<Option<Member>, Refusal> {
        let advert = Advert::from_pairs(pairs, &self.key, &self.cluster)?;
        if advert.from_the_future(now_ms()) {
            return Err(Refusal::FromTheFuture);
        }
        let Some(address) = dial_address(&advert, addresses) else {
            return Ok(None);
        };
        Ok(Some(Member {
            id: advert.worker_id.clone(),
            role: advert.role,
            address,
            advert: Some(advert),
            source: Source::Mdns,
        }))
    }

    fn removed(&mut self, fullname: &str) -> Option<Membership> {
        self.refused.remove(fullname);
        let id = self.names.remove(fullname)?;
        self.set.forget(&id)
    }
}

/// Where to reach an advertised worker: its advertised host, else the lowest non-loopback
/// IPv4 address mDNS resolved (loopback only when it is all there is), else a global IPv6 one.
fn dial_address(advert: &Advert, addresses: &[IpAddr]) -> Option<String> {
    if let Some(host) = &advert.host {
        return Some(format!("{host}:{}", advert.grpc_port));
    }
    // A LAN address before loopback (which the daemon also resolves on the worker's own
    // host), the lowest for stability: the set grows as interfaces answer.
    let v4 = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v4) if !v4.is_unspecified() => Some(*v4),
            _ => None,
        })
        .min_by_key(|v4| (v4.is_loopback(), *v4));
    if let Some(v4) = v4 {
        return Some(format!("{v4}:{}", advert.grpc_port));
    }
    addresses
        .iter()
        .filter_map(|a| match a {
            // Link-local addresses need a scope the address string would not carry.
            IpAddr::V6(v6) if !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80 => {
                Some(*v6)
            }
            _ => None,
        })
        .min()
        .map(|v6| format!("[{v6}]:{}", advert.grpc_port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::Role;
    use baton_core::Fingerprint;

    fn advert(host: Option<&str>) -> Advert {
        Advert {
            cluster: "lab".into(),
            worker_id: WorkerId::parse("decode-x").expect("id"),
            role: Role::Decode,
            fingerprint: Fingerprint([0; 32]),
            host_id: "h".into(),
            grpc_port: 7000,
            event_port: 0,
            host: host.map(Into::into),
            issued_ms: 1,
        }
    }

    #[test]
    fn the_dial_address_prefers_the_advertised_host_then_ipv4() {
        let v4: IpAddr = "10.0.0.3".parse().expect("ip");
        let v4_low: IpAddr = "10.0.0.2".parse().expect("ip");
        let link_local: IpAddr = "fe80::1".parse().expect("ip");
        let global: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(
            dial_address(&advert(Some("node-1")), &[v4]).as_deref(),
            Some("node-1:7000")
        );
        assert_eq!(
            dial_address(&advert(None), &[global, v4, v4_low]).as_deref(),
            Some("10.0.0.2:7000")
        );
        assert_eq!(
            dial_address(&advert(None), &[link_local, global]).as_deref(),
            Some("[2001:db8::1]:7000")
        );
        assert_eq!(dial_address(&advert(None), &[link_local]), None);
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(
            dial_address(&advert(None), &[lo, v4]).as_deref(),
            Some("10.0.0.3:7000")
        );
        assert_eq!(
            dial_address(&advert(None), &[lo]).as_deref(),
            Some("127.0.0.1:7000")
        );
    }

    #[test]
    fn instance_names_fit_a_dns_label() {
        let long = Advert {
            worker_id: WorkerId::parse(&"w".repeat(128)).expect("id"),
            ..advert(None)
        };
        let name = instance_name(&long);
        assert!(name.len() <= 63, "{name}");
        assert_ne!(name, instance_name(&advert(None)));
    }
}
