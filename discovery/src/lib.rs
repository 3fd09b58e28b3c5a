//! Discovery: how a coordinator learns which workers exist, and a worker makes itself known.
//!
//! worker --announce(signed advert)--> [static | mdns | etcd] --membership--> coordinator registry
//!
//! - [`advert`]: the record a worker announces (cluster, id, role, model fingerprint, host,
//!   ports) and its signature under the cluster key; a reader admits only adverts that verify.
//! - [`membership`]: joins, changes, leaves and refusals, and the pure [`MemberSet`] every
//!   backend uses to turn sightings into them.
//! - [`backend`]: the [`Backend`] trait (watch, announce) and [`open`], which picks one by
//!   name from [`DiscoveryConfig`].
//! - [`static_list`], [`mdns`], [`etcd`]: the backends.
//! - [`events`]: the event plane's signed ZeroMQ PUB/SUB transport (workers publish load and
//!   KV events; coordinators subscribe).
//!
//! Invariants: nothing unsigned, foreign or malformed becomes a member (it becomes a counted
//! [`Membership::Refused`]); no input from the network panics; a backend's task lives as long
//! as the [`Members`] or [`Announcement`] that owns it.

pub mod advert;
pub mod backend;
pub mod config;
pub mod error;
pub mod etcd;
pub mod events;
pub mod mdns;
pub mod membership;
pub mod static_list;

pub use advert::{Advert, ClusterKey, Role};
pub use backend::{Announcement, Backend, Members, open};
pub use config::{BackendKind, DiscoveryConfig, EtcdConfig};
pub use error::{Error, Refusal, Result};
pub use membership::{Member, MemberSet, Membership, Source};
